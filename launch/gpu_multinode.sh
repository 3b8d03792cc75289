#!/usr/bin/env bash
# One process per host, all GPUs of the host in that process. Run the same command on every
# host (e.g. `srun --ntasks-per-node=1 launch/gpu_multinode.sh jaxrec train --config F ...`).
#
# Coordinator, process count and id come from SLURM when present, else from
#   JAXREC_COORDINATOR (host:port of process 0), JAXREC_NUM_PROCESSES, JAXREC_PROCESS_ID.
set -euo pipefail
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export JAXREC_COORDINATOR="${JAXREC_COORDINATOR:-$head_node:${JAXREC_PORT:-12355}}"
  export JAXREC_NUM_PROCESSES="${JAXREC_NUM_PROCESSES:-$SLURM_NNODES}"
  export JAXREC_PROCESS_ID="${JAXREC_PROCESS_ID:-$SLURM_NODEID}"
fi
: "${JAXREC_COORDINATOR:?set JAXREC_COORDINATOR=host:port of process 0}"
: "${JAXREC_NUM_PROCESSES:?set JAXREC_NUM_PROCESSES}"
: "${JAXREC_PROCESS_ID:?set JAXREC_PROCESS_ID}"
export JAXREC_NUM_PROCESSES JAXREC_PROCESS_ID
exec "$@"
