"""``disentangled_attention``: the one call the model makes; it picks the implementation.

Paths: ``reference`` (plain PyTorch, any device and dtype) and the fused Triton kernels
(``kernels/fused.py``). ``DV3_ATTENTION=reference|fused|auto`` forces a path (default
``auto``: fused on CUDA for fp16/bf16/fp32 and head dims 32/64/128, reference otherwise).
``fused`` also runs on the CPU under ``TRITON_INTERPRET=1`` (how the kernels are tested)
and fails with the reason when the inputs cannot take it.

``disentangled_attention_varlen`` is the packed entry point (``[T, H, D]`` tokens,
``cu_seqlens`` boundaries, relative positions restarting in each sequence).
"""

from __future__ import annotations

import os

import torch

from kernels.reference import disentangled_attention_reference
from kernels.relative_position import relative_span

ATTENTION_PATHS = ("auto", "reference", "fused")


def attention_path_from_env() -> str:
    """The ``DV3_ATTENTION`` setting, validated (``ValueError`` naming the bad value)."""
    path = os.environ.get("DV3_ATTENTION", "auto").strip().lower() or "auto"
    if path not in ATTENTION_PATHS:
        raise ValueError(f"DV3_ATTENTION={path!r} is not one of {', '.join(ATTENTION_PATHS)}")
    return path


def _fused_unavailable(q: torch.Tensor) -> str | None:
    try:
        from kernels.fused import unsupported_reason
    except ImportError as error:  # no Triton in this environment
        return f"Triton is not importable ({error})"
    return unsupported_reason(q)


def select_attention_path(q: torch.Tensor, path: str | None = None) -> str:
    """``"fused"`` or ``"reference"`` for inputs like ``q`` under ``path`` (default: ``DV3_ATTENTION``).

    ``auto`` takes the fused kernels on CUDA when they support the dtype and head dim;
    ``fused`` insists and raises a ``ValueError`` saying why when they cannot run.
    """
    path = attention_path_from_env() if path is None else path
    if path not in ATTENTION_PATHS:
        raise ValueError(f"attention path {path!r} is not one of {', '.join(ATTENTION_PATHS)}")
    if path == "reference":
        return "reference"
    reason = _fused_unavailable(q)
    if path == "fused":
        if reason is not None:
            raise ValueError(f"DV3_ATTENTION=fused but the fused kernels cannot run: {reason}")
        return "fused"
    return "fused" if reason is None and q.device.type == "cuda" else "reference"


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
    if select_attention_path(q) == "fused" and torch.compiler.is_compiling():
        # Under torch.compile: the kernels as one opaque custom op with their own backward (no graph break).
        from kernels.custom_op import compilable_fused_attention as implementation
    elif select_attention_path(q) == "fused":
        from kernels.fused import fused_disentangled_attention as implementation
    else:
        implementation = disentangled_attention_reference
    return implementation(
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


def disentangled_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_key: torch.Tensor,
    rel_query: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    position_buckets: int = 256,
    max_relative_positions: int = 512,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over packed sequences: no padding, relative positions restart per sequence.

    ``q, k, v`` ``[T, H, D]`` (the tokens of all sequences, back to back); ``cu_seqlens``
    ``[N + 1]`` int, ``0 = cu[0] <= cu[1] <= ... = T``; sequence ``z`` is tokens
    ``cu[z]:cu[z+1]``. ``max_seqlen`` (longest sequence) is read from ``cu_seqlens`` when not
    given (a device sync). Returns ``[T, H, D]``.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got shape {tuple(q.shape)}")
    for name, tensor in (("k", k), ("v", v)):
        if tensor.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but q has {tuple(q.shape)}")
    tokens, heads, head_dim = q.shape
    rows = 2 * relative_span(position_buckets, max_relative_positions)
    for name, tensor in (("rel_key", rel_key), ("rel_query", rel_query)):
        if tuple(tensor.shape) != (heads, rows, head_dim):
            raise ValueError(f"{name} must be [heads={heads}, 2*span={rows}, head_dim={head_dim}], got {tuple(tensor.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"cu_seqlens must be a 1-d integer tensor of at least 2 entries, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    boundaries = cu_seqlens.detach().to("cpu", torch.int64)
    lengths = boundaries[1:] - boundaries[:-1]
    if int(boundaries[0]) != 0 or int(boundaries[-1]) != tokens or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to tokens={tokens}, got {boundaries.tolist()[:8]}...")
    longest = int(lengths.max())
    if max_seqlen is None:
        max_seqlen = longest
    elif max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest sequence ({longest})")

    if select_attention_path(q) == "fused":
        from kernels.fused import fused_disentangled_attention_varlen

        return fused_disentangled_attention_varlen(
            q, k, v, rel_key, rel_query, cu_seqlens, max_seqlen,
            position_buckets=position_buckets, max_relative_positions=max_relative_positions,
            dropout_p=dropout_p, scale=scale,
        )
    # Reference: each sequence on its own, as a batch of one.
    outputs = []
    for start, end in zip(boundaries[:-1].tolist(), boundaries[1:].tolist(), strict=True):
        if end == start:  # an empty sequence adds no tokens (the fused path skips it the same way)
            continue
        piece = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out = disentangled_attention_reference(
            *piece, rel_key, rel_query, None,
            position_buckets=position_buckets, max_relative_positions=max_relative_positions,
            dropout_p=dropout_p, scale=scale,
        )
        outputs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outputs, dim=0) if outputs else q.new_empty(q.shape)
