"""A run's pieces, built once from the run configuration: the setup shared by every training job.

    world size check -> DeepSpeed config -> resume point (agreed by all ranks) -> process group
    -> data (the saved loader position checked against it) -> run_config.json -> model
    -> ZeRO-3 wiring, named optimizer groups, DeepSpeed engine -> resume

Everything that can be refused (a setting, the data, the checkpoint, a model folder) is
refused before the run directory is touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import RTDConfig, RunConfig
from engine.errors import CheckpointError, ConfigError, InputError, OutputError
from engine.model import RTDModel
from engine.model.init_from_hf import hf_initial_weights
from engine.train import checkpoint, distributed
from engine.train.checkpoint import CheckpointInfo, TrainState
from engine.train.data import TrainingData, open_training_data
from engine.train.distributed import DistributedEnv
from engine.train.logger import setup_logging
from engine.train.parallel import ParallelModel, construct, load_weights, parallelize, parameter_dtype, zero_stage
from engine.train.preemption import StopRequest
from engine.train.step import seed_step
from kernels.attention import attention_path_from_env

log = logging.getLogger("dv3")


@contextlib.contextmanager
def input_context(what: str, error_class: type[InputError] = ConfigError):
    """Report a failure to read a user's file (a checkpoint, a HF folder, the loader state) as an
    input error naming ``what``: ``dv3 pretrain`` prints one line and exits 2."""
    try:
        yield
    except (ValueError, OSError, InputError) as error:
        raise error_class(f"{what}: {error}") from error


def write_run_config(config: RunConfig, output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "run_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    except OSError as error:
        raise OutputError(f"output_dir: cannot write {output_dir}: {error.strerror or error}") from error


def check_fits_the_data(config: RunConfig, data: TrainingData) -> None:
    """Settings that must agree with the data's rows, refused before anything is built."""
    encoder = config.encoder_config(data.vocab_size)
    if config.rtd.enhanced_mask_decoder and data.seq_len > encoder.max_position_embeddings:
        raise ConfigError(f"model.max_position_embeddings: the data's rows have {data.seq_len} tokens, but the "
                          f"generator's Enhanced Mask Decoder has absolute positions up to "
                          f"{encoder.max_position_embeddings}; set --model.max-position-embeddings {data.seq_len} "
                          "(and --model.max-relative-positions to keep the relative geometry), or "
                          "--rtd.enhanced-mask-decoder false")


def check_compile_is_sound(config: RunConfig, ds_config: dict, cuda: bool) -> None:
    """``train.compile`` with bf16 on a CPU is refused: there torch's compiler (Inductor) turns
    the reference attention's relative gathers and softmax, fused in bf16, into NaN (measured with
    torch 2.13; fp32, and eager bf16, are right)."""
    if (config.train.compile and not cuda and parameter_dtype(ds_config) != torch.float32
            and attention_path_from_env() != "fused"):
        raise ConfigError(f"train.compile: with bf16 on a CPU, torch {torch.__version__}'s compiled reference "
                          "attention gives NaN; use an fp32 DeepSpeed config (ds_configs/cpu.json) or "
                          "--train.compile false")


def build_model(config: RunConfig, data: TrainingData, ds_config: dict, env: DistributedEnv) -> RTDModel:
    """The RTD model for the data's vocabulary, identical on every rank: built whole, or under
    ZeRO-3 (``train.partitioned_construction``) already partitioned; from a HF folder's weights
    with ``model.init_from`` (read by rank 0 alone when partitioned)."""
    check_compile_is_sound(config, ds_config, torch.cuda.is_available())
    partitioned = config.train.partitioned_construction and zero_stage(ds_config) == 3
    seed_step(config.train.seed, 0, 0)
    model = construct(lambda: RTDModel(config.encoder_config(data.vocab_size), config.rtd, data.mask_token_id),
                      ds_config, partitioned, seed=config.train.seed)
    model.set_activation_checkpointing(config.train.activation_checkpointing)
    if config.train.compile:
        model.compile_layers()
    if config.model.init_from:
        weights, refusal = None, None
        if env.is_main or not partitioned:
            try:
                weights = hf_initial_weights(model, config.model.init_from, config.model.init_generator_from)
            except (ValueError, OSError, InputError) as error:
                refusal = f"model.init_from: {error}"
        refusal = distributed.rank0_value(refusal)  # one rank reads; every rank refuses together
        if refusal is not None:
            raise ConfigError(refusal)
        load_weights(model, weights, partitioned)
        log.info("initialised from %s%s (sharing=%s)", config.model.init_from,
                 f" and generator {config.model.init_generator_from}" if config.model.init_generator_from else "",
                 config.rtd.sharing)
    return model


def check_output_dir(config: RunConfig) -> None:
    """A run directory is never silently reused: without ``--resume`` it must hold no run yet."""
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir: {output_dir} is a file, not a directory; choose a run directory")
    if config.resume != "none" or not output_dir.is_dir():
        return
    root = checkpoint.checkpoint_root(output_dir)
    steps = [checkpoint.step_of(p) for p in root.iterdir() if checkpoint.step_of(p) is not None] if root.is_dir() else []
    written = [name for name in ("metrics.jsonl", "run_config.json") if (output_dir / name).exists()]
    if steps or written:
        held = f"checkpoints up to step {max(steps)}" if steps else " and ".join(written)
        raise ConfigError(f"output_dir: {output_dir} already holds a run ({held}); continue it with --resume auto, "
                          "or start fresh in another --output-dir (or remove this one)")


def agree_on_resume(config: RunConfig, env: DistributedEnv, stage: int) -> tuple[Path | None, CheckpointInfo | None]:
    """Collective: the checkpoint to resume from (None: start fresh) and what it holds.

    Rank 0 resolves ``--resume`` and verifies the checkpoint's files (``auto`` falls back past
    bad ones); its choice, or its refusal, is every rank's. Ranks resolving on their own could
    pick different steps when the folder changes in between (a lingering process of an earlier
    job still writing) and then wait on each other forever.
    """
    choice = (None, None)
    if env.is_main and config.resume != "none":
        try:
            path = checkpoint.resolve_resume(config.resume, config.output_dir)
            choice = (str(path) if path is not None else None, None)
        except CheckpointError as error:
            choice = (None, f"resume: {error}")
    path, refusal = distributed.rank0_value(choice)
    if refusal is not None:
        raise CheckpointError(refusal)
    if path is None:
        return None, None
    path = Path(path)
    with input_context("resume", CheckpointError):
        info = CheckpointInfo.read(path)
    if not info.universal and info.zero_stage > 0 and info.world_size not in (-1, env.world_size):
        raise CheckpointError(f"resume: {path} was saved by {info.world_size} ranks under ZeRO stage "
                              f"{info.zero_stage}; to resume on {env.world_size}, convert it first: "
                              f"dv3 ckpt universal --checkpoint {path}")
    if not info.universal and info.zero_stage != stage:
        raise CheckpointError(f"resume: {path} was saved under ZeRO stage {info.zero_stage} and "
                              f"train.deepspeed_config={config.train.deepspeed_config} uses stage {stage}; resume "
                              f"with a stage-{info.zero_stage} config, or convert it first: "
                              f"dv3 ckpt universal --checkpoint {path}")
    return path, info


# What a checkpoint written before a setting existed was trained with (dv3 0.1's behaviour).
LEGACY_VALUES = {"optim.clip_mode": "joint"}
# Encoder fields a resumed run may change: they do not change the model's structure.
ADJUSTABLE_ENCODER_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def check_resumable(config: RunConfig, data: TrainingData, path: Path, saved: CheckpointInfo) -> None:
    """A run resumes only with the model and the training it was saved with: anything else would
    fail deep inside a state-dict load, or silently train another recipe from its weights."""
    differences = []  # (setting, saved value, this run's value)
    saved_encoder = saved.model.get("encoder_config", {})
    ours = config.encoder_config(data.vocab_size).to_dict()
    for name, value in ours.items():
        if name not in ADJUSTABLE_ENCODER_FIELDS and name in saved_encoder and saved_encoder[name] != value:
            differences.append((f"encoder {name}", saved_encoder[name], value))
    saved_rtd = RTDConfig.from_dict(saved.model["rtd_config"]) if "rtd_config" in saved.model else config.rtd
    for name in ("sharing", "generator_layers", "enhanced_mask_decoder", "masking", "mask_prob"):
        if getattr(saved_rtd, name) != getattr(config.rtd, name):
            differences.append((f"rtd.{name}", getattr(saved_rtd, name), getattr(config.rtd, name)))
    saved_clip_mode = saved.config.get("optim", {}).get("clip_mode", LEGACY_VALUES["optim.clip_mode"])
    if saved_clip_mode != config.optim.clip_mode:
        differences.append(("optim.clip_mode", saved_clip_mode, config.optim.clip_mode))
    if differences:
        listed = "; ".join(f"{name} {old!r} (this run: {new!r})" for name, old, new in differences)
        flags = " ".join(f"--{name.replace('_', '-')} {str(old).lower() if isinstance(old, bool) else old}"
                         for name, old, _ in differences if not name.startswith("encoder "))
        raise CheckpointError(
            f"resume: {path} was trained with {listed}; resume it with the settings it was trained with"
            + (f" ({flags})" if flags else " (its run_config.json)") + ", or start a new run in another --output-dir")


@dataclass
class Trainer:
    """Everything a run is made of. ``build`` makes it; ``engine.train.loop`` drives it."""

    config: RunConfig
    env: DistributedEnv
    accumulation: int
    data: TrainingData
    parallel: ParallelModel
    state: TrainState
    resumed_from: Path | None
    stop: StopRequest

    @classmethod
    def build(cls, config: RunConfig, stop: StopRequest) -> Trainer:
        """``stop`` is installed by the caller as early as it can be (before torch and DeepSpeed
        load), so a stop signal during start-up waits for the first step boundary too."""
        env = distributed.discover()
        accumulation = config.gradient_accumulation_steps(env.world_size)  # before any process group
        ds_config = config.deepspeed_config(env.world_size, torch.cuda.is_available())
        check_output_dir(config)

        setup_logging(env.rank)
        distributed.init_process_group(env)
        resume_from, saved = agree_on_resume(config, env, zero_stage(ds_config))
        if saved is not None and saved.universal:
            ds_config.setdefault("checkpoint", {})["load_universal"] = True

        data = open_training_data(config, rank=env.rank, world_size=env.world_size)
        log.info("data: %s", data.describe())
        check_fits_the_data(config, data)
        if saved is not None:  # refuse another model, other data or another seed now, before any model is built
            check_resumable(config, data, resume_from, saved)
            with input_context(f"resume from {resume_from}: the data loader's state (resume with the run's own "
                               "data and train.seed, or start a new run)"):
                data.loader.load_state_dict(saved.state.loader)
        model = build_model(config, data, ds_config, env)
        output_dir = Path(config.output_dir)
        if env.is_main:  # only once data, model and resume point are known good: a refused run changes nothing
            write_run_config(config, output_dir)
        parallel = parallelize(model, config, ds_config)
        log.info("model: %s discriminator %d layers, generator %d layers, %.1fM parameters; sharing=%s; "
                 "ZeRO stage %d; %d rank(s) x micro-batch %d x accumulation %d = global batch %d",
                 config.model.init_from or config.model.preset, model.config.num_hidden_layers,
                 model.generator_config.num_hidden_layers,
                 sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) / 1e6,
                 config.rtd.sharing, parallel.stage, env.world_size, config.train.micro_batch, accumulation,
                 config.train.global_batch)

        state = TrainState()
        if resume_from is not None:
            group_names = [group["name"] for group in parallel.engine.optimizer.param_groups]
            checkpoint.load(parallel.engine, resume_from)
            state = saved.state
            parallel.restore_after_load(group_names, state.step)
            log.info("resumed from %s at step %d (saved with world size %d)", resume_from, state.step,
                     saved.world_size)
            if config.resume != "auto" and env.is_main:
                moved = checkpoint.set_aside_newer(checkpoint.checkpoint_root(output_dir), state.step)
                if moved is not None:
                    log.warning("checkpoints after step %d belong to the continuation abandoned by this resume: "
                                "moved to %s", state.step, moved)
            distributed.barrier()
        return cls(config=config, env=env, accumulation=accumulation, data=data, parallel=parallel, state=state,
                   resumed_from=resume_from, stop=stop)

    def save_checkpoint(self) -> Path | None:
        """Collective: every rank writes its part; rank 0 marks it complete and prunes. A model
        with a non-finite weight is not saved (None): it would replace good checkpoints."""
        if not self.parallel.weights_finite():
            log.error("step %d: the model has non-finite weights; no checkpoint written (the last one is intact)",
                      self.state.step)
            return None
        info = CheckpointInfo(state=self.state, model=self.parallel.model.describe(),
                              tokenizer=str(self.data.tokenizer_path), world_size=self.env.world_size,
                              zero_stage=self.parallel.stage, config=self.config.to_dict())
        path = checkpoint.save(self.parallel.engine, self.config.output_dir, info, self.config.checkpoint.keep,
                               self.env.rank, tokenizer=Path(self.data.tokenizer_path))
        log.info("checkpoint %s written", path)
        return path
