#!/usr/bin/env bash
# Stop the daemons .ci/slurm_up.sh started (their pid files in /run/slurm-ci), nothing else.
# Jobs still queued are cancelled first so slurmd leaves no job steps behind. Prints one line.
set -uo pipefail

RUN=/run/slurm-ci
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$RUN/slurmctld.pid"; then
    timeout 10 scancel --quiet --partition=debug 2>/dev/null
    for _ in $(seq 100); do  # KillWait is 5 s
        [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break
        sleep 0.1
    done
fi
stopped=()
for d in slurmd slurmctld munged; do  # the reverse of the start order
    pidfile="$RUN/$d.pid"
    if alive "$pidfile"; then
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null
            sleep 0.2
        fi
        kill -0 "$pid" 2>/dev/null && { echo "slurm_down: FAILED at stop $d: pid $pid" >&2; exit 1; }
        stopped+=("$d")
    fi
    rm -f "$pidfile"
done
echo "slurm down: stopped ${stopped[*]:-nothing (none was running from slurm_up.sh)}"
