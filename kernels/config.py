"""What the launchers (``kernels.fused``) and the tuner (``kernels.tuning``) both need.

Where the kernels run, which inputs they take, a tile configuration, how a padded or packed
batch is laid out in memory, and the width of a tile's slot band. Nothing here launches a
kernel, so both sides import it without importing each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kernels.relative_position import SlotGeometry

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FUSED_HEAD_DIMS = (32, 64, 128)

# The kernel launches a tuner picks a config for, one key each. The backward has two variants:
# "slices" (backward_dq, backward_dkv: programs own [2k, D] partial slices, read-modify-write per
# band tile) and "split" (band and far kernels per pass, slot gradients stored once and folded).
PHASES = (
    "forward",
    "backward_dq",
    "backward_dkv",
    "backward_band_dq",
    "backward_far_dq",
    "backward_band_dkv",
    "backward_far_dkv",
)
BACKWARD_VARIANTS = ("slices", "split")


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class KernelConfig:
    """One launch's tile shape: ``block_m`` query rows by ``block_n`` key columns, warps, pipeline stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"KernelConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"KernelConfig.num_stages must be >= 1, got {self.num_stages}")


@dataclass(frozen=True)
class Layout:
    """Where sequence ``z``, head ``h``, token ``i`` lives, for padded or packed input.

    Padded: tensors ``[Z, H, L, D]`` and per-row vectors ``[Z, H, L]``. Packed: tensors
    ``[T, H, D]``, per-row vectors ``[H, T]``, sequence ``z`` = tokens ``cu[z]:cu[z+1]``.
    """

    varlen: bool
    sequences: int
    heads: int
    max_len: int
    head_dim: int

    def strides(self, tokens: int) -> tuple[int, int, int, int, int]:
        """(stride_z, stride_h, stride_l) of the data and (row_stride_z, row_stride_h) of per-row vectors."""
        h, d, length = self.heads, self.head_dim, self.max_len
        if self.varlen:
            return 0, d, h * d, 0, tokens
        return h * length * d, length * d, d, h * length, length

    def head_major_strides(self, tokens: int) -> tuple[int, int]:
        """(stride_z, stride_h) of head-major per-row buffers ``[H, rows, ...]``: ``[H, Z*L]`` padded, ``[H, T]`` packed."""
        if self.varlen:
            return 0, tokens
        return self.max_len, self.sequences * self.max_len


def band_rows(geometry: SlotGeometry, block_m: int, block_n: int) -> int:
    """``BAND``: rows of the relative tables a ``block_m x block_n`` tile reads (a power of two, >= 16)."""
    width = geometry.band_width(block_m, block_n)
    return max(16, 1 << (width - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' ``tl.dot`` precision: fp32 inputs must not silently drop to tf32 (the fp32 path is the exact one)."""
    return "ieee" if dtype == torch.float32 else "tf32"
