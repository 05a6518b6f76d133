"""The pretraining job: RTD with GDES under DeepSpeed, read top to bottom.

    config -> world size check -> DeepSpeed config -> resume point -> process group -> data
    (the saved loader state checked against it) -> model -> ZeRO-3 external parameters
    -> named optimizer groups -> deepspeed.initialize -> resume
    -> for each step: seed, lr, micro-batches (forward, backward), step, log, checkpoint

Exit status: 0 finished; 75 stopped on SIGUSR1/SIGTERM after a checkpoint (resume with
``--resume auto``); 1 stopped after too many non-finite losses in a row (the last good
checkpoint is untouched); 2 bad input (a setting, the data, a checkpoint or a model folder),
reported by ``dv3 pretrain`` on one line before the run directory is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_pipeline.errors import DataPipelineError
from data_pipeline.masking import MaskingConfig
from engine import checkpoint, distributed, metrics
from engine.errors import EXIT_PREEMPTED
from engine.optim import (
    WarmupLinearSchedule,
    apply_group_settings,
    build_param_groups,
    group_settings,
    restore_group_names,
)
from engine.rtd import RTDConfig, RTDModel, rtd_statistics
from engine.run_config import ConfigError, RunConfig, resolve_repo_path

log = logging.getLogger("dv3")

EXIT_NONFINITE = 1
COUNT_NAMES = ("masked", "masked_correct", "tokens", "replaced", "predicted_replaced", "true_positive", "rtd_correct")


class StopRequest:
    """Set by SIGUSR1/SIGTERM; acted on at the next step boundary, by all ranks together."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def install(self) -> None:
        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:  # only sets a flag: no I/O in a signal handler
        self.signal_name = signal.Signals(signum).name


def setup_logging(rank: int) -> None:
    """Rank 0 talks; other ranks only report warnings and errors."""
    # DeepSpeed still calls collectives that this torch deprecates, warning at every step on every rank.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [dv3 rank {rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_deepspeed_config(config: RunConfig, accumulation: int) -> dict:
    """The DeepSpeed config file, with dv3's batch, clipping and optimizer settings filled in.

    A value the file already sets to something else is an error, not a silent override.
    """
    path = resolve_repo_path(config.train.deepspeed_config)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"train.deepspeed_config: cannot read {path}: {error}") from error
    if "scheduler" in data:
        raise ConfigError(f"{path}: remove the 'scheduler' section: dv3 schedules each parameter group's lr itself")
    ours = {
        "train_micro_batch_size_per_gpu": config.train.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": config.train.global_batch,
        "gradient_clipping": config.optim.grad_clip,
    }
    for key, value in ours.items():
        if key in data and data[key] != value:
            raise ConfigError(
                f"{path}: {key}={data[key]} disagrees with the run configuration ({value}); "
                "set batch sizes and clipping in the dv3 config (train.*, optim.grad_clip) and remove them here"
            )
        data[key] = value
    optimizer = data.setdefault("optimizer", {"type": "AdamW", "params": {}})
    optimizer.setdefault("params", {}).update(
        lr=config.optim.lr, betas=[config.optim.beta1, config.optim.beta2], eps=config.optim.eps,
        weight_decay=config.optim.weight_decay,
    )
    if not torch.cuda.is_available() and data.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 does not run on CPU; use bf16 or fp32 (ds_configs/cpu.json)")
    return data


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def seed_step(seed: int, step: int, rank: int) -> None:
    """Every step's randomness (dropout, sampling) is a function of (seed, step, rank).

    This makes the RNG state at any step boundary part of every checkpoint by construction:
    a resumed run continues with exactly the numbers an uninterrupted run would draw.
    """
    derived = (seed * 1_000_003 + step) * 65_537 + rank
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


@contextlib.contextmanager
def bad_input(what: str):
    """Report an error in loading a user's file (a checkpoint, a HF folder, the loader state)
    as a ``ConfigError`` naming ``what``: ``dv3 pretrain`` prints one line and exits 2."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, OSError, DataPipelineError) as error:
        raise ConfigError(f"{what}: {error}") from error


def build_model(config: RunConfig, vocab_size: int, mask_token_id: int) -> RTDModel:
    encoder_config = config.encoder_config().replace(vocab_size=config.model.vocab_size or vocab_size)
    if encoder_config.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size={encoder_config.vocab_size} is smaller than the data's vocabulary ({vocab_size})")
    rtd = RTDConfig(
        sharing=config.rtd.sharing, rtd_lambda=config.rtd.rtd_lambda, temperature=config.rtd.temperature,
        generator_layers=config.rtd.generator_layers, enhanced_mask_decoder=config.rtd.enhanced_mask_decoder,
        masking=MaskingConfig(config.rtd.masking, config.rtd.mask_prob), mask_token_id=mask_token_id,
    )
    model = RTDModel(encoder_config, rtd)
    if config.model.init_from:
        from engine.init_from_hf import initialize_from_hf

        with bad_input("model.init_from"):
            initialize_from_hf(model, config.model.init_from, config.model.init_generator_from)
    return model


def group_gradient_norms(group_members: dict[str, list[torch.nn.Parameter]], stage: int) -> dict[str, float]:
    """Gradient L2 norm per named group (collective; call after backward, before step)."""
    from deepspeed.utils import safe_get_full_grad, safe_get_local_grad

    squares = []
    for members in group_members.values():
        total = torch.zeros((), dtype=torch.float64)
        for parameter in members:
            grad = safe_get_local_grad(parameter) if stage == 3 else safe_get_full_grad(parameter)
            if grad is not None:
                total += grad.detach().double().pow(2).sum().cpu()
        squares.append(total)
    stacked = torch.stack(squares)
    if stage == 3 and torch.distributed.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        stacked = stacked.to(device)
        torch.distributed.all_reduce(stacked)
    return {name: math.sqrt(float(value)) for name, value in zip(group_members, stacked.cpu(), strict=True)}


def embedding_similarities(model: RTDModel, rows: torch.Tensor, stage: int) -> dict[str, float]:
    """Table 1 statistic for E_G, E_D and (GDES) E_Delta; collective under ZeRO-3."""
    import deepspeed

    parameters = model.embedding_parameters()
    with deepspeed.zero.GatheredParameters(list(parameters.values()), enabled=stage == 3):
        result = {name: metrics.average_pairwise_cosine(p, rows) for name, p in parameters.items()}
        if "E_Delta" in parameters:
            combined = parameters["E_G"].detach().float() + parameters["E_Delta"].detach().float()
            result["E_D"] = metrics.average_pairwise_cosine(combined, rows)
    return result


@dataclass
class TrainState:
    step: int = 0
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    loader: dict = field(default_factory=dict)


def pretrain(config: RunConfig) -> int:
    config.validate()
    env = distributed.discover()
    accumulation = config.gradient_accumulation_steps(env.world_size)  # before any process group
    ds_config = build_deepspeed_config(config, accumulation)
    with bad_input("resume"):
        resume_from = checkpoint.resolve_resume(config.resume, config.output_dir)
        saved_state = checkpoint.read_state(resume_from) if resume_from is not None else None
    if (saved_state is not None and not saved_state.get("universal") and saved_state.get("zero_stage", 0) > 0
            and saved_state.get("world_size", env.world_size) != env.world_size):
        raise ConfigError(f"resume: {resume_from} was saved by {saved_state['world_size']} ranks under ZeRO stage "
                          f"{saved_state['zero_stage']}; to resume on {env.world_size}, convert it first: "
                          f"dv3 ckpt universal --checkpoint {resume_from}")
    stage = zero_stage(ds_config)

    setup_logging(env.rank)
    distributed.init_process_group(env)
    import deepspeed

    # Every rank resolved `--resume` on its own; if the folder changed in between (a lingering
    # process of an earlier job still writing), they could load different steps and then wait
    # on each other forever. Rank 0's choice is everyone's.
    agreed = distributed.rank0_value(resume_from)
    if agreed != resume_from:
        log.warning("rank %d resolved resume=%s to %s, rank 0 to %s: using rank 0's", env.rank, config.resume,
                    resume_from, agreed)
        resume_from = agreed
        with bad_input("resume"):
            saved_state = checkpoint.read_state(resume_from) if resume_from is not None else None
    if saved_state is not None and saved_state.get("universal"):
        ds_config.setdefault("checkpoint", {})["load_universal"] = True

    from engine.data import open_training_data

    output_dir = Path(config.output_dir)
    stop = StopRequest()
    stop.install()

    # -- data ------------------------------------------------------------------------------------
    data = open_training_data(config, rank=env.rank, world_size=env.world_size)
    log.info("data: %s", data.describe())
    if saved_state is not None:  # refuse other data or another seed now, before any model is built
        with bad_input(f"resume from {resume_from}: the data loader's state (resume with the run's own "
                       "data and train.seed, or start a new run)"):
            data.loader.load_state_dict(saved_state["loader"])
    if env.is_main:  # only once the data and the resume point are known good: a refused run changes nothing
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run_config.json").write_text(json.dumps(config.to_dict(), indent=2))

    # -- model, ZeRO-3 wiring, optimizer groups ---------------------------------------------------
    seed_step(config.train.seed, 0, 0)  # identical initial weights on every rank
    model = build_model(config, data.vocab_size, data.mask_token_id)
    if stage == 3:
        for module, parameter in model.external_parameter_uses():
            deepspeed.zero.register_external_parameter(module, parameter)
    param_groups = build_param_groups(model, config.optim)
    # The model's parameters per group, kept apart: DeepSpeed's optimizer rewrites the groups'
    # "params" (to flat fp32 partitions) and a checkpoint load replaces the group dicts.
    group_members = {group["name"]: list(group["params"]) for group in param_groups}
    settings = group_settings(config.optim)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config)
    schedule = WarmupLinearSchedule(config.train.steps, config.optim.warmup_steps, config.optim.min_lr_ratio)
    betas = (config.optim.beta1, config.optim.beta2)
    # What export needs to rebuild the model without the data or the run config's presets.
    description = {"encoder_config": model.config.to_dict(), "rtd_config": dataclasses.asdict(model.rtd),
                   "tokenizer": str(data.tokenizer_path)}
    log.info("model: %s discriminator %d layers, generator %d layers, %.1fM parameters; sharing=%s; ZeRO stage %d; "
             "%d rank(s) x micro-batch %d x accumulation %d = global batch %d",
             config.model.init_from or config.model.preset, model.config.num_hidden_layers, model.generator_config.num_hidden_layers,
             sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()) / 1e6,
             config.rtd.sharing, stage, env.world_size, config.train.micro_batch, accumulation,
             config.train.global_batch)

    # -- resume ------------------------------------------------------------------------------------
    state = TrainState()
    if resume_from is not None:
        group_names = [group["name"] for group in engine.optimizer.param_groups]
        checkpoint.load(engine, resume_from)
        restore_group_names(engine.optimizer, group_names)
        state = TrainState(step=saved_state["step"], nonfinite_in_a_row=saved_state.get("nonfinite_in_a_row", 0),
                           skipped_steps=saved_state.get("skipped_steps", 0), loader=saved_state["loader"])
        log.info("resumed from %s at step %d (saved with world size %d)", resume_from, state.step,
                 saved_state.get("world_size", -1))
        if config.resume != "auto" and env.is_main:
            moved = checkpoint.set_aside_newer(checkpoint.checkpoint_root(output_dir), state.step)
            if moved is not None:
                log.warning("checkpoints after step %d belong to the continuation abandoned by this resume: "
                            "moved to %s", state.step, moved)
        distributed.barrier()
    apply_group_settings(engine.optimizer, settings, schedule.factor(state.step), betas, config.optim.eps)

    logger = metrics.RunLogger(output_dir, enabled=env.is_main)
    metrics_file = open(output_dir / "metrics.jsonl", "a") if env.is_main else None
    similarity_rows = metrics.embedding_sample_rows(model.config.vocab_size, config.log.embedding_sample_rows)
    peak = metrics.device_peak_tflops(config.log.peak_tflops)
    step_flops = metrics.rtd_step_flops(model.config, model.generator_config, config.train.global_batch,
                                        data.seq_len, round(config.train.global_batch * data.seq_len * config.rtd.mask_prob))

    def record_embedding_similarities(step: int) -> None:
        similarities = embedding_similarities(model, similarity_rows, stage)  # collective under ZeRO-3
        if env.is_main:
            logger.scalars({f"embedding_similarity/{k}": v for k, v in similarities.items()}, step)
            metrics_file.write(json.dumps({"step": step, "embedding_similarity": similarities}) + "\n")
            metrics_file.flush()

    if state.step == 0:
        record_embedding_similarities(0)

    progress = None
    if env.is_main and config.log.progress_bar:
        from tqdm import tqdm

        progress = tqdm(total=config.train.steps, initial=state.step, desc="pretrain", unit="step",
                        dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)

    device = next(p.device for p in engine.module.parameters())
    iterator = iter(data.loader)
    window = {"start": time.perf_counter(), "steps": 0, "loss": torch.zeros(3, dtype=torch.float64),
              "counts": torch.zeros(len(COUNT_NAMES), dtype=torch.float64)}
    exit_code = 0
    last_saved_step = state.step if resume_from is not None else -1

    # -- the loop ---------------------------------------------------------------------------------
    while state.step < config.train.steps:
        step = state.step
        seed_step(config.train.seed, step, env.rank)
        lrs = apply_group_settings(engine.optimizer, settings, schedule.factor(step), betas, config.optim.eps)
        is_log_step = (step + 1) % config.log.interval == 0 or step + 1 == config.train.steps
        poisoned = False
        step_loss = torch.zeros(3, dtype=torch.float64)
        step_counts = torch.zeros(len(COUNT_NAMES), dtype=torch.float64)
        for micro in range(accumulation):
            batch = next(iterator)
            if poisoned:
                continue  # keep consuming the step's data so the stream stays aligned
            engine.set_gradient_accumulation_boundary(micro == accumulation - 1)
            # Packed batches have no padding; None lets the attention skip its mask (checked on the host).
            mask = None if bool(batch["attention_mask"].all()) else batch["attention_mask"].to(device)
            output = engine(batch["input_ids"].to(device), mask,
                            batch["masked_input_ids"].to(device), batch["mlm_labels"].to(device))
            loss = output.loss
            if step in config.train.fail_loss_at_steps and env.rank == 0 and micro == 0:
                loss = loss * float("nan")  # fault injection (tests of the non-finite guard)
            if distributed.any_rank(not bool(torch.isfinite(loss.detach()))):
                poisoned = True
                continue
            engine.backward(loss)
            step_loss += torch.stack([loss.detach(), output.mlm_loss.detach(), output.rtd_loss.detach()]).double().cpu()
            step_counts += torch.stack([output.counts[name] for name in COUNT_NAMES]).double().cpu()

        if poisoned:
            engine.optimizer.zero_grad()  # drop what earlier micro-batches of this step accumulated
            engine.zero_grad()
            state.nonfinite_in_a_row += 1
            state.skipped_steps += 1
            log.warning("step %d: non-finite loss, update skipped (%d in a row, %d skipped in all)",
                        step, state.nonfinite_in_a_row, state.skipped_steps)
            logger.scalars({"train/skipped_steps": state.skipped_steps}, step + 1)
            if state.nonfinite_in_a_row >= config.train.max_nonfinite_in_a_row:
                log.error("stopping: %d non-finite losses in a row (train.max_nonfinite_in_a_row). The last good "
                          "checkpoint is intact; lower the lr, check the data, or resume from it with --resume auto",
                          state.nonfinite_in_a_row)
                exit_code = EXIT_NONFINITE
                break
        else:
            grad_norms = group_gradient_norms(group_members, stage) if is_log_step else {}
            engine.step()
            state.nonfinite_in_a_row = 0
            window["loss"] += step_loss / accumulation
            window["counts"] += step_counts
            window["steps"] += 1
        state.step += 1
        state.loader = data.loader.state_dict()
        if progress is not None:
            progress.update(1)

        if is_log_step and not poisoned:
            totals = torch.cat([window["loss"], window["counts"], torch.tensor([float(window["steps"])], dtype=torch.float64)])
            if torch.distributed.is_initialized():
                totals = totals.to(device)
                torch.distributed.all_reduce(totals)
                totals = totals.cpu()
            steps_in_window = max(1.0, float(totals[-1]) / env.world_size)
            loss_means = totals[:3] / (steps_in_window * env.world_size)
            counts = {name: float(v) for name, v in zip(COUNT_NAMES, totals[3:3 + len(COUNT_NAMES)], strict=True)}
            elapsed = time.perf_counter() - window["start"]
            step_time = elapsed / steps_in_window
            tokens_per_s = config.train.global_batch * data.seq_len / step_time
            tflops = step_flops / step_time / 1e12
            record = {
                "step": state.step,
                "steps_averaged": int(steps_in_window),  # fewer than log.interval right after a resume
                "loss": float(loss_means[0]), "mlm_loss": float(loss_means[1]), "rtd_loss": float(loss_means[2]),
                **rtd_statistics(counts),
                "tokens_per_s": tokens_per_s, "samples_per_s": config.train.global_batch / step_time,
                "model_tflops": tflops / env.world_size, "mfu": (tflops / env.world_size / peak) if peak else None,
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                "memory_gib": metrics.peak_memory_gib(),
                **{f"lr/{k}": v for k, v in lrs.items()}, **{f"grad_norm/{k}": v for k, v in grad_norms.items()},
            }
            if env.is_main:
                logger.scalars({
                    "loss/total": record["loss"], "loss/mlm": record["mlm_loss"], "loss/rtd": record["rtd_loss"],
                    "generator/accuracy": record["generator_accuracy"],
                    "discriminator/accuracy": record["discriminator_accuracy"],
                    "discriminator/precision": record["discriminator_precision"],
                    "discriminator/recall": record["discriminator_recall"],
                    "discriminator/replaced_fraction": record["replaced_fraction"],
                    "throughput/tokens_per_s": tokens_per_s, "throughput/samples_per_s": record["samples_per_s"],
                    "throughput/model_tflops_per_device": record["model_tflops"], "throughput/mfu": record["mfu"],
                    "memory/peak_gib": record["memory_gib"], "optim/grad_norm": record["grad_norm"],
                    **{f"optim/lr/{k}": v for k, v in lrs.items()},
                    **{f"optim/grad_norm/{k}": v for k, v in grad_norms.items()},
                }, state.step)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                log.info("step %d/%d loss %.4f (mlm %.4f, rtd %.4f) gen acc %.3f disc acc %.3f replaced %.3f | "
                         "%.0f tok/s %.2f TFLOP/s/device", state.step, config.train.steps, record["loss"],
                         record["mlm_loss"], record["rtd_loss"], record["generator_accuracy"],
                         record["discriminator_accuracy"], record["replaced_fraction"], tokens_per_s,
                         record["model_tflops"])
            window = {"start": time.perf_counter(), "steps": 0, "loss": torch.zeros(3, dtype=torch.float64),
                      "counts": torch.zeros(len(COUNT_NAMES), dtype=torch.float64)}

        if state.step % config.log.embedding_similarity_interval == 0:
            record_embedding_similarities(state.step)

        stop_requested = distributed.any_rank(stop.signal_name is not None)
        periodic = state.step % config.checkpoint.interval == 0 or state.step == config.train.steps
        # During a run of non-finite losses no periodic checkpoint is written: pruning must never
        # push the last good checkpoint out while the run may be going bad.
        if (periodic and state.nonfinite_in_a_row == 0) or stop_requested:
            save_checkpoint(engine, config, env, state, stage, description)
            last_saved_step = state.step
        if stop_requested:
            log.warning("stop requested (%s): checkpoint at step %d written; exiting with %d for a requeue",
                        stop.signal_name or "signal on another rank", state.step, EXIT_PREEMPTED)
            exit_code = EXIT_PREEMPTED
            break

    if progress is not None:
        progress.close()
    logger.close()
    if metrics_file is not None:
        metrics_file.close()
    if exit_code == 0 and last_saved_step != state.step:
        save_checkpoint(engine, config, env, state, stage, description)
    if exit_code == 0 and env.is_main:
        log.info("finished %d steps; checkpoints in %s, TensorBoard logs in %s", state.step,
                 checkpoint.checkpoint_root(output_dir), output_dir / "tensorboard")
    distributed.shutdown()
    return exit_code


def save_checkpoint(engine, config: RunConfig, env: distributed.DistributedEnv, state: TrainState, stage: int,
                    description: dict) -> None:
    payload = {
        **description,
        "loader": state.loader,
        "nonfinite_in_a_row": state.nonfinite_in_a_row,
        "skipped_steps": state.skipped_steps,
        "world_size": env.world_size,
        "zero_stage": stage,
        "config": config.to_dict(),
        "rng": {"scheme": "seed_step(seed, step, rank)", "seed": config.train.seed},
    }
    path = checkpoint.save(engine, config.output_dir, state.step, payload, config.checkpoint.keep, env.rank)
    log.info("checkpoint %s written", path)
