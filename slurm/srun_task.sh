#!/usr/bin/env bash
# The per-task launch wrapper: `srun slurm/srun_task.sh COMMAND [ARGS...]`.
#
# Runs inside every srun task and turns SLURM's view of the task into torch.distributed's:
#   RANK=$SLURM_PROCID  LOCAL_RANK=$SLURM_LOCALID  WORLD_SIZE=$SLURM_NTASKS
#   MASTER_ADDR = first host of the allocation (or DV3_MASTER_ADDR)
#   MASTER_PORT = derived from the job id (or DV3_MASTER_PORT), see common.sh
# These are computed here, in the task, because only the task knows its own SLURM_PROCID.
#
# It then runs COMMAND as a child and stays in front of it:
#   - USR1 and TERM are passed on to the child (INT as TERM) (the training process checkpoints on
#     USR1/TERM); without the trap bash would die on USR1 and leave the child behind;
#   - the child's exit status is written to $DV3_STATUS_DIR/rank-$RANK when DV3_STATUS_DIR is
#     set, so the batch script can tell "stopped for preemption" (75) from a crash even
#     when srun reports another status for the step (e.g. after --kill-on-bad-exit);
#   - the wrapper exits with the child's status.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[ -n "${SLURM_PROCID:-}" ] && [ -n "${SLURM_JOB_ID:-}" ] ||
  dv3_die 2 "srun_task.sh runs inside an srun task (SLURM_PROCID/SLURM_JOB_ID are not set)"
[ "$#" -gt 0 ] || dv3_die 2 "usage: srun slurm/srun_task.sh COMMAND [ARGS...]"

export RANK="$SLURM_PROCID"
export LOCAL_RANK="$SLURM_LOCALID"
export WORLD_SIZE="$SLURM_NTASKS"
MASTER_ADDR="$(dv3_master_addr)"
MASTER_PORT="$(dv3_master_port)"
export MASTER_ADDR MASTER_PORT
DV3_LOG_TAG="task $RANK/$WORLD_SIZE"

dv3_log "on ${SLURMD_NODENAME:-$(hostname -s)} local rank $LOCAL_RANK, master $MASTER_ADDR:$MASTER_PORT," \
  "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $*"

# The traps come first: a USR1 before them would kill this wrapper (USR1's default) and orphan
# the child. A signal that arrives before the child exists is held and passed on once it does.
child=
pending=
forward() {
  DV3_SIGNALLED=1
  if [ -n "$child" ]; then
    kill -s "$1" "$child" 2>/dev/null || true
  else
    pending=$1
  fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# A background child ignores INT (bash sets it so), so Ctrl-C on srun arrives as TERM.
trap 'forward TERM' INT

"$@" &
child=$!
[ -z "$pending" ] || kill -s "$pending" "$child" 2>/dev/null || true

dv3_wait "$child"
rc=$DV3_WAIT_RC
if [ -n "${DV3_STATUS_DIR:-}" ]; then
  echo "$rc" >"$DV3_STATUS_DIR/rank-$RANK" || dv3_log "could not write $DV3_STATUS_DIR/rank-$RANK"
fi
[ "$rc" = 0 ] || dv3_log "exited with status $rc"
exit "$rc"
