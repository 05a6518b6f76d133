"""The run configuration of ``dv3 pretrain``: one dataclass per section, validated when built.

A file holds ``{section: {field: value}}`` and a flag ``--section.field-name VALUE`` overrides one
field (``engine.config.loading``). Each section checks its own fields when it is constructed, and
``RunConfig`` checks what spans sections, so a ``RunConfig`` that exists is a valid one, and every
error names the field at fault. The run configuration is the one source of every other setting:
it produces the encoder's configuration, the RTD objective and its masking (the ``rtd`` section
*is* the model's ``RTDConfig``), and the DeepSpeed configuration.

This module imports nothing of the model: it is the leaf every other part of dv3 reads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.errors import ConfigError
from data_pipeline.masking import MaskingConfig
from engine.config.encoder import PRESETS, EncoderConfig, encoder_config_from_hf, preset_config, read_hf_config
from engine.resources import resolve_resource_path

SHARING_MODES = ("es", "nes", "gdes")
CLIP_MODES = ("separate", "joint")


def _need(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{name}: {message}")


@dataclass
class ModelSection:
    preset: str = "tiny"
    vocab_size: int | None = None  # None: the data's vocabulary (pieces + [MASK])
    hidden_dropout_prob: float | None = None  # None: the preset's (0.1)
    attention_probs_dropout_prob: float | None = None
    position_buckets: int | None = None
    max_position_embeddings: int | None = None  # also the longest row the EMD's absolute positions reach
    max_relative_positions: int | None = None  # None: the preset's (-1: max_position_embeddings)
    init_from: str | None = None  # a HF DeBERTa-v3 folder: continued pretraining of its weights
    init_generator_from: str | None = None  # a HF DebertaV2ForMaskedLM folder for the generator

    def __post_init__(self) -> None:
        _need(self.preset in PRESETS, "model.preset", f"{self.preset!r} is not one of {', '.join(PRESETS)}")
        for name in ("init_from", "init_generator_from"):
            path = getattr(self, name)
            _need(path is None or (Path(path) / "config.json").is_file(), f"model.{name}",
                  f"{path} is not a Hugging Face model folder (no config.json)")


@dataclass
class RTDConfig:
    """The objective (the ``rtd`` section): replaced token detection with embedding sharing.

    ``loss = mlm_loss + rtd_lambda * rtd_loss``; the generator has ``generator_layers`` layers
    (None: half the discriminator's depth) and, with ``enhanced_mask_decoder``, an MLM head
    that re-runs its last layer with absolute positions added. ``masking`` and ``mask_prob``
    choose how the data loader masks (``data_pipeline.masking``).
    """

    sharing: str = "gdes"
    rtd_lambda: float = 50.0
    temperature: float = 1.0
    generator_layers: int | None = None
    enhanced_mask_decoder: bool = True  # the official v3 generator always has it
    masking: str = "official"  # the official masker's positions (one per window), all [MASK]
    mask_prob: float = 0.15

    def __post_init__(self) -> None:
        _need(self.sharing in SHARING_MODES, "rtd.sharing", f"{self.sharing!r} is not one of {', '.join(SHARING_MODES)}")
        _need(self.rtd_lambda >= 0, "rtd.rtd_lambda", f"must be >= 0, got {self.rtd_lambda}")
        _need(self.temperature > 0, "rtd.temperature", f"must be > 0, got {self.temperature}")
        _need(self.generator_layers is None or self.generator_layers >= 1, "rtd.generator_layers",
              f"must be >= 1 (or unset for half the discriminator's depth), got {self.generator_layers}")
        try:
            MaskingConfig(self.masking, self.mask_prob)  # the data pipeline's own checks
        except ValueError as error:
            raise ConfigError(f"rtd.masking={self.masking!r}, rtd.mask_prob={self.mask_prob}: {error}") from error

    @property
    def masking_config(self) -> MaskingConfig:
        return MaskingConfig(self.masking, self.mask_prob)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RTDConfig:
        """From ``to_dict`` output, or from a checkpoint written before the rtd section and the
        model's RTD settings were one class (masking nested as ``{strategy, mask_prob}``, and the
        data's ``mask_token_id`` and special ids stored alongside)."""
        data = {k: v for k, v in data.items() if k not in ("mask_token_id", "special_token_ids")}
        if isinstance(data.get("masking"), dict):
            nested = data.pop("masking")
            data["masking"], data["mask_prob"] = nested["strategy"], nested["mask_prob"]
        return cls(**data)


@dataclass
class DataSection:
    dirs: list[str] = field(default_factory=lambda: ["data/default"])
    weights: list[float] | None = None  # blending weights, one per dir
    language_alpha: float = 0.3
    num_workers: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        _need(len(self.dirs) > 0, "data.dirs", "needs at least one data directory")
        if self.weights is not None:
            _need(len(self.weights) == len(self.dirs), "data.weights",
                  f"has {len(self.weights)} values for {len(self.dirs)} data.dirs")
            _need(all(w > 0 for w in self.weights), "data.weights", "every weight must be > 0")
        _need(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass
class OptimSection:
    lr: float = 1e-4
    warmup_steps: int = 10000
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0
    # separate: generator and discriminator gradients each clipped to grad_clip (the official recipe);
    # joint: one clip over both (DeepSpeed's gradient_clipping; dv3 before 0.2)
    clip_mode: str = "separate"
    generator_lr_multiplier: float = 1.0
    discriminator_lr_multiplier: float = 1.0
    delta_lr_multiplier: float | None = None  # set: E_Delta gets its own group `disc_delta`
    delta_weight_decay: float | None = None

    def __post_init__(self) -> None:
        _need(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _need(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _need(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        _need(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.grad_clip}")
        _need(self.clip_mode in CLIP_MODES, "optim.clip_mode", f"{self.clip_mode!r} is not one of {', '.join(CLIP_MODES)}")


@dataclass
class TrainSection:
    steps: int = 1000
    global_batch: int = 64
    micro_batch: int = 8
    seed: int = 0
    deepspeed_config: str = "ds_configs/zero3_bf16.json"
    max_nonfinite_in_a_row: int = 10
    activation_checkpointing: int = 0  # recompute every k-th encoder layer in the backward (0: off, 1: all)
    partitioned_construction: bool = True  # under ZeRO-3, build the model already partitioned (zero.Init)
    compile: bool = False  # torch.compile each encoder layer's forward (the attention one op in the graph)
    fail_loss_at_steps: list[int] = field(default_factory=list)  # fault injection for tests: NaN loss there

    def __post_init__(self) -> None:
        _need(self.steps > 0, "train.steps", f"must be > 0, got {self.steps}")
        _need(self.micro_batch > 0, "train.micro_batch", f"must be > 0, got {self.micro_batch}")
        _need(self.global_batch > 0, "train.global_batch", f"must be > 0, got {self.global_batch}")
        _need(self.global_batch % self.micro_batch == 0, "train.global_batch",
              f"{self.global_batch} is not a multiple of train.micro_batch={self.micro_batch}")
        _need(self.max_nonfinite_in_a_row >= 1, "train.max_nonfinite_in_a_row", "must be >= 1")
        _need(self.activation_checkpointing >= 0, "train.activation_checkpointing",
              f"must be >= 0 (0 off, 1 every layer, k every k-th), got {self.activation_checkpointing}")
        _need(resolve_resource_path(self.deepspeed_config).is_file(), "train.deepspeed_config",
              f"{self.deepspeed_config} does not exist (see ds_configs/)")


@dataclass
class CheckpointSection:
    interval: int = 1000
    keep: int = 3

    def __post_init__(self) -> None:
        _need(self.interval > 0, "checkpoint.interval", f"must be > 0, got {self.interval}")
        _need(self.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.keep}")


@dataclass
class LogSection:
    interval: int = 10
    embedding_similarity_interval: int = 100
    embedding_sample_rows: int = 1024
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs' bf16 peak
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _need(self.interval > 0, "log.interval", f"must be > 0, got {self.interval}")
        _need(self.embedding_similarity_interval > 0, "log.embedding_similarity_interval", "must be > 0")
        _need(self.embedding_sample_rows >= 2, "log.embedding_sample_rows", "must be >= 2")


SECTIONS = {
    "model": ModelSection,
    "rtd": RTDConfig,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "log": LogSection,
}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    rtd: RTDConfig = field(default_factory=RTDConfig)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    output_dir: str = "runs/dv3"
    resume: str = "none"  # none | auto | a checkpoint directory

    def __post_init__(self) -> None:
        _need(self.resume in ("none", "auto") or Path(self.resume).is_dir(), "resume",
              f"{self.resume!r} is not 'none', 'auto' or an existing checkpoint directory")
        self.encoder_config()  # the model's own checks (dropout range, positions vs buckets, ...)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # -- what the run configuration produces --------------------------------------------------
    def encoder_config(self, data_vocab_size: int | None = None) -> EncoderConfig:
        """The discriminator's ``EncoderConfig``: the preset (or the ``init_from`` model's config)
        with the ``model.*`` overrides. The vocabulary is ``model.vocab_size`` when set, else the
        data's (``data_vocab_size``), else the preset's."""
        overrides = {
            name: getattr(self.model, name)
            for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "position_buckets",
                         "max_position_embeddings", "max_relative_positions")
            if getattr(self.model, name) is not None
        }
        source = f"model.init_from={self.model.init_from}" if self.model.init_from else f"model.preset={self.model.preset}"
        try:
            if self.model.init_from:
                config = encoder_config_from_hf(read_hf_config(self.model.init_from)).replace(**overrides)
            else:
                config = preset_config(self.model.preset, **overrides)
        except (ValueError, OSError) as error:
            flags = ", ".join(f"model.{name}={value}" for name, value in overrides.items())
            raise ConfigError(f"{source}{' with ' + flags if flags else ''}: {error}") from error
        vocab_size = self.model.vocab_size or data_vocab_size
        if vocab_size is None:
            return config
        _need(data_vocab_size is None or vocab_size >= data_vocab_size, "model.vocab_size",
              f"{vocab_size} is smaller than the data's vocabulary ({data_vocab_size})")
        return config.replace(vocab_size=vocab_size)

    def gradient_accumulation_steps(self, world_size: int) -> int:
        per_step = self.train.micro_batch * world_size
        if self.train.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.train.global_batch} is not divisible by train.micro_batch "
                f"({self.train.micro_batch}) x world size ({world_size}) = {per_step}; choose a global batch "
                f"that is a multiple of {per_step} or change the micro-batch"
            )
        return self.train.global_batch // per_step

    def deepspeed_config(self, world_size: int, cuda_available: bool) -> dict:
        """The DeepSpeed config file with dv3's batch, clipping and optimizer settings filled in.

        A value the file already sets to something else is an error, not a silent override.
        """
        accumulation = self.gradient_accumulation_steps(world_size)
        path = resolve_resource_path(self.train.deepspeed_config)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"train.deepspeed_config: cannot read {path}: {error}") from error
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a DeepSpeed config is a JSON object, got {type(data).__name__}")
        zero = data.get("zero_optimization", {})
        stage = zero.get("stage", 0) if isinstance(zero, dict) else None
        if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
        if "scheduler" in data:
            raise ConfigError(f"{path}: remove the 'scheduler' section: dv3 schedules each parameter group's lr itself")
        # In separate mode dv3 clips each model itself (engine.train.clipping); DeepSpeed must not.
        clipping = self.optim.grad_clip if self.optim.clip_mode == "joint" else 0.0
        ours = {
            "train_micro_batch_size_per_gpu": self.train.micro_batch,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": self.train.global_batch,
            "gradient_clipping": clipping,
        }
        for key, value in ours.items():
            if key in data and data[key] != value:
                raise ConfigError(
                    f"{path}: {key}={data[key]} disagrees with the run configuration ({value}); set batch sizes "
                    "and clipping in the dv3 config (train.*, optim.grad_clip, optim.clip_mode) and remove them here"
                )
            data[key] = value
        optimizer = data.setdefault("optimizer", {"type": "AdamW", "params": {}})
        if not isinstance(optimizer, dict) or not isinstance(optimizer.setdefault("params", {}), dict):
            raise ConfigError(f"{path}: 'optimizer' must be a mapping with a 'params' mapping")
        params = optimizer["params"]
        our_params = {"lr": self.optim.lr, "betas": [self.optim.beta1, self.optim.beta2], "eps": self.optim.eps,
                      "weight_decay": self.optim.weight_decay}
        for key, value in our_params.items():
            given = params.get(key, value)
            if (list(given) if isinstance(given, list | tuple) else given) != value:
                raise ConfigError(
                    f"{path}: optimizer.params.{key}={params[key]} disagrees with the run configuration ({value}); "
                    "set it in the dv3 config (optim.*) and remove it here: dv3 sets every group's values by name")
            params[key] = value
        if not cuda_available and data.get("fp16", {}).get("enabled"):
            raise ConfigError(f"{path}: fp16 does not run on CPU; use bf16 or fp32 (ds_configs/cpu.json)")
        return data
