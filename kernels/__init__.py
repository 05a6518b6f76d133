"""dv3 kernels: DeBERTa-v3 disentangled attention, its reference and its fused Triton path.

This package never imports ``engine`` or ``data_pipeline``.
"""

from kernels.attention import (
    attention_path_from_env,
    disentangled_attention,
    disentangled_attention_varlen,
    select_attention_path,
)
from kernels.reference import disentangled_attention_reference
from kernels.relative_position import log_bucket, relative_slots, relative_span, slot_of_distance, used_slots

# Marker that lets ``engine`` tell this package from Hugging Face's unrelated ``kernels``.
DV3_KERNELS = True

__all__ = [
    "DV3_KERNELS",
    "attention_path_from_env",
    "disentangled_attention",
    "disentangled_attention_varlen",
    "disentangled_attention_reference",
    "log_bucket",
    "relative_slots",
    "relative_span",
    "select_attention_path",
    "slot_of_distance",
    "used_slots",
]
