"""The encoder's configuration: every ``DebertaV2Config`` field a DeBERTa-v3 model uses, and presets.

Field names are Hugging Face's so that a ``config.json`` maps onto this dataclass one to one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# DeBERTa-v3 needs both relative terms; dv3's attention computes exactly these.
V3_POS_ATT_TYPE = ("p2c", "c2p")
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_python", "relu", "tanh", "silu")


@dataclass
class EncoderConfig:
    vocab_size: int = 128100
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = True
    max_relative_positions: int = -1
    position_buckets: int = 256
    pad_token_id: int = 0
    position_biased_input: bool = False
    pos_att_type: tuple[str, ...] = V3_POS_ATT_TYPE
    norm_rel_ebd: str = "layer_norm"
    share_att_key: bool = True
    embedding_size: int | None = None  # None: equal to hidden_size (every v3 model)

    def __post_init__(self) -> None:
        if isinstance(self.pos_att_type, str):
            self.pos_att_type = tuple(part.strip() for part in self.pos_att_type.lower().split("|") if part.strip())
        self.pos_att_type = tuple(self.pos_att_type)
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"EncoderConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"EncoderConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"EncoderConfig.{name} must be in [0, 1), got {value!r}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"EncoderConfig.hidden_act={self.hidden_act!r} is not one of {SUPPORTED_ACTIVATIONS}")
        if not self.relative_attention:
            raise ValueError("EncoderConfig.relative_attention=False is a DeBERTa-v1/v2 setting; dv3 builds v3 models")
        if not self.share_att_key:
            raise ValueError("EncoderConfig.share_att_key=False is a DeBERTa-v2 setting; v3 shares attention keys")
        if set(self.pos_att_type) != set(V3_POS_ATT_TYPE):
            raise ValueError(f"EncoderConfig.pos_att_type={self.pos_att_type!r}: DeBERTa-v3 uses exactly p2c and c2p")
        if self.norm_rel_ebd not in ("layer_norm", "none"):
            raise ValueError(f"EncoderConfig.norm_rel_ebd={self.norm_rel_ebd!r} is not 'layer_norm' or 'none'")
        if self.position_buckets > 0 and self.relative_max_positions <= self.position_buckets // 2 + 1:
            raise ValueError(
                f"EncoderConfig.max_relative_positions ({self.relative_max_positions}; when it is -1, "
                f"max_position_embeddings) must exceed position_buckets // 2 + 1 "
                f"({self.position_buckets // 2 + 1}) for log buckets"
            )
        if self.type_vocab_size < 0:
            raise ValueError(f"EncoderConfig.type_vocab_size must be >= 0, got {self.type_vocab_size}")
        if self.embedding_size is not None and self.embedding_size <= 0:
            raise ValueError(f"EncoderConfig.embedding_size must be positive or None, got {self.embedding_size}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"EncoderConfig.pad_token_id={self.pad_token_id} is outside the vocabulary")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def relative_max_positions(self) -> int:
        """``max_relative_positions`` as HF resolves it (-1 means ``max_position_embeddings``)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def relative_span(self) -> int:
        """Half the number of rows of the relative embedding table."""
        return self.position_buckets if self.position_buckets > 0 else self.relative_max_positions

    @property
    def word_embedding_size(self) -> int:
        return self.embedding_size or self.hidden_size

    def replace(self, **changes) -> EncoderConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["pos_att_type"] = list(self.pos_att_type)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EncoderConfig field(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int = 128100
    overrides: dict = field(default_factory=dict)


# Sizes from the DeBERTaV3 paper / Microsoft's released configs. `tiny` is dv3's own, for tests
# and CPU demos; `mbase` is mDeBERTaV3-base (multilingual, 251,000 pieces).
PRESETS: dict[str, Preset] = {
    "tiny": Preset(128, 4, 4, 512, vocab_size=8192),
    "xsmall": Preset(384, 12, 6, 1536),
    "small": Preset(768, 6, 12, 3072),
    "base": Preset(768, 12, 12, 3072),
    "large": Preset(1024, 24, 16, 4096),
    "mbase": Preset(768, 12, 12, 3072, vocab_size=251000),
}


def preset_config(name: str, **overrides) -> EncoderConfig:
    """The encoder config of a named preset, with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    values = dict(
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        intermediate_size=preset.intermediate_size,
        vocab_size=preset.vocab_size,
    )
    values.update(preset.overrides)
    values.update(overrides)
    return EncoderConfig(**values)


# -- Hugging Face config.json correspondence -----------------------------------------------------

# HF config fields that carry no model structure (or that dv3 fixes) and are ignored on read.
_IGNORED_HF_FIELDS = {
    "model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "pooler_hidden_size",
    "pooler_dropout", "pooler_hidden_act", "legacy", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
    "_name_or_path", "use_cache", "is_encoder_decoder", "chunk_size_feed_forward", "tokenizer_class",
    "attention_head_size", "conv_kernel_size", "conv_groups", "conv_act", "z_steps", "max_length",
    "num_labels", "finetuning_task", "vocab_type", "tie_encoder_decoder", "is_decoder", "add_cross_attention",
}

def encoder_config_from_hf(hf_config: dict, source: str = "config.json") -> EncoderConfig:
    """Our ``EncoderConfig`` from a HF ``DebertaV2Config`` dict; unsupported settings are errors."""
    if hf_config.get("model_type", "deberta-v2") != "deberta-v2":
        raise ValueError(f"{source}: model_type={hf_config.get('model_type')!r}, expected 'deberta-v2'")
    if hf_config.get("conv_kernel_size", 0):
        raise ValueError(f"{source}: conv_kernel_size={hf_config['conv_kernel_size']} (the v2-xlarge conv layer) "
                         "is not part of DeBERTa-v3; dv3 does not build it")
    head_size = hf_config.get("attention_head_size")
    if head_size is not None and head_size * hf_config["num_attention_heads"] != hf_config["hidden_size"]:
        raise ValueError(f"{source}: attention_head_size={head_size} differs from hidden_size / num_attention_heads")
    fields = {k: v for k, v in hf_config.items() if k not in _IGNORED_HF_FIELDS}
    # HF's class defaults (v2-xlarge) apply to fields a file leaves out.
    fields.setdefault("relative_attention", False)
    fields.setdefault("position_biased_input", True)
    fields.setdefault("position_buckets", -1)
    fields.setdefault("norm_rel_ebd", "none")
    fields.setdefault("share_att_key", False)
    fields.setdefault("pos_att_type", [])
    if fields.get("embedding_size") == fields.get("hidden_size"):
        fields["embedding_size"] = None
    if fields.get("pad_token_id") is None:
        fields["pad_token_id"] = 0
    try:
        return EncoderConfig.from_dict(fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error


def encoder_config_to_hf(config: EncoderConfig, architectures: list[str] | None = None, **extra) -> dict:
    """A complete ``config.json`` dict: every structural field written out."""
    hf = config.to_dict()
    hf["embedding_size"] = config.word_embedding_size
    hf.update(
        model_type="deberta-v2",
        architectures=architectures or ["DebertaV2Model"],
        conv_kernel_size=0,
        pooler_hidden_size=config.hidden_size,
        pooler_dropout=0.0,
        pooler_hidden_act="gelu",
        legacy=False,
        torch_dtype="float32",
    )
    hf.update(extra)
    return hf


def read_hf_config(path: str | Path) -> dict:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a HF model folder needs a config.json")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from error
