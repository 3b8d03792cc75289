#!/usr/bin/env bash
# Run one jaxrec command as N cooperating processes on this machine (127.0.0.1 only), each with M
# simulated CPU devices. This is how tests and developers exercise multi-host code paths.
#
#   launch/local.sh N M jaxrec train --config configs/tiny.py --workdir runs/mp train.steps=20
#
# Process 0 prints to the terminal; process i>0 logs to $JAXREC_LOG_DIR/process_i.log (default:
# the system temp dir). When a process fails, the others are stopped (SIGTERM, then SIGKILL after
# $JAXREC_STOP_GRACE seconds, default 10), one line names the failed process, and the launcher exits
# with its exit status. A process that failed only because another one is gone (jaxrec's status 76,
# "lost contact with another process") is not the cause: the launcher waits up to
# $JAXREC_CAUSE_WAIT seconds (default 5) for a process that failed otherwise and names that one.
# SIGINT/SIGTERM/SIGHUP to the launcher stop every process the same way.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND..." >&2
  exit 2
fi
if ((BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1))); then
  echo "$0: needs bash 5.1 or newer (wait -n -p); this is bash $BASH_VERSION" >&2
  exit 2
fi
if ! command -v setsid > /dev/null; then
  echo "$0: needs setsid (util-linux) to stop each process with everything it started" >&2
  exit 2
fi
num=$1; devices=$2; shift 2
log_dir=${JAXREC_LOG_DIR:-${TMPDIR:-/tmp}}
grace=${JAXREC_STOP_GRACE:-10}
cause_wait=${JAXREC_CAUSE_WAIT:-5}
peer_lost=76  # jaxrec.mesh.EXIT_PEER_LOST
port=${JAXREC_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()     # pids[i]: process i, which setsid makes the leader of its own process group
running=()  # pids not yet reaped
timer=""    # a sleep bounding the wait for the cause of a lost peer

forget() {  # drops $1 from running
  local pid still=()
  for pid in "${running[@]}"; do
    if [ "$pid" != "$1" ]; then still+=("$pid"); fi
  done
  running=(${still[@]+"${still[@]}"})
}

# Signals every process group still alive; a group outlives its leader when the leader left children.
signal_all() {
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    kill "-$1" -- "-$pid" 2>/dev/null || true
  done
}

any_alive() {
  local pid
  for pid in ${pids[@]+"${pids[@]}"}; do
    if kill -0 -- "-$pid" 2>/dev/null; then return 0; fi
  done
  return 1
}

# SIGTERM lets each process stop on its own (the trainer saves a checkpoint); SIGKILL after the grace.
stop_all() {
  signal_all TERM
  local waited=0
  while any_alive && [ "$waited" -lt $((grace * 10)) ]; do
    sleep 0.1
    waited=$((waited + 1))
  done
  signal_all KILL
  wait 2>/dev/null || true
}

on_signal() {
  trap - INT TERM HUP
  echo "launch/local.sh: received SIG$1; stopping all $num processes" >&2
  stop_all
  exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap 'on_signal HUP 129' HUP
# never leave a process behind, whatever ends this script
trap 'signal_all KILL; if [ -n "$timer" ]; then kill "$timer" 2>/dev/null || true; fi' EXIT

export JAXREC_COORDINATOR="127.0.0.1:$port" JAXREC_NUM_PROCESSES="$num" JAXREC_LOCAL_DEVICES="$devices" \
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices"
declare -A index_of=()
for ((i = 0; i < num; i++)); do
  # setsid makes each process the leader of its own group and execs, so $! is the process itself and
  # kill -- -PID reaches it and anything it starts, never this script or the other processes.
  if [ "$i" -eq 0 ]; then
    JAXREC_PROCESS_ID=$i setsid "$@" &
  else
    JAXREC_PROCESS_ID=$i setsid "$@" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
  running+=("$!")
  index_of[$!]=$i
done

status=0
while [ ${#running[@]} -gt 0 ]; do
  finished=""
  code=0
  wait -n -p finished "${running[@]}" 2>/dev/null || code=$?  # bash would also print "PID Killed COMMAND"
  if [ -z "${finished:-}" ]; then
    if [ "$code" -gt 128 ]; then continue; fi  # woken by a signal whose trap did not exit
    echo "launch/local.sh: lost track of the processes (wait returned $code); stopping them all" >&2
    status=1
    stop_all
    break
  fi
  forget "$finished"
  if [ "$code" -eq "$peer_lost" ] && [ ${#running[@]} -gt 0 ]; then
    # This process stopped because another one is gone; that one has usually exited already (a killed
    # peer breaks the survivor's collective at once) and is the failure worth naming.
    sleep "$cause_wait" &
    timer=$!
    while [ ${#running[@]} -gt 0 ]; do
      other=""
      other_code=0
      wait -n -p other "${running[@]}" "$timer" 2>/dev/null || other_code=$?
      if [ -z "${other:-}" ]; then
        if [ "$other_code" -gt 128 ]; then continue; fi
        break
      fi
      if [ "$other" = "$timer" ]; then break; fi
      forget "$other"
      if [ "$other_code" -ne 0 ] && [ "$other_code" -ne "$peer_lost" ]; then
        finished=$other
        code=$other_code
        break
      fi
    done
    kill "$timer" 2>/dev/null || true
    wait "$timer" 2>/dev/null || true
    timer=""
  fi
  if [ "$code" -ne 0 ]; then
    i=${index_of[$finished]}
    how="exited with status $code"
    if [ "$code" -gt 128 ]; then how="$how (killed by SIG$(kill -l $((code - 128)) 2>/dev/null || echo "$((code - 128))"))"; fi
    where=""
    if [ "$i" -ne 0 ]; then where="; its log: $log_dir/process_$i.log"; fi
    echo "launch/local.sh: process $i of $num (pid $finished) $how$where; stopping the others" >&2
    status=$code
    stop_all
    break
  fi
done
trap - EXIT
exit "$status"
