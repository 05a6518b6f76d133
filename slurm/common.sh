# Shared by the sbatch templates and srun_task.sh (sourced, not run).
#
# The pieces every template needs and that must agree between the batch shell and the tasks:
# logging, the environment setup, the rendezvous address and port, and a wait that survives
# the signals SLURM sends for preemption.
#
# Environment read here (all optional):
#   DV3_HOME          the dv3 checkout (default: the folder above this file)
#   DV3_VENV          a virtual environment to put first on PATH (default: $DV3_HOME/.venv if present)
#   DV3_SETUP         a file to source before running, e.g. `module load cuda/12.4` lines
#   DV3_BIN           the dv3 command, word-split (default: dv3); e.g. "apptainer exec --nv dv3.sif dv3"
#   DV3_DEVICE        auto | gpu | cpu (default auto: gpu when SLURM gave this node GPUs)
#   DV3_MASTER_ADDR   rendezvous host (default: first host of the allocation)
#   DV3_MASTER_PORT   rendezvous port (default: derived from the job id, see dv3_master_port)
# MASTER_ADDR / MASTER_PORT inherited from the submitting shell are ignored on purpose: a
# stale value from an interactive torchrun is a classic cause of hangs at initialisation.

DV3_HOME="${DV3_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export DV3_HOME

dv3_log() {
  echo "[$(date '+%F %T')] ${DV3_LOG_TAG:-dv3}: $*" >&2
}

dv3_die() {  # dv3_die STATUS MESSAGE: a configuration error; never requeued
  local status=$1
  shift
  dv3_log "error: $*"
  exit "$status"
}

# The venv, the site setup file and the device mode; exported so srun's tasks inherit them.
dv3_setup_env() {
  if [ -n "${DV3_SETUP:-}" ]; then
    [ -r "$DV3_SETUP" ] || dv3_die 2 "DV3_SETUP=$DV3_SETUP is not a readable file"
    # shellcheck disable=SC1090
    source "$DV3_SETUP"
  fi
  local venv="${DV3_VENV:-}"
  if [ -z "$venv" ] && [ -x "$DV3_HOME/.venv/bin/python" ]; then
    venv="$DV3_HOME/.venv"
  fi
  if [ -n "$venv" ]; then
    [ -x "$venv/bin/python" ] || dv3_die 2 "DV3_VENV=$venv has no bin/python"
    export PATH="$venv/bin:$PATH"
    export VIRTUAL_ENV="$venv"
  fi
  read -r -a DV3_BIN_WORDS <<<"${DV3_BIN:-dv3}"
  command -v "${DV3_BIN_WORDS[0]}" >/dev/null ||
    dv3_die 2 "'${DV3_BIN_WORDS[0]}' not found; set DV3_VENV or DV3_BIN (PATH=$PATH)"

  DV3_DEVICE="${DV3_DEVICE:-auto}"
  if [ "$DV3_DEVICE" = auto ]; then
    if [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null; then DV3_DEVICE=gpu; else DV3_DEVICE=cpu; fi
  fi
  case "$DV3_DEVICE" in
    cpu)
      # DeepSpeed's CPU accelerator (gloo); must be set before deepspeed is imported.
      export DS_ACCELERATOR=cpu
      ;;
    gpu)
      # NCCL: quiet unless asked; fail fast on a dead peer instead of hanging forever.
      # Site-specific settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) pass through from the
      # submitting environment untouched.
      export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
      export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
      ;;
    *) dv3_die 2 "DV3_DEVICE must be auto, gpu or cpu, got '$DV3_DEVICE'" ;;
  esac
  export DV3_DEVICE
  # One thread per allocated CPU; torch otherwise starts one per core of the whole node.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
}

dv3_master_addr() {
  if [ -n "${DV3_MASTER_ADDR:-}" ]; then
    echo "$DV3_MASTER_ADDR"
    return
  fi
  # `scontrol show hostnames` expands the list locally: no call to slurmctld per task.
  local first
  # The timeout: scontrol retries for a minute when SLURM_CONF names a missing file.
  first=$(timeout 20 scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)
  if [ -z "$first" ]; then
    # scontrol without a readable slurm.conf: the first host of "prefix[07-09,12]suffix,..." by hand.
    if [[ $SLURM_JOB_NODELIST =~ ^([^,\[]+)\[([0-9]+)[^]]*\]([^,]*) ]]; then
      first="${BASH_REMATCH[1]}${BASH_REMATCH[2]}${BASH_REMATCH[3]}"
    else
      first="${SLURM_JOB_NODELIST%%,*}"
    fi
  fi
  echo "$first"
}

# A port from the job id, so concurrent jobs sharing a first node do not collide; the restart
# count moves it on after a requeue, in case a process of the previous start still holds it.
# Range 10000-29999: below Linux's ephemeral range (32768+), where outgoing connections take
# their ports.
dv3_master_port() {
  if [ -n "${DV3_MASTER_PORT:-}" ]; then
    echo "$DV3_MASTER_PORT"
  else
    echo $((10000 + (SLURM_JOB_ID + 1009 * ${SLURM_RESTART_COUNT:-0}) % 20000))
  fi
}

# dv3_wait PID: wait until PID exits, even when trapped signals interrupt `wait`; the exit
# status is left in DV3_WAIT_RC. Traps set DV3_SIGNALLED=1 so an interrupted wait (status
# above 128) is told apart from the child's own status.
dv3_wait() {
  local pid=$1 rc
  while :; do
    DV3_SIGNALLED=0
    wait "$pid"
    rc=$?
    if [ "$DV3_SIGNALLED" = 1 ] && [ "$rc" -gt 128 ]; then
      if kill -0 "$pid" 2>/dev/null; then
        continue
      fi
      # It exited while the trap ran; bash kept its status for one more `wait`.
      wait "$pid"
      local again=$?
      [ "$again" = 127 ] || rc=$again
    fi
    break
  done
  DV3_WAIT_RC=$rc
}

# How a pretrain step's tasks ended, from the statuses slurm/srun_task.sh wrote to DIR/rank-<r>.
# dv3_task_verdict DIR NTASKS sets DV3_VERDICT and DV3_RANK_STATUSES ("rank 0: 1, rank 1: 137
# (SIGKILL)"). The rule, in this order (docs/cluster.md, "A crashed rank"):
#   preempted  some rank exited 75: it checkpointed on SIGUSR1/SIGTERM (all ranks agree on it);
#              or was killed by SIGUSR1 (138), which only ever asks for a stop: it came while the
#              rank was starting, before its handler was installed, and there was nothing to save
#   bad-input  some rank exited 2: a setting, the data or a checkpoint was refused; a retry would
#              be refused the same way
#   crashed    some rank was killed by a signal other than TERM (137 SIGKILL: the OOM killer, a
#              fault, a person; 134 SIGABRT: NCCL's watchdog; 139 SIGSEGV, 135 SIGBUS), or never
#              reported (its task or its node was killed): what a restart can cure. The other
#              ranks then fail with a gloo/NCCL error (exit 1); that does not make it a stop.
#   stopped    every rank reported, none crashed: pretrain stopped itself, e.g. exit 1 on every
#              rank (too many non-finite losses, or the same error everywhere); 143 is a rank that
#              srun's --kill-on-bad-exit ended while it was exiting anyway. A retry would repeat it.
dv3_task_verdict() {
  local dir=$1 ntasks=$2 rank status signal_name
  local preempted=0 bad_input=0 crashed=0
  DV3_RANK_STATUSES=""
  for ((rank = 0; rank < ntasks; rank++)); do
    status=$(cat "$dir/rank-$rank" 2>/dev/null) || status=""
    [ -n "$DV3_RANK_STATUSES" ] && DV3_RANK_STATUSES+=", "
    if ! [[ $status =~ ^[0-9]+$ ]]; then
      DV3_RANK_STATUSES+="rank $rank: no status"
      crashed=1
      continue
    fi
    DV3_RANK_STATUSES+="rank $rank: $status"
    if [ "$status" -gt 128 ]; then
      signal_name=$(kill -l "$((status - 128))" 2>/dev/null) || signal_name="signal $((status - 128))"
      DV3_RANK_STATUSES+=" (SIG$signal_name)"
      [ "$status" != 143 ] && [ "$status" != 138 ] && crashed=1
    fi
    [ "$status" = 75 ] || [ "$status" = 138 ] && preempted=1
    [ "$status" = 2 ] && bad_input=1
  done
  if [ "$preempted" = 1 ]; then
    DV3_VERDICT=preempted
  elif [ "$bad_input" = 1 ]; then
    DV3_VERDICT=bad-input
  elif [ "$crashed" = 1 ]; then
    DV3_VERDICT=crashed
  else
    DV3_VERDICT=stopped
  fi
}

# dv3_newest_checkpoint RUN_DIR: the tag of the newest complete checkpoint (step%08d sorts by
# step), or "none"; a failure restart that ends with a newer one has made progress.
dv3_newest_checkpoint() {
  local marker newest=none
  for marker in "$1"/checkpoints/step*/COMPLETE; do
    [ -e "$marker" ] || continue
    newest=$(basename "$(dirname "$marker")")
  done
  echo "$newest"
}

# dv3_failure_restarts FILE JOB CHECKPOINT: how many failure restarts FILE records for JOB while
# CHECKPOINT was its newest checkpoint, i.e. in a row without progress.
dv3_failure_restarts() {
  [ -s "$1" ] || { echo 0; return; }
  grep -F " job=$2 " "$1" | grep -F " checkpoint=$3 " | grep -cF " action=requeue" || true
}
