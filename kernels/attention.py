"""``disentangled_attention``: the one call the model makes; it picks the implementation.

Paths: ``reference`` (plain PyTorch, any device and dtype) and, where available, the
fused Triton kernels. ``DV3_ATTENTION=reference|fused|auto`` forces a path (default
``auto``: fused on CUDA for supported dtypes and head dims, reference otherwise).
"""

from __future__ import annotations

import os

import torch

from kernels.reference import disentangled_attention_reference
from kernels.relative_position import relative_span

ATTENTION_PATHS = ("auto", "reference", "fused")


def attention_path_from_env() -> str:
    path = os.environ.get("DV3_ATTENTION", "auto").strip().lower() or "auto"
    if path not in ATTENTION_PATHS:
        raise ValueError(f"DV3_ATTENTION={path!r} is not one of {', '.join(ATTENTION_PATHS)}")
    return path


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_key: torch.Tensor,
    rel_query: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_buckets: int,
    max_relative_positions: int,
) -> None:
    """Raise a ``ValueError`` naming the argument whose shape disagrees with the others."""
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, heads, length, head_dim], got shape {tuple(q.shape)}")
    for name, tensor in (("k", k), ("v", v)):
        if tensor.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but q has {tuple(q.shape)}")
    batch, heads, length, head_dim = q.shape
    rows = 2 * relative_span(position_buckets, max_relative_positions)
    for name, tensor in (("rel_key", rel_key), ("rel_query", rel_query)):
        if tuple(tensor.shape) != (heads, rows, head_dim):
            raise ValueError(
                f"{name} must be [heads={heads}, 2*span={rows}, head_dim={head_dim}] for "
                f"position_buckets={position_buckets}, max_relative_positions={max_relative_positions}; "
                f"got {tuple(tensor.shape)}"
            )
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must be [batch={batch}, length={length}], got {tuple(attention_mask.shape)}")


def disentangled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_key: torch.Tensor,
    rel_query: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    position_buckets: int = 256,
    max_relative_positions: int = 512,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """DeBERTa-v3 attention: ``softmax((Q K^T + c2p + p2c) * scale + mask) V``.

    Shapes: ``q, k, v`` ``[B, H, L, D]``; ``rel_key``/``rel_query`` the projected relative
    embeddings ``[H, 2*position_buckets, D]``; ``attention_mask`` ``[B, L]`` (1 = token,
    0 = padding). ``scale`` defaults to ``1 / sqrt(3 * D)``. Returns ``[B, H, L, D]``.
    """
    check_attention_inputs(q, k, v, rel_key, rel_query, attention_mask, position_buckets, max_relative_positions)
    return disentangled_attention_reference(
        q,
        k,
        v,
        rel_key,
        rel_query,
        attention_mask,
        position_buckets=position_buckets,
        max_relative_positions=max_relative_positions,
        dropout_p=dropout_p,
        scale=scale,
    )
