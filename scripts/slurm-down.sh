#!/usr/bin/env bash
# Stop the one-node Slurm started by scripts/slurm-up.sh (slurmd, slurmctld), by their pid files,
# waiting (bounded) for each to exit. munged is left running unless FLOWCEPT_SLURM_STOP_MUNGE=1.
set -uo pipefail
STATE="${FLOWCEPT_SLURM_DIR:-/var/lib/flowcept-slurm}"
stop() {
  local pidfile=$1 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "slurm-down.sh: $pidfile ($pid) still running after 10 s" >&2
}
stop "$STATE/slurmd.pid"
stop "$STATE/slurmctld.pid"
[ "${FLOWCEPT_SLURM_STOP_MUNGE:-0}" = 1 ] && stop /run/munge/munged.pid
exit 0
