#!/usr/bin/env bash
# Stop the dev cluster that slurm/start.sh started: only the processes named in its pid files
# and the namespaces it recorded. Idempotent. `--purge` also deletes CHATFORGE_SLURM_DIR
# (state, accounting database, logs); without it a later start keeps job history.
set -euo pipefail

BASE=${CHATFORGE_SLURM_DIR:-/tmp/chatforge-slurm}
PIDS=$BASE/pids

alive() {
  [ -r "/proc/$1/stat" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# Job steps first (slurmd's children), then the daemons in reverse start order.
stop_one() {
  local file=$1 pid i
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if alive "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# Processes of jobs still running on a node: children of slurmstepd, which slurmd started.
stop_steps() {
  local file pid child
  for file in "$PIDS"/slurmd.*.pid; do
    [ -s "$file" ] || continue
    pid=$(cat "$file")
    for child in $(pgrep -P "$pid" 2>/dev/null || true); do
      pkill -TERM -P "$child" 2>/dev/null || true
      kill -TERM "$child" 2>/dev/null || true
    done
  done
}

main() {
  [ -d "$BASE" ] || { echo "slurm/stop: nothing to stop ($BASE does not exist)" >&2; return 0; }
  stop_steps
  local file
  for file in "$PIDS"/slurmd.*.pid; do [ -e "$file" ] && stop_one "$file"; done
  for name in slurmctld slurmdbd mariadbd munged; do stop_one "$PIDS/$name.pid"; done
  if [ -s "$BASE/netns" ]; then
    # Deleting a namespace also removes the veth ends inside it.
    tac "$BASE/netns" | while read -r ns; do ip netns del "$ns" 2>/dev/null || true; done
    rm -f "$BASE/netns"
  fi
  if [ "${1:-}" = --purge ]; then
    rm -rf "$BASE"
  fi
  echo "slurm/stop: stopped the dev cluster in $BASE" >&2
}

main "$@"
