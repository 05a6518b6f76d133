"""The pretraining job, read top to bottom: build the trainer, then step, log, checkpoint, stop.

Exit status: 0 finished; 75 stopped on SIGUSR1/SIGTERM after a checkpoint (resume with
``--resume auto``); 1 stopped after too many non-finite losses in a row (the last good
checkpoint is untouched); 2 bad input (a setting, the data, a checkpoint or a model folder),
reported by ``dv3 pretrain`` on one line before the run directory is touched.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

from engine.config import RunConfig
from engine.errors import EXIT_NONFINITE, EXIT_PREEMPTED
from engine.train import checkpoint, distributed, metrics
from engine.train.logger import StepLogger
from engine.train.preemption import StopRequest
from engine.train.step import seed_step, train_step
from engine.train.trainer import Trainer

log = logging.getLogger("dv3")


def pretrain(config: RunConfig, stop: StopRequest | None = None) -> int:
    if stop is None:
        stop = StopRequest()
        stop.install()
    trainer = Trainer.build(config, stop)
    env, state, parallel, model = trainer.env, trainer.state, trainer.parallel, trainer.parallel.model
    train, every = config.train, config.log
    logger = StepLogger(
        Path(config.output_dir), is_main=env.is_main, world_size=env.world_size, device=parallel.device,
        total_steps=train.steps, global_batch=train.global_batch, seq_len=trainer.data.seq_len,
        step_flops=metrics.rtd_step_flops(model.config, model.generator_config, train.global_batch,
                                          trainer.data.seq_len,
                                          round(train.global_batch * trainer.data.seq_len * config.rtd.mask_prob)),
        peak_tflops=metrics.device_peak_tflops(every.peak_tflops))
    similarity_rows = metrics.embedding_sample_rows(model.config.vocab_size, every.embedding_sample_rows)
    if state.step == 0:
        logger.log_embedding_similarity(0, parallel.embedding_similarities(similarity_rows))
    else:  # metrics.jsonl says where the lines of this continuation start (steps may repeat after it)
        logger.log_event("resumed", state.step, checkpoint=str(trainer.resumed_from))
    progress = tqdm(total=train.steps, initial=state.step, desc="pretrain", unit="step", dynamic_ncols=True,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0,
                    disable=not (env.is_main and every.progress_bar))
    batches = iter(trainer.data.loader)
    exit_code = 0
    last_saved_step = state.step if trainer.resumed_from is not None else -1

    while state.step < train.steps:
        step = state.step
        seed_step(train.seed, step, env.rank)
        lrs = parallel.set_learning_rates(step)
        is_log_step = (step + 1) % every.interval == 0 or step + 1 == train.steps
        result = train_step(parallel, batches, trainer.accumulation, stop_requested=stop.signal_name is not None,
                            measure_group_norms=is_log_step, inject_nan=step in train.fail_loss_at_steps and env.rank == 0)
        state.step += 1
        state.loader = trainer.data.loader.state_dict()
        progress.update(1)
        if result.skipped:
            state.nonfinite_in_a_row += 1
            state.skipped_steps += 1
            log.warning("step %d: non-finite loss, update skipped (%d in a row, %d skipped in all)",
                        state.step, state.nonfinite_in_a_row, state.skipped_steps)
            logger.log_skipped(state.step, state.skipped_steps)
            if state.nonfinite_in_a_row >= train.max_nonfinite_in_a_row:
                log.error("stopping: %d non-finite losses in a row (train.max_nonfinite_in_a_row). The last good "
                          "checkpoint is intact; lower the lr, check the data, or resume from it with --resume auto",
                          state.nonfinite_in_a_row)
                exit_code = EXIT_NONFINITE
                break
        else:
            state.nonfinite_in_a_row = 0
            logger.add(result.losses, result.counts)
            if is_log_step:
                logger.log_step(state.step, lrs, result.group_grad_norms, result.clip)

        if state.step % every.embedding_similarity_interval == 0:
            logger.log_embedding_similarity(state.step, parallel.embedding_similarities(similarity_rows))
        stop_requested = result.stop_requested  # agreed by every rank in the step's one all-reduce
        periodic = state.step % config.checkpoint.interval == 0 or state.step == train.steps
        # During a run of non-finite losses no periodic checkpoint is written: pruning must never
        # push the last good checkpoint out while the run may be going bad.
        if (periodic and state.nonfinite_in_a_row == 0) or stop_requested:
            if trainer.save_checkpoint() is None:
                exit_code = EXIT_NONFINITE
                break
            last_saved_step = state.step
        if stop_requested:
            log.warning("stop requested (%s): checkpoint at step %d written; exiting with %d for a requeue",
                        stop.signal_name or "signal on another rank", state.step, EXIT_PREEMPTED)
            exit_code = EXIT_PREEMPTED
            break

    progress.close()
    logger.close()
    if exit_code == 0 and state.nonfinite_in_a_row > 0:
        log.error("finished %d steps, but the last %d were skipped (non-finite losses): they are not saved, and the "
                  "last good checkpoint is intact; resume from it with --resume auto and a lower lr, or check the data",
                  state.step, state.nonfinite_in_a_row)
        exit_code = EXIT_NONFINITE
    elif exit_code == 0 and last_saved_step != state.step and trainer.save_checkpoint() is None:
        exit_code = EXIT_NONFINITE
    if exit_code == 0 and env.is_main:
        log.info("finished %d steps; checkpoints in %s, TensorBoard logs in %s", state.step,
                 checkpoint.checkpoint_root(config.output_dir), Path(config.output_dir) / "tensorboard")
    parallel.engine.destroy()  # DeepSpeed's hooks and buffers go before the process group does
    distributed.shutdown()
    stop.ignore_further()
    return exit_code
