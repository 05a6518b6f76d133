"""The run configuration of ``dv3 pretrain``: one YAML/JSON file, every field overridable by flag.

Sections are dataclasses; a file holds ``{section: {field: value}}`` and a flag
``--section.field-name VALUE`` overrides one field (``--train.steps 200``). Everything is
validated before any process group starts, and every error names the field at fault.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data_pipeline.masking import MASKING_STRATEGIES
from engine.config import PRESETS
from engine.rtd import SHARING_MODES

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_repo_path(path: str) -> Path:
    """A path as given, or relative to the dv3 checkout (so ``ds_configs/...`` works from anywhere)."""
    candidate = Path(path)
    if candidate.exists() or candidate.is_absolute():
        return candidate
    return REPO_ROOT / candidate


class ConfigError(ValueError):
    """A run configuration the user must fix; the message names the field."""


@dataclass
class ModelSection:
    preset: str = "tiny"
    vocab_size: int | None = None  # None: the data's vocabulary (pieces + [MASK])
    hidden_dropout_prob: float | None = None  # None: the preset's (0.1)
    attention_probs_dropout_prob: float | None = None
    position_buckets: int | None = None
    max_position_embeddings: int | None = None
    init_from: str | None = None  # a HF DeBERTa-v3 folder: continued pretraining of its weights
    init_generator_from: str | None = None  # a HF DebertaV2ForMaskedLM folder for the generator


@dataclass
class RTDSection:
    sharing: str = "gdes"
    rtd_lambda: float = 50.0
    temperature: float = 1.0
    generator_layers: int | None = None  # None: half the discriminator's depth
    enhanced_mask_decoder: bool = False
    masking: str = "rtd"
    mask_prob: float = 0.15


@dataclass
class DataSection:
    dirs: list[str] = field(default_factory=lambda: ["data/default"])
    weights: list[float] | None = None  # blending weights, one per dir
    language_alpha: float = 0.3
    num_workers: int = 0
    shuffle: bool = True


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
    generator_lr_multiplier: float = 1.0
    discriminator_lr_multiplier: float = 1.0
    delta_lr_multiplier: float | None = None  # set: E_Delta gets its own group `disc_delta`
    delta_weight_decay: float | None = None


@dataclass
class TrainSection:
    steps: int = 1000
    global_batch: int = 64
    micro_batch: int = 8
    seed: int = 0
    deepspeed_config: str = "ds_configs/zero3_bf16.json"
    max_nonfinite_in_a_row: int = 10
    fail_loss_at_steps: list[int] = field(default_factory=list)  # fault injection for tests: NaN loss there


@dataclass
class CheckpointSection:
    interval: int = 1000
    keep: int = 3


@dataclass
class LogSection:
    interval: int = 10
    embedding_similarity_interval: int = 100
    embedding_sample_rows: int = 1024
    peak_tflops: float | None = None  # per device, for MFU; None: known GPUs' bf16 peak
    progress_bar: bool = True


SECTIONS = {
    "model": ModelSection,
    "rtd": RTDSection,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "checkpoint": CheckpointSection,
    "log": LogSection,
}


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    rtd: RTDSection = field(default_factory=RTDSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    output_dir: str = "runs/dv3"
    resume: str = "none"  # none | auto | a checkpoint directory

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Field-level checks that need no process group (world size comes later)."""

        def need(condition: bool, name: str, message: str) -> None:
            if not condition:
                raise ConfigError(f"{name}: {message}")

        need(self.model.preset in PRESETS, "model.preset", f"{self.model.preset!r} is not one of {', '.join(PRESETS)}")
        need(self.rtd.sharing in SHARING_MODES, "rtd.sharing", f"{self.rtd.sharing!r} is not one of {', '.join(SHARING_MODES)}")
        need(self.rtd.masking in MASKING_STRATEGIES, "rtd.masking",
             f"{self.rtd.masking!r} is not one of {', '.join(MASKING_STRATEGIES)}")
        need(0 < self.rtd.mask_prob < 1, "rtd.mask_prob", f"must be in (0, 1), got {self.rtd.mask_prob}")
        need(self.rtd.rtd_lambda >= 0, "rtd.rtd_lambda", f"must be >= 0, got {self.rtd.rtd_lambda}")
        need(self.rtd.temperature > 0, "rtd.temperature", f"must be > 0, got {self.rtd.temperature}")
        need(len(self.data.dirs) > 0, "data.dirs", "needs at least one data directory")
        if self.data.weights is not None:
            need(len(self.data.weights) == len(self.data.dirs), "data.weights",
                 f"has {len(self.data.weights)} values for {len(self.data.dirs)} data.dirs")
            need(all(w > 0 for w in self.data.weights), "data.weights", "every weight must be > 0")
        need(self.data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.data.num_workers}")
        need(self.optim.lr > 0, "optim.lr", f"must be > 0, got {self.optim.lr}")
        need(self.optim.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.optim.warmup_steps}")
        need(0 <= self.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.optim.min_lr_ratio}")
        need(0 <= self.optim.beta1 < 1 and 0 <= self.optim.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        need(self.optim.grad_clip >= 0, "optim.grad_clip", f"must be >= 0, got {self.optim.grad_clip}")
        need(self.train.steps > 0, "train.steps", f"must be > 0, got {self.train.steps}")
        need(self.train.micro_batch > 0, "train.micro_batch", f"must be > 0, got {self.train.micro_batch}")
        need(self.train.global_batch > 0, "train.global_batch", f"must be > 0, got {self.train.global_batch}")
        need(self.train.global_batch % self.train.micro_batch == 0, "train.global_batch",
             f"{self.train.global_batch} is not a multiple of train.micro_batch={self.train.micro_batch}")
        need(self.train.max_nonfinite_in_a_row >= 1, "train.max_nonfinite_in_a_row", "must be >= 1")
        need(resolve_repo_path(self.train.deepspeed_config).is_file(), "train.deepspeed_config",
             f"{self.train.deepspeed_config} does not exist (see ds_configs/)")
        need(self.checkpoint.interval > 0, "checkpoint.interval", f"must be > 0, got {self.checkpoint.interval}")
        need(self.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.checkpoint.keep}")
        need(self.log.interval > 0, "log.interval", f"must be > 0, got {self.log.interval}")
        need(self.log.embedding_similarity_interval > 0, "log.embedding_similarity_interval", "must be > 0")
        need(self.log.embedding_sample_rows >= 2, "log.embedding_sample_rows", "must be >= 2")
        need(self.resume in ("none", "auto") or Path(self.resume).is_dir(), "resume",
             f"{self.resume!r} is not 'none', 'auto' or an existing checkpoint directory")
        for name in ("init_from", "init_generator_from"):
            path = getattr(self.model, name)
            need(path is None or (Path(path) / "config.json").is_file(), f"model.{name}",
                 f"{path} is not a Hugging Face model folder (no config.json)")
        need(self.rtd.generator_layers is None or self.rtd.generator_layers >= 1, "rtd.generator_layers",
             f"must be >= 1 (or unset for half the discriminator's depth), got {self.rtd.generator_layers}")
        self.encoder_config()  # the model's own checks (dropout range, positions vs buckets, ...)

    def encoder_config(self):
        """The discriminator's ``EncoderConfig``: the preset (or the ``init_from`` model's config)
        with the ``model.*`` overrides; the vocabulary size is settled later, against the data."""
        from engine.config import preset_config

        overrides = {
            name: getattr(self.model, name)
            for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "position_buckets",
                         "max_position_embeddings")
            if getattr(self.model, name) is not None
        }
        source = f"model.init_from={self.model.init_from}" if self.model.init_from else f"model.preset={self.model.preset}"
        try:
            if self.model.init_from:
                from engine.hf_io import encoder_config_from_hf, read_hf_config

                return encoder_config_from_hf(read_hf_config(self.model.init_from)).replace(**overrides)
            return preset_config(self.model.preset, **overrides)
        except (ValueError, OSError) as error:
            flags = ", ".join(f"model.{name}={value}" for name, value in overrides.items())
            raise ConfigError(f"{source}{' with ' + flags if flags else ''}: {error}") from error

    def gradient_accumulation_steps(self, world_size: int) -> int:
        per_step = self.train.micro_batch * world_size
        if self.train.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.train.global_batch} is not divisible by train.micro_batch "
                f"({self.train.micro_batch}) x world size ({world_size}) = {per_step}; choose a global batch "
                f"that is a multiple of {per_step} or change the micro-batch"
            )
        return self.train.global_batch // per_step


# -- building a config from a file and flags ------------------------------------------------------------


def _field_types(section_class) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(section_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_class)}


def _coerce(value, annotation, name: str):
    """Convert a file or flag value to the field's type, or raise ConfigError naming the field."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, options[0], name)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()] if value.strip() else []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(item, item_type, name) for item in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return int(number)
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if annotation is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{name}: unsupported type {annotation}")


def read_config_file(path: str | Path) -> dict:
    path = resolve_repo_path(str(path))  # configs/tiny_cpu.yaml works from any directory
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"config file {path} does not parse: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def build_run_config(file_data: dict | None = None, overrides: dict[str, object] | None = None) -> RunConfig:
    """A ``RunConfig`` from file data (``{section: {field: value}}``) then dotted overrides."""
    values: dict[str, dict] = {name: {} for name in SECTIONS}
    top: dict[str, object] = {}
    for key, value in (file_data or {}).items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of fields, got {value!r}")
            values[key].update(value)
        elif key in ("output_dir", "resume"):
            top[key] = value
        else:
            raise ConfigError(f"{key}: unknown section (sections: {', '.join(SECTIONS)}, output_dir, resume)")
    for dotted, value in (overrides or {}).items():
        if "." in dotted:
            section, name = dotted.split(".", 1)
            values.setdefault(section, {})[name.replace("-", "_")] = value
        else:
            top[dotted] = value

    sections = {}
    for section_name, section_class in SECTIONS.items():
        types_by_field = _field_types(section_class)
        given = values.get(section_name, {})
        unknown = sorted(set(given) - set(types_by_field))
        if unknown:
            raise ConfigError(f"{section_name}.{unknown[0]}: unknown field (known: {', '.join(types_by_field)})")
        converted = {
            name: _coerce(value, types_by_field[name], f"{section_name}.{name}") for name, value in given.items()
        }
        sections[section_name] = section_class(**converted)
    config = RunConfig(**sections, **{k: str(v) for k, v in top.items()})
    return config


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--section.field-name`` flag per field, documented with its default."""
    for section_name, section_class in SECTIONS.items():
        group = parser.add_argument_group(f"{section_name} settings (override the config file)")
        defaults = section_class()
        for name in _field_types(section_class):
            flag = f"--{section_name}.{name.replace('_', '-')}"
            default = getattr(defaults, name)
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            group.add_argument(flag, dest=f"override:{section_name}.{name}", default=None, metavar="VALUE",
                               help=f"default: {shown}")


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    return {
        key[len("override:"):]: value
        for key, value in vars(args).items()
        if key.startswith("override:") and value is not None
    }
