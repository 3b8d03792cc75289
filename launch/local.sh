#!/usr/bin/env bash
# Run one jaxrec command as N cooperating processes on this machine (127.0.0.1 only), each with M
# simulated CPU devices. This is how tests and developers exercise multi-host code paths.
#
#   launch/local.sh N M jaxrec train --config configs/tiny.py --workdir runs/mp train.steps=20
#
# Process 0 prints to the terminal; process i>0 logs to $JAXREC_LOG_DIR/process_i.log (default:
# the system temp dir). If any process fails, the others are stopped.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND..." >&2
  exit 2
fi
num=$1; devices=$2; shift 2
log_dir=${JAXREC_LOG_DIR:-${TMPDIR:-/tmp}}
port=${JAXREC_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
run() {
  env JAXREC_COORDINATOR="127.0.0.1:$port" JAXREC_NUM_PROCESSES="$num" JAXREC_PROCESS_ID="$1" \
      JAXREC_LOCAL_DEVICES="$devices" JAX_PLATFORMS=cpu \
      XLA_FLAGS="--xla_force_host_platform_device_count=$devices" "${@:2}"
}
for ((i = 0; i < num; i++)); do
  if [ "$i" -eq 0 ]; then
    run "$i" "$@" &
  else
    run "$i" "$@" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
remaining=("${pids[@]}")
while [ ${#remaining[@]} -gt 0 ]; do
  finished=""
  wait -n -p finished "${remaining[@]}" || { status=$?; cleanup; }
  remaining=("${remaining[@]/$finished}")
  remaining=(${remaining[@]})
done
trap - EXIT
exit $status
