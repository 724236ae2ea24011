#!/usr/bin/env bash
# A private single-node SLURM (Debian's Slurm 22.05 + munge) for tests, CI and the laptop.
#
#   scripts/slurm_local.sh start [DIR]    # prints `export SLURM_CONF=DIR/etc/slurm.conf` on stdout
#   scripts/slurm_local.sh stop  [DIR]    # stops only the daemons this script started (PID files in DIR/run)
#   scripts/slurm_local.sh status [DIR]
#
# DIR defaults to $CB_SLURM_DIR, then /tmp/cb_slurm. Use it as: eval "$(scripts/slurm_local.sh start)".
# Knobs (environment): CB_SLURM_GPUS (fake GPUs on the node, default 1), CB_SLURM_CPUS (schedulable CPUs,
# default max(nproc, 32): the node is oversubscribed on purpose so many small jobs can run at once),
# CB_SLURM_PARTITION (default "debug"), CB_SLURM_NO_INSTALL=1 (never call apt-get).
# Runs as root, without systemd or cgroups (proctrack/linuxproc, task/none).
set -euo pipefail

cmd="${1:-}"
dir="${2:-${CB_SLURM_DIR:-/tmp/cb_slurm}}"
log() { echo "slurm_local: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

case "$cmd" in start|stop|status) ;; *) echo "usage: $0 start|stop|status [DIR]" >&2; exit 2 ;; esac
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
conf="$dir/etc/slurm.conf"
run="$dir/run"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  command -v munged >/dev/null 2>&1 || missing+=(munge)
  command -v slurmctld >/dev/null 2>&1 || missing+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || missing+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || missing+=(slurm-client)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "${CB_SLURM_NO_INSTALL:-0}" = 1 ] && die "missing packages: ${missing[*]} (CB_SLURM_NO_INSTALL=1)"
  [ "$(id -u)" = 0 ] || die "missing packages: ${missing[*]}; run as root to install them"
  command -v apt-get >/dev/null 2>&1 || die "missing packages: ${missing[*]} and no apt-get"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d keeps the packages' own service scripts from starting system daemons.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1; fi
  { apt-get install -y -qq "${missing[@]}" >"$dir/apt.log" 2>&1 \
      || { apt-get update -qq >>"$dir/apt.log" 2>&1 && apt-get install -y -qq "${missing[@]}" >>"$dir/apt.log" 2>&1; }; } \
    || { [ $created_policy = 1 ] && rm -f "$policy"; die "apt-get install failed, see $dir/apt.log"; }
  [ $created_policy = 1 ] && rm -f "$policy"
  return 0
}

free_port() {
  python3 - <<'EOF'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
EOF
}

write_config() {
  mkdir -p "$dir"/{etc,run,log,state,spool,munge-key,munge-lib}
  mkdir -p "$dir/munge-sock"
  chmod 0755 "$dir" "$dir/munge-sock"       # munged refuses a socket folder that is not world-executable
  chmod 0700 "$dir/munge-key" "$dir/munge-lib"
  if [ ! -s "$dir/munge-key/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge-key/munge.key" bs=1024 count=1 status=none
  fi
  chmod 0400 "$dir/munge-key/munge.key"

  local ncpu mem cpus gpus part ctld_port slurmd_port
  ncpu="$(nproc)"
  mem="$(awk '/MemTotal/ {printf "%d", $2/1024*0.9}' /proc/meminfo)"
  cpus="${CB_SLURM_CPUS:-$(( ncpu > 32 ? ncpu : 32 ))}"
  gpus="${CB_SLURM_GPUS:-1}"
  part="${CB_SLURM_PARTITION:-debug}"
  ctld_port="$(free_port)"; slurmd_port="$(free_port)"
  while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port="$(free_port)"; done

  local gres_line="" node_gres=""
  if [ "$gpus" -gt 0 ]; then
    node_gres="Gres=gpu:$gpus"
    # Fake devices: without File= the node drains. One file per GPU.
    if [ "$gpus" = 1 ]; then
      gres_line="NodeName=localhost Name=gpu File=/dev/null"
    else
      mkdir -p "$dir/dev"
      local i; for ((i = 0; i < gpus; i++)); do : >"$dir/dev/fakegpu$i"; done
      gres_line="NodeName=localhost Name=gpu File=$dir/dev/fakegpu[0-$((gpus - 1))]"
    fi
  fi

  cat >"$conf" <<EOF
# Written by scripts/slurm_local.sh: a private single-node cluster.
ClusterName=cblocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge-sock/munge.socket.2
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd.%n
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
SchedulerParameters=batch_sched_delay=0
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=300
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem $node_gres State=UNKNOWN
PartitionName=$part Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$dir/etc/gres.conf" <<EOF
AutoDetect=off
$gres_line
EOF
  echo "# unused: proctrack/linuxproc and task/none need no cgroups" >"$dir/etc/cgroup.conf"
  : >"$dir/log/jobcomp.txt"   # job ids restart at 1 on a fresh cluster: forget old records
}

wait_idle() {
  local i state
  for ((i = 0; i < 150; i++)); do
    state="$(SLURM_CONF="$conf" sinfo -h -N -n localhost -o '%T' 2>/dev/null || true)"
    case "$state" in
      idle|mixed|allocated) return 0 ;;
      *drain*|*down*)
        if [ $i -gt 20 ]; then
          SLURM_CONF="$conf" scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
        fi ;;
    esac
    sleep 0.2
  done
  SLURM_CONF="$conf" sinfo -N -l >&2 || true
  SLURM_CONF="$conf" scontrol show node localhost >&2 || true
  die "node did not become idle (state: ${state:-none}); logs in $dir/log"
}

do_start() {
  install_packages
  if alive "$run/slurmctld.pid" && alive "$run/slurmd.pid" && alive "$run/munged.pid" && [ -f "$conf" ]; then
    log "already running in $dir"
    wait_idle
    echo "export SLURM_CONF=$conf"
    return 0
  fi
  do_stop quiet
  write_config
  munged --force \
    --socket="$dir/munge-sock/munge.socket.2" \
    --key-file="$dir/munge-key/munge.key" \
    --pid-file="$run/munged.pid" \
    --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge-lib/munged.seed" \
    || die "munged failed to start; see $dir/log/munged.log"
  local i
  for ((i = 0; i < 50; i++)); do [ -S "$dir/munge-sock/munge.socket.2" ] && break; sleep 0.1; done
  [ -S "$dir/munge-sock/munge.socket.2" ] || die "munge socket did not appear"
  export SLURM_CONF="$conf"
  # -c: clear any saved state (a fresh cluster each start).
  slurmctld -c -f "$conf" || die "slurmctld failed; see $dir/log/slurmctld.log"
  slurmd -N localhost -f "$conf" || die "slurmd failed; see $dir/log/slurmd.log"
  for ((i = 0; i < 50; i++)); do alive "$run/slurmctld.pid" && alive "$run/slurmd.pid" && break; sleep 0.1; done
  alive "$run/slurmctld.pid" || die "slurmctld is not running; see $dir/log/slurmctld.log"
  alive "$run/slurmd.pid" || die "slurmd is not running; see $dir/log/slurmd.log"
  wait_idle
  log "cluster up in $dir (sinfo: $(sinfo -h -o '%P %a %D %T %G' | head -1))"
  echo "export SLURM_CONF=$conf"
}

stop_pids() {  # stop_pids PIDFILE...: TERM all at once, wait up to 5 s, then KILL stragglers
  local pf pid i pids=() left
  for pf in "$@"; do
    [ -f "$pf" ] || continue
    pid="$(cat "$pf" 2>/dev/null || true)"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" 2>/dev/null || true; pids+=("$pid"); fi
  done
  for ((i = 0; i < 100; i++)); do
    left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    [ $left = 0 ] && break
    sleep 0.05
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then log "pid $pid ignored TERM; killing"; kill -KILL "$pid" 2>/dev/null || true; fi
  done
  rm -f "$@"
}

do_stop() {
  if [ -f "$conf" ] && alive "$run/slurmctld.pid"; then
    # Cancel this cluster's jobs so no slurmstepd/job process outlives the daemons.
    local jobs i
    jobs="$(SLURM_CONF="$conf" squeue -h -o %i 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      SLURM_CONF="$conf" scancel $jobs 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        [ -z "$(SLURM_CONF="$conf" squeue -h -o %i 2>/dev/null || true)" ] && break; sleep 0.2
      done
    fi
  fi
  stop_pids "$run/slurmd.pid" "$run/slurmctld.pid"
  stop_pids "$run/munged.pid"
  [ "${1:-}" = quiet ] || log "stopped daemons in $dir"
}

do_status() {
  local rc=0 d
  for d in munged slurmctld slurmd; do
    if alive "$run/$d.pid"; then echo "$d: running (pid $(cat "$run/$d.pid"))"; else echo "$d: stopped"; rc=1; fi
  done
  if [ $rc = 0 ]; then SLURM_CONF="$conf" sinfo -N -o '%N %P %T %c %m %G' || rc=1; fi
  return $rc
}

case "$cmd" in
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
esac
