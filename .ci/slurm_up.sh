#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine for the test suite (tests/test_slurm.py).
#
# Idempotent, run as root: installs the Debian packages slurm-wlm and munge when missing
# (tested with slurm-wlm 22.05.8-4+deb12u3 and munge 0.5.15-2+deb12u1 on Debian 12), creates
# /etc/munge/munge.key when absent, writes /etc/slurm/slurm.conf for this host (refusing to
# overwrite one this script did not write), then starts munged, slurmctld and slurmd as root
# and waits until a batch array runs. Daemons it starts leave pid files in $RUN; slurm_down.sh
# stops exactly those. Prints one line: "slurm up: ..." or "slurm_up: FAILED at <step>: ...".
set -uo pipefail

RUN=/run/slurm-ci              # pid files of the daemons this script started
SPOOL=/var/spool/slurm-ci      # slurmctld state, slurmd spool
LOGS=/var/log/slurm-ci         # daemon logs, shown on failure
CONF=/etc/slurm/slurm.conf
MARK="# written by .ci/slurm_up.sh"
MUNGE_SOCKET=/run/munge/munge.socket.2

STEP=start
LOG=""  # the daemon log that explains a failure of the current step
fail() {
    echo "slurm_up: FAILED at $STEP: $*" >&2
    [ -n "$LOG" ] && [ -s "$LOG" ] && { echo "--- last lines of $LOG" >&2; tail -n 12 "$LOG" >&2; }
    exit 1
}
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

STEP="check root"
[ "$(id -u)" = 0 ] || fail "run as root (the daemons run as root on CI machines)"

STEP="install slurm-wlm and munge"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    # the package lists of a fresh image are often empty: update once, then install
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/tmp/slurm-ci-apt.log 2>&1 \
        || { apt-get update -q >>/tmp/slurm-ci-apt.log 2>&1 \
            && apt-get install -y -q --no-install-recommends slurm-wlm munge \
                >>/tmp/slurm-ci-apt.log 2>&1; } \
        || fail "apt-get install slurm-wlm munge (see /tmp/slurm-ci-apt.log)"
fi
mkdir -p "$RUN" "$SPOOL/ctld" "$SPOOL/d" "$LOGS" || fail "mkdir $RUN $SPOOL $LOGS"

STEP="check $CONF"
if [ -e "$CONF" ] && ! head -n 1 "$CONF" | grep -qF "$MARK"; then
    fail "$CONF exists and was not written by this script; move it away first"
fi

STEP="munge key"
id munge >/dev/null 2>&1 || fail "no 'munge' user (the munge package creates it)"
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge || fail "munge folders"
install -d -o munge -g munge -m 0711 /var/lib/munge || fail "munge folders"
install -d -o munge -g munge -m 0755 /run/munge || fail "munge folders"
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none || fail "write key"
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key || fail "key perms"

STEP="start munged"
LOG=$LOGS/munged.log
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    rm -f "$MUNGE_SOCKET"
    # the package gives the key and munge's folders to user munge; munged running as root
    # (as the daemons do here) calls that insecure, and --force lets it start regardless
    munged --force --pid-file="$RUN/munged.pid" --log-file="$LOGS/munged.log" \
        || fail "munged did not start"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
    munge -n </dev/null | unmunge >/dev/null 2>&1 || fail "munge -n | unmunge does not work"
fi

STEP="write $CONF"
HOST=$(hostname -s)
# `slurmd -C` prints this machine's real topology and memory as a NodeName line
HW=$(slurmd -C 2>/dev/null | head -n 1)
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
[ -n "$CPUS" ] && [ -n "$MEM" ] || fail "cannot read CPUs and memory from 'slurmd -C': $HW"
# a little below the measured memory, so a few MB of drift never drains the node
MEM=$((MEM * 95 / 100))
TOPO=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' \
    <<<"$HW")
NEW=$(cat <<EOF
$MARK for the test suite's one-node cluster
ClusterName=unlearn-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((MEM / CPUS))
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MaxArraySize=10001
MaxJobCount=50000
MinJobAge=300
KillWait=5
InactiveLimit=0
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS $TOPO RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
)
CHANGED=0
if [ "$(cat "$CONF" 2>/dev/null)" != "$NEW" ]; then
    mkdir -p "$(dirname "$CONF")" && printf '%s\n' "$NEW" >"$CONF.tmp" && mv "$CONF.tmp" "$CONF" \
        || fail "cannot write $CONF"
    CHANGED=1
fi
# slurmd reads cgroup.conf only for cgroup plugins; none are configured, so none is written

STEP="start slurmctld"
LOG=$LOGS/slurmctld.log
if [ "$CHANGED" = 1 ]; then  # daemons of an older configuration: restart them
    for d in slurmd slurmctld; do
        alive "$RUN/$d.pid" && kill "$(cat "$RUN/$d.pid")"
    done
    for _ in $(seq 50); do
        alive "$RUN/slurmd.pid" || alive "$RUN/slurmctld.pid" || break
        sleep 0.2
    done
fi
if ! alive "$RUN/slurmctld.pid"; then
    pgrep -x slurmctld >/dev/null && fail "a slurmctld this script did not start is running"
    # -i: a state file left by an older configuration is ignored rather than fatal
    slurmctld -i || fail "slurmctld did not start"
fi

STEP="start slurmd"
LOG=$LOGS/slurmd.log
if ! alive "$RUN/slurmd.pid"; then
    pgrep -x slurmd >/dev/null && fail "a slurmd this script did not start is running"
    slurmd || fail "slurmd did not start"
fi

STEP="wait for node $HOST idle"
for _ in $(seq 150); do
    STATE=$(sinfo -h -n "$HOST" -o %T 2>/dev/null)
    [ "$STATE" = idle ] && break
    # a node drained by an earlier run (e.g. killed daemons) comes back once resumed
    case "$STATE" in drain* | down*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null ;; esac
    sleep 0.2
done
[ "$(sinfo -h -n "$HOST" -o %T)" = idle ] || fail "node state '$(sinfo -h -n "$HOST" -o '%T %E')'"

STEP="srun -N1 hostname"
LOG=$LOGS/slurmctld.log
OUT=$(timeout 60 srun -N1 -t 1 hostname 2>&1) || fail "$OUT"
[ "$OUT" = "$(hostname)" ] || fail "srun printed '$OUT'"

STEP="sbatch --array=0-3"
TMP=$(mktemp -d) || fail mktemp
JOB=$(timeout 30 sbatch --parsable --array=0-3 -t 1 -o "$TMP/%a.out" --wrap 'echo $SLURM_ARRAY_TASK_ID' \
    2>&1) || fail "$JOB"
for _ in $(seq 300); do
    [ -z "$(squeue -h -j "$JOB" 2>/dev/null)" ] && break
    sleep 0.2
done
for i in 0 1 2 3; do
    [ "$(cat "$TMP/$i.out" 2>/dev/null)" = "$i" ] || fail "array task $i of job $JOB gave no output"
done
rm -rf "$TMP"

MINE=$(cd "$RUN" && ls -- *.pid 2>/dev/null | sed 's/\.pid$//' | paste -sd ' ')
echo "slurm up: node $HOST ($CPUS CPUs, $MEM MB), partition debug, $(sinfo -V);" \
    "running from this script: ${MINE:-none}"
