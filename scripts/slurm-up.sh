#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (munged + slurmctld + slurmd on 127.0.0.1), as root,
# without cgroups, so `srun -n 4 flowcept-launch ...` and `sbatch slurm_examples/...` can be tried.
#
#   bash scripts/slurm-up.sh      # idempotent: returns at once when the node is already idle
#   bash scripts/slurm-down.sh    # stops what this script started
#
# The node is named `localhost` and advertises more CPUs than the machine has (FLOWCEPT_SLURM_CPUS,
# default 16): with only the real CPUs, `srun -n 4` on a 2-CPU box queues forever instead of failing.
# State, logs and the generated slurm.conf live in FLOWCEPT_SLURM_DIR (default /var/lib/flowcept-slurm);
# the conf is also installed as /etc/slurm/slurm.conf (where srun/sbatch look) unless a foreign one
# is there, in which case export SLURM_CONF=$FLOWCEPT_SLURM_DIR/slurm.conf as printed.
# Needs: Debian/Ubuntu `slurm-wlm` and `munge` (installed here when apt-get is available).
set -euo pipefail
CPUS="${FLOWCEPT_SLURM_CPUS:-16}"
MEM_MB="${FLOWCEPT_SLURM_MEM_MB:-16000}"
STATE="${FLOWCEPT_SLURM_DIR:-/var/lib/flowcept-slurm}"
DEADLINE_S="${FLOWCEPT_SLURM_TIMEOUT_S:-30}"
MARK="# written by flowcept scripts/slurm-up.sh"
CONF="$STATE/slurm.conf"

[ "$(id -u)" = 0 ] || { echo "slurm-up.sh: run as root (it starts munged, slurmctld and slurmd)" >&2; exit 1; }
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "slurm-up.sh: install slurm-wlm and munge first" >&2; exit 1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -1; }

mkdir -p "$STATE/ctld" "$STATE/slurmd" "$STATE/log" /etc/slurm
if [ -f /etc/slurm/slurm.conf ] && ! grep -qF "$MARK" /etc/slurm/slurm.conf; then
  export SLURM_CONF="$CONF"
  echo "slurm-up.sh: /etc/slurm/slurm.conf is not ours; use: export SLURM_CONF=$CONF" >&2
fi

# Already up (second call): nothing to do.
if alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" && [ "$(node_state)" = idle ]; then
  exit 0
fi

# munge: Debian creates the key; make one when it is missing.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n </dev/null >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 100); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.05; done
fi

cat > "$CONF.new" <<CONFEOF
$MARK
ClusterName=flowcept
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=5
MinJobAge=60
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE OverSubscribe=YES State=UP
CONFEOF
mv "$CONF.new" "$CONF"
[ -n "${SLURM_CONF:-}" ] || cp "$CONF" /etc/slurm/slurm.conf

alive "$STATE/slurmctld.pid" || /usr/sbin/slurmctld -i -f "$CONF"   # -i: start from clean state
alive "$STATE/slurmd.pid" || /usr/sbin/slurmd -N localhost -f "$CONF"  # -N: node name, not $(hostname)

end=$(( $(date +%s) + DEADLINE_S ))
while [ "$(date +%s)" -lt "$end" ]; do
  case "$(node_state)" in
    idle) exit 0 ;;
    down*|drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.2
done
echo "slurm-up.sh: the node did not become idle within ${DEADLINE_S}s" >&2
tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
exit 1
