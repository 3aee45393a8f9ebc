#!/usr/bin/env bash
# A real SLURM cluster on this one machine, for trying and testing launcher's SLURM
# support: slurmctld plus NUM_NODES slurmd daemons (node1..nodeN, CPU only), all on
# 127.0.0.1, started directly (no systemd), as root.
#
#   scripts/local_slurm.sh start     install (Debian packages) if needed, configure, start; idempotent
#   scripts/local_slurm.sh status    sinfo and squeue
#   scripts/local_slurm.sh stop      cancel every job, stop the daemons (and munged, if this script started it)
#
# Settings (environment): LOCAL_SLURM_DIR (state, config, logs; default /tmp/launcher-slurm),
# NUM_NODES (2), CPUS_PER_NODE (4: more than the machine has, so that two jobs can share it),
# LOCAL_SLURM_PORT (slurmctld's port, 6817; node K listens on LOCAL_SLURM_PORT + 10 + K).
#
# Clients (sbatch, squeue, ...) read /etc/slurm/slurm.conf, which this script points at
# its own config when no other cluster owns that file; otherwise export
# SLURM_CONF=$LOCAL_SLURM_DIR/slurm.conf.
#
# The simulated node names do not resolve: jobs must meet at 127.0.0.1
# (export MASTER_ADDR=127.0.0.1 before sbatch).
#
# Timings chosen for tests: a requeued job becomes eligible again after the job
# credential expires (AuthInfo=cred_expire=10) and starts at the next scheduling pass
# (sched_interval=5), so a requeue cycle takes about 20 s (120 s+ with the defaults).
set -euo pipefail

STATE=${LOCAL_SLURM_DIR:-/tmp/launcher-slurm}
NUM_NODES=${NUM_NODES:-2}
CPUS_PER_NODE=${CPUS_PER_NODE:-4}
CTLD_PORT=${LOCAL_SLURM_PORT:-6817}
CONF=$STATE/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
MUNGE_SOCKET=/run/munge/munge.socket.2

log() { echo "local_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

export SLURM_CONF=$CONF
export PATH=$PATH:/usr/sbin:/sbin

install_packages() {
    local missing=()
    for tool in slurmctld slurmd sbatch munged; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; as root: apt-get install slurmctld slurmd slurm-client munge"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing slurmctld slurmd slurm-client munge"
    local pkgs=(slurmctld slurmd slurm-client munge)
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$STATE/apt.log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$STATE/apt.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$STATE/apt.log" 2>&1 \
            || { tail -n 20 "$STATE/apt.log" >&2; die "apt-get install failed (log: $STATE/apt.log)"; }
    fi
}

munge_ok() { munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
    if munge_ok; then return 0; fi
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    local user=munge
    id munge >/dev/null 2>&1 || user=root
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown "$user:" /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key && chmod 755 /run/munge
    if [ "$user" = munge ]; then
        runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    else
        munged --force --pid-file=/run/munge/munged.pid
    fi
    touch "$STATE/run/munged.ours"
    for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

write_conf() {
    local host
    host=$(hostname -s)
    {
        cat <<EOF
# Written by scripts/local_slurm.sh: a one-machine test cluster.
ClusterName=launcher
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# No cgroups in a container: processes are tracked by their parent chain.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# The nodes are what this file says they are, not what the machine has.
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
KillWait=5
# Finished jobs stay visible to scontrol show job (state, exit code, restarts) for 10 minutes.
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=120
# No slurmdbd: sacct does not work; completed jobs are appended to the jobcomp file.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
EOF
        for k in $(seq "$NUM_NODES"); do
            echo "NodeName=node$k NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((CTLD_PORT + 10 + k)) CPUs=$CPUS_PER_NODE RealMemory=1024 State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=node[1-$NUM_NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    } >"$CONF.new"
    mv "$CONF.new" "$CONF"
    # Point the clients' default config at ours, unless another cluster owns it.
    mkdir -p /etc/slurm
    if [ ! -e "$ETC_CONF" ] || [ "$(readlink "$ETC_CONF" 2>/dev/null)" = "$CONF" ] \
        || head -n1 "$ETC_CONF" 2>/dev/null | grep -q "scripts/local_slurm.sh"; then
        ln -sfn "$CONF" "$ETC_CONF"
    else
        log "$ETC_CONF belongs to another cluster: export SLURM_CONF=$CONF for the clients"
    fi
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# (scontrol retries for 60 s when the config file is missing: check it first)
ctld_up() { [ -f "$CONF" ] && timeout 10 scontrol ping 2>/dev/null | grep -q "is UP"; }

start() {
    mkdir -p "$STATE"/{ctld,spool,run,log}
    install_packages
    start_munge
    if ctld_up && pid_alive "$STATE/run/slurmctld.pid"; then
        log "slurmctld already running"
    else
        write_conf
        slurmctld -f "$CONF"
        for _ in $(seq 100); do ctld_up && break; sleep 0.2; done
        ctld_up || { tail -n 20 "$STATE/log/slurmctld.log" >&2; die "slurmctld did not come up"; }
    fi
    for k in $(seq "$NUM_NODES"); do
        if pid_alive "$STATE/run/slurmd-node$k.pid"; then continue; fi
        mkdir -p "$STATE/spool/node$k"
        slurmd -f "$CONF" -N "node$k"
    done
    # Nodes down from an earlier life (not responding) come back once they register.
    local ready=0
    for _ in $(seq 150); do
        local states
        states=$(sinfo -h -N -o "%t" 2>/dev/null | sort -u | tr '\n' ' ')
        if [ -n "$states" ] && ! echo "$states" | grep -qvE '^((idle|mix|alloc|comp)\*? ?)+$'; then ready=1; break; fi
        if echo "$states" | grep -qE 'down|drain'; then
            scontrol update nodename="node[1-$NUM_NODES]" state=resume 2>/dev/null || true
        fi
        sleep 0.2
    done
    [ "$ready" = 1 ] || { sinfo -N -l >&2; tail -n 20 "$STATE"/log/slurmd-node1.log >&2; die "nodes did not become ready"; }
    log "up: $NUM_NODES nodes, config $CONF, logs $STATE/log"
    sinfo
}

stop() {
    if [ -f "$CONF" ] && ctld_up; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for _ in $(seq 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
        fi
        scontrol shutdown >/dev/null 2>&1 || true
    fi
    local pidfiles=("$STATE"/run/slurmd-*.pid "$STATE/run/slurmctld.pid")
    for f in "${pidfiles[@]}"; do
        [ -s "$f" ] || continue
        local pid
        pid=$(cat "$f")
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then kill "$pid" 2>/dev/null || true; sleep 0.5; kill -9 "$pid" 2>/dev/null || true; fi
        rm -f "$f"
    done
    if [ -f "$STATE/run/munged.ours" ]; then
        if pid_alive /run/munge/munged.pid; then
            local pid
            pid=$(cat /run/munge/munged.pid)
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$STATE/run/munged.ours"
    fi
    log "stopped"
}

status() {
    if ! ctld_up; then log "not running"; return 1; fi
    sinfo
    squeue
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) stop; start ;;
    *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
