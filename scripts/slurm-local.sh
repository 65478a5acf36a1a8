#!/usr/bin/env bash
# A real, single-node Slurm on one Debian/Ubuntu machine, for trying and
# testing the batch scripts in slurm/ without a cluster.
#
#   bash scripts/slurm-local.sh start   # install if needed, start munged, slurmctld, slurmd
#   bash scripts/slurm-local.sh status  # the daemons this script started, and sinfo
#   bash scripts/slurm-local.sh stop    # stop those daemons (by process id)
#
# Needs root (the daemons run as root and the configuration lives in
# /etc/slurm and /etc/munge, where Slurm's and MUNGE's clients look for it).
# Everything else (state, spool, logs, process ids) goes under a scratch
# directory, FAPOOL_SLURM_DIR (default: $TMPDIR/fapool-slurm), so `stop`
# followed by removing that directory leaves only the installed packages and
# the two configuration files.
#
# `start` is idempotent: daemons already answering are left alone, and only
# the daemons this script started are recorded, so `stop` never touches a
# munged or Slurm that was running before.
set -euo pipefail

DIR="${FAPOOL_SLURM_DIR:-${TMPDIR:-/tmp}/fapool-slurm}"
CONF=/etc/slurm/slurm.conf
KEY=/etc/munge/munge.key
MARK="# Written by fapool scripts/slurm-local.sh: a single-node Slurm for testing."
# The short name is what slurmd reports for itself, so the node must be named so.
HOST="$(hostname -s)"

say() { echo "slurm-local: $*"; }
die() {
  echo "slurm-local: $*" >&2
  exit 1
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local need=()
  command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm)
  command -v munged >/dev/null 2>&1 || need+=(munge)
  ((${#need[@]})) || return 0
  command -v apt-get >/dev/null 2>&1 || die "no apt-get to install ${need[*]}"
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Wait for another package manager run instead of failing at once.
  local lock=(-o DPkg::Lock::Timeout=600)
  apt-get "${lock[@]}" update -qq
  apt-get "${lock[@]}" install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already answers"
    return 0
  fi
  if [ ! -s "$KEY" ]; then
    # A fresh key is fine: this node only talks to itself.
    install -d -o munge -g munge -m 700 /etc/munge
    dd if=/dev/urandom of="$KEY" bs=1024 count=1 status=none
    chown munge:munge "$KEY"
    chmod 400 "$KEY"
  fi
  # /run is a tmpfs: the socket directory disappears at every boot.
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 "$DIR/munge"
  # munged refuses to run as root; its log goes to the scratch directory.
  runuser -u munge -- munged --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log"
  for _ in $(seq 50); do
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
      cp "$DIR/munge/munged.pid" "$DIR/munged.pid"
      say "munged started (pid $(cat "$DIR/munged.pid"))"
      return 0
    fi
    sleep 0.1
  done
  die "munged did not start; see $DIR/munge/munged.log"
}

write_config() {
  if [ -e "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script; not replacing it"
  fi
  local mem
  # Leave a tenth of the memory to the system; a node that claims more than
  # it has is drained by slurmctld.
  mem=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" /etc/slurm
  cat >"$CONF.new" <<EOF
$MARK
ClusterName=fapool-local
SlurmctldHost=$HOST
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups: containers and minimal machines often lack a writable cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Ranks are started by srun --mpi=pmix or by mpirun; neither is the default.
MpiDefault=none
# A node that was down (e.g. after a restart of the daemons) comes back by itself.
ReturnToService=2
SchedulerType=sched/backfill
# Keep finished jobs visible to scontrol for a while (tests read their exit codes).
MinJobAge=600
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
NodeName=$HOST CPUs=$(nproc) RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$CONF.new" "$CONF"
}

start_daemon() {
  local name=$1
  if alive "$DIR/$name.pid"; then
    say "$name already running (pid $(cat "$DIR/$name.pid"))"
    return 0
  fi
  # Both daemons fork into the background and write their pid files (set in
  # slurm.conf) once they are up.
  rm -f "$DIR/$name.pid"
  "$name"
  for _ in $(seq 100); do
    if alive "$DIR/$name.pid"; then
      say "$name started (pid $(cat "$DIR/$name.pid"))"
      return 0
    fi
    sleep 0.1
  done
  die "$name did not start; see $DIR/log/$name.log"
}

wait_for_node() {
  local state
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    case "$state" in
      idle* | mixed* | allocated*)
        say "node $HOST is $state"
        return 0
        ;;
      drain* | down*)
        # Left drained by an earlier run (e.g. stopped with jobs on it).
        scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
        ;;
    esac
    sleep 1
  done
  die "node $HOST did not become idle (state: ${state:-unknown}); see $DIR/log/"
}

start() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (daemons and /etc/slurm, /etc/munge)"
  mkdir -p "$DIR"
  install_packages
  start_munge
  write_config
  start_daemon slurmctld
  start_daemon slurmd
  wait_for_node
}

stop() {
  local name pid
  # slurmd first, so it does not report its controller gone; munged last,
  # since both Slurm daemons authenticate through it while shutting down.
  for name in slurmd slurmctld munged; do
    [ -s "$DIR/$name.pid" ] || continue
    pid=$(cat "$DIR/$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid"
      for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      if kill -0 "$pid" 2>/dev/null; then
        kill -9 "$pid" 2>/dev/null || true
      fi
      say "$name stopped (pid $pid)"
    fi
    rm -f "$DIR/$name.pid"
  done
}

status() {
  local name
  for name in munged slurmctld slurmd; do
    if alive "$DIR/$name.pid"; then
      say "$name running (pid $(cat "$DIR/$name.pid"))"
    else
      say "$name not started by this script"
    fi
  done
  sinfo 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start|stop|status" ;;
esac
