#!/usr/bin/env bash
# A real SLURM cluster with two virtual nodes on this one machine, for dv3's tests and for
# anyone without a cluster (DESIGN.md section 7).
#
#   scripts/local_slurm.sh start     # idempotent; returns once `sinfo` shows both nodes idle
#   scripts/local_slurm.sh status    # what is running, the nodes, the queue
#   scripts/local_slurm.sh stop      # cancels all jobs and stops every daemon it started
#
# Then, in every shell that talks to it:   export SLURM_CONF=<scratch>/slurm.conf
# (`start` and `status` print that line; `eval "$(scripts/local_slurm.sh env)"` sets it.)
#
# Needs root (slurmd runs jobs as any user; munged is started as the `munge` user). When
# slurm-wlm or munge is missing and apt-get exists, `start` installs them.
#
# Environment (all optional):
#   DV3_SLURM_DIR      scratch folder for config, state, spool, logs   (default /tmp/dv3-slurm)
#   DV3_SLURM_PORT     slurmctld port; the two slurmd use the next two (default 16817)
#   DV3_SLURM_CPUS     CPUs each virtual node offers                   (default: this machine's count)
#   DV3_SLURM_TIMEOUT  seconds `start` waits for both nodes to be idle (default 60)
#
# Both virtual nodes share this machine's cores: with the default each offers all of them, so
# a 2-node job oversubscribes the machine 2x, which is what a functional test wants.
set -euo pipefail

DIR="${DV3_SLURM_DIR:-/tmp/dv3-slurm}"
PORT="${DV3_SLURM_PORT:-16817}"
CPUS="${DV3_SLURM_CPUS:-$(nproc)}"
TIMEOUT="${DV3_SLURM_TIMEOUT:-60}"
NODES=(n1 n2)  # must match NodeName=n[1-2] in write_config
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

say() { echo "local_slurm: $*"; }
die() { echo "local_slurm: error: $*" >&2; exit 1; }

pid_alive() {  # pid_alive FILE: the pid written in FILE names a live process
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get; install slurm-wlm and munge"
  say "installing slurm-wlm and munge (missing: ${missing[*]})"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge
}

start_munge() {
  if munge_works; then
    return 0
  fi
  getent passwd munge >/dev/null || die "no 'munge' user; reinstall the munge package"
  # munged refuses to run unless its folders belong to it and are not writable by others.
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /etc/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    say "creating /etc/munge/munge.key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  # --force: a socket left by a munged that died is stale, not in use.
  if command -v runuser >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --force
  else
    su -s /bin/sh munge -c "/usr/sbin/munged --force"
  fi
  for _ in $(seq 50); do
    munge_works && break
    sleep 0.1
  done
  munge_works || die "munged did not start; see /var/log/munge/munged.log"
  # Remember that this script started it, so `stop` stops it and nothing else.
  cp /run/munge/munged.pid "$DIR/run/munged.pid"
}

ensure_hosts() {
  local name
  for name in "${NODES[@]}"; do
    if ! getent hosts "$name" >/dev/null; then
      say "adding '127.0.0.1 $name' to /etc/hosts"
      echo "127.0.0.1 $name  # dv3 local SLURM virtual node" >>/etc/hosts
    fi
  done
}

write_config() {
  local mem_mb node_mb
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
  node_mb=$((mem_mb / ${#NODES[@]}))  # below the real size, so slurmd never drains a node for it
  cat >"$CONF" <<EOF
# Written by scripts/local_slurm.sh: two virtual nodes on $(hostname -s). Regenerated on start.
ClusterName=dv3local
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Also how long a requeued job waits before it may start again (default 120 s): short here so
# preemption tests do not sit idle. Step launches on this one machine take well under a second.
AuthInfo=cred_expire=15
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# Each virtual node's own temporary folder: srun --mpi=pmix makes its client folder under TmpFS,
# named by job and step only, so with a shared /tmp the second node's step fails ("File exists").
TmpFS=$DIR/tmp/%n
# No cgroups: the virtual nodes share one kernel, so processes are tracked by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every few seconds (default 60/30 s), so a requeued job whose wait is over
# starts promptly.
SchedulerParameters=sched_interval=3,bf_interval=5
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
# Finished jobs stay visible to \`scontrol show job\` this long (there is no accounting database).
MinJobAge=600
# One slurmd per virtual node (slurmd -N n1), each on its own port of 127.0.0.1.
NodeName=n[1-2] NodeAddr=127.0.0.1 Port=$((PORT + 1))-$((PORT + 2)) CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$node_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

nodes_idle() {  # all virtual nodes report idle (or mixed/allocated: they are up and serving)
  local states
  states=$(sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  local name
  for name in "${NODES[@]}"; do
    echo "$states" | grep -Eq "^$name (idle|mix|alloc)\$" || return 1
  done
}

cmd_start() {
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd launches jobs as their users; munged runs as 'munge')"
  install_packages
  mkdir -p "$DIR/run" "$DIR/log" "$DIR/state"
  local name
  for name in "${NODES[@]}"; do mkdir -p "$DIR/spool/$name" "$DIR/tmp/$name"; done

  local running=0
  pid_alive "$DIR/run/slurmctld.pid" && running=1
  if [ "$running" = 0 ]; then
    # Nothing of ours is up: start from a clean configuration.
    write_config
  fi
  start_munge
  ensure_hosts

  if ! pid_alive "$DIR/run/slurmctld.pid"; then
    # -c: a cold start; jobs of an earlier session are forgotten, not resumed.
    slurmctld -c
  fi
  for name in "${NODES[@]}"; do
    if ! pid_alive "$DIR/run/slurmd-$name.pid"; then
      slurmd -N "$name"
    fi
  done

  local deadline=$((SECONDS + TIMEOUT))
  until nodes_idle; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      sinfo -N -l >&2 || true
      tail -n 20 "$DIR/log/slurmctld.log" "$DIR"/log/slurmd-*.log >&2 || true
      die "nodes not idle after ${TIMEOUT}s"
    fi
    sleep 0.5
  done
  say "up: ${NODES[*]} idle ($CPUS CPUs each), logs in $DIR/log"
  echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
  [ -f "$CONF" ] || { say "nothing to stop ($CONF does not exist)"; return 0; }
  local pidfile
  if pid_alive "$DIR/run/slurmctld.pid"; then
    # Cancel every job first so no slurmstepd or job process outlives the daemons.
    local jobs
    jobs=$(squeue -h -o '%A' 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      say "cancelling jobs: $(echo $jobs)"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      local deadline=$((SECONDS + 60))
      while [ -n "$(squeue -h -o '%A' 2>/dev/null || true)" ] && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.5
      done
    fi
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  # Whatever `scontrol shutdown` did not stop, stop by the pids this script's daemons wrote.
  for pidfile in "$DIR"/run/slurmctld.pid "$DIR"/run/slurmd-*.pid; do
    [ -e "$pidfile" ] || continue
    stop_pid "$pidfile"
  done
  if [ -e "$DIR/run/munged.pid" ]; then
    stop_pid "$DIR/run/munged.pid"
  fi
  say "stopped"
}

stop_pid() {  # stop_pid FILE: TERM the pid in FILE, KILL it after 10 s, remove FILE
  local pid
  pid=$(cat "$1" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "pid $pid ($(basename "$1" .pid)) ignored TERM; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$1"
}

cmd_status() {
  local up=0 name
  if pid_alive "$DIR/run/slurmctld.pid"; then
    say "slurmctld running (pid $(cat "$DIR/run/slurmctld.pid"))"
    up=1
  else
    say "slurmctld not running"
  fi
  for name in "${NODES[@]}"; do
    if pid_alive "$DIR/run/slurmd-$name.pid"; then
      say "slurmd $name running (pid $(cat "$DIR/run/slurmd-$name.pid"))"
    else
      say "slurmd $name not running"
    fi
  done
  if munge_works; then say "munge: working"; else say "munge: not working"; fi
  if [ "$up" = 1 ]; then
    sinfo -N -o '%N %P %t %c' || true
    squeue || true
    echo "export SLURM_CONF=$CONF"
  else
    return 3  # like `systemctl status`: not running
  fi
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
