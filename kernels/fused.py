"""Fused disentangled attention, host side: launches, the autograd function, the entry points.

The math is the reference's (``kernels/reference.py``)::

    S[i, j] = (q_i . k_j + q_i . Kr[s(i - j)] + k_j . Qr[s(i - j)]) * scale     (+ mask)
    O = dropout(softmax(S)) V

computed flash-style by the Triton kernels in ``forward_kernel.py``, ``backward_kernels.py``
and ``row_kernels.py`` (their shared tile math is in ``tiles.py``): no ``[L, L]`` tensor
exists; the forward saves only ``O`` and the row log-sum-exp. This module prepares their
inputs, picks each launch's tile config through a tuner (``kernels.tuning``), and wraps
forward and backward in one ``torch.autograd.Function``. docs/kernels.md has the design.

Dropout keeps element ``(z, h, i, j)`` by a Philox draw from ``seed`` and the element's
position, so the backward regenerates the forward's mask from the seed alone.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

from kernels.backward_kernels import backward_dkv_kernel, backward_dq_kernel
from kernels.config import (
    FUSED_DTYPES,
    FUSED_HEAD_DIMS,
    KernelConfig,
    Layout,
    band_rows,
    dot_precision,
    interpreter_active,
)
from kernels.forward_kernel import forward_kernel
from kernels.relative_position import SlotGeometry, slot_geometry
from kernels.row_kernels import ROW_BLOCK, delta_kernel, edge_dots_kernel, keep_mask_kernel
from kernels.tuning import tuner_for

# The attention kernels by the phase a tuner picks their config for.
KERNELS = {"forward": forward_kernel, "backward_dq": backward_dq_kernel, "backward_dkv": backward_dkv_kernel}

if interpreter_active():
    from kernels import _interpreter_compat

    _interpreter_compat.apply()

__all__ = [
    "FUSED_DTYPES",
    "FUSED_HEAD_DIMS",
    "KernelConfig",
    "dropout_keep_mask",
    "fused_disentangled_attention",
    "fused_disentangled_attention_varlen",
    "interpreter_active",
    "unsupported_reason",
]


def _poisoned() -> bool:
    # Tests set DV3_KERNEL_POISON=1 so that any output element a kernel fails to write is NaN.
    return os.environ.get("DV3_KERNEL_POISON", "0") == "1"


def _output_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan")) if _poisoned() else torch.empty_like(x)


def _output(shape, device) -> torch.Tensor:
    fill = float("nan") if _poisoned() else None
    if fill is None:
        return torch.empty(shape, device=device, dtype=torch.float32)
    return torch.full(shape, fill, device=device, dtype=torch.float32)


def _row_vector(layout: Layout, tokens: int, device, trailing: tuple[int, ...] = ()) -> torch.Tensor:
    shape = (layout.heads, tokens) if layout.varlen else (layout.sequences, layout.heads, layout.max_len)
    return _output(shape + trailing, device)


def _edge_dots(x: torch.Tensor, table: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``x . table[0]`` and ``x . table[-1]`` per row, fp32, in the per-row layout with a trailing 2."""
    tokens = x.shape[0] if layout.varlen else 0
    edges = _row_vector(layout, tokens, x.device, (2,))
    total = x.numel() // layout.head_dim
    edge_dots_kernel[(triton.cdiv(total, ROW_BLOCK),)](
        x, table, edges, total, layout.heads, layout.max_len, tokens,
        ROWS=table.shape[1], HEAD_DIM=layout.head_dim, BLOCK_R=ROW_BLOCK, VARLEN=layout.varlen,
    )
    return edges


def _delta(o: torch.Tensor, do: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``rowsum(O * dO)`` in fp32, per-row layout."""
    tokens = o.shape[0] if layout.varlen else 0
    delta = _row_vector(layout, tokens, o.device)
    total = o.numel() // layout.head_dim
    delta_kernel[(triton.cdiv(total, ROW_BLOCK),)](
        o, do, delta, total, layout.heads, layout.max_len, tokens,
        HEAD_DIM=layout.head_dim, BLOCK_R=ROW_BLOCK, VARLEN=layout.varlen,
    )
    return delta


def launch_scalars(layout: Layout, geometry: SlotGeometry, tokens: int, scale: float, dropout_p: float, seed: int) -> dict:
    """The scalar arguments every attention kernel takes, by name (the compile report specialises on these)."""
    stride_z, stride_h, stride_l, row_stride_z, row_stride_h = layout.strides(tokens)
    return dict(
        stride_z=stride_z, stride_h=stride_h, stride_l=stride_l, row_stride_z=row_stride_z, row_stride_h=row_stride_h,
        seq_len=layout.max_len, num_heads=layout.heads, sm_scale=float(scale), dropout_p=float(dropout_p), seed=seed,
        rng_len=layout.max_len, max_distance=geometry.max_distance, exact_lo=geometry.exact_lo,
        exact_hi=geometry.exact_hi, far_lo=geometry.far_lo, far_hi=geometry.far_hi,
    )


def forward_grid(layout: Layout, config: KernelConfig) -> tuple[int]:
    """One program per (query block, sequence, head), all on grid axis 0 (up to 2**31 - 1; axes 1 and 2 stop at 65,535)."""
    return (triton.cdiv(layout.max_len, config.block_m) * layout.sequences * layout.heads,)


def backward_programs(items: int, heads: int, device: torch.device) -> int:
    """Programs per head of a backward pass: about 8 per multiprocessor in all.

    Each program owns one ``[2k, D]`` fp32 partial slice, so this also bounds their memory
    (about 1000 slices of 128 KiB for v3 at D=64 on an H100, whatever the batch). On the CPU
    (interpreter) a deliberately small number makes programs walk several items, unevenly.
    """
    if device.type == "cuda":
        target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = int(os.environ.get("DV3_KERNEL_CPU_PROGRAMS", "3"))
    return max(1, min(items, triton.cdiv(target, heads)))


def _forward(q, k, v, rel_key, rel_query, mask, cu, layout, geometry, scale, dropout_p, seed, tuner):
    tokens = q.shape[0] if layout.varlen else 0
    o = _output_like(q)
    lse_shape = (layout.heads, tokens) if layout.varlen else (layout.sequences, layout.heads, layout.max_len)
    lse = _output(lse_shape, q.device)
    edge_q = _edge_dots(q, rel_key, layout)
    edge_k = _edge_dots(k, rel_query, layout)
    slot, _, _ = geometry.to(q.device)
    dummy = slot
    mask_arg = mask if mask is not None else dummy
    cu_arg = cu if cu is not None else dummy

    def launch(config, o=o, lse=lse):
        band = band_rows(geometry, config.block_m, config.block_n)
        grid = forward_grid(layout, config)
        forward_kernel[grid](
            q, k, v, rel_key, rel_query, edge_q, edge_k, mask_arg, cu_arg, slot, o, lse,
            **launch_scalars(layout, geometry, tokens, scale, dropout_p, seed),
            ROWS=geometry.rows, HEAD_DIM=layout.head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BAND=band, VARLEN=layout.varlen, HAS_MASK=mask is not None, DROPOUT=dropout_p > 0.0,
            DOT_PRECISION=dot_precision(q.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
        )

    config = tuner("forward", q, layout, mask is not None, dropout_p > 0.0, geometry, launch)
    launch(config)
    return o, lse


def _backward(q, k, v, rel_key, rel_query, mask, cu, o, lse, do, layout, geometry, scale, dropout_p, seed, tuner):
    tokens = q.shape[0] if layout.varlen else 0
    delta = _delta(o, do, layout)
    edge_q = _edge_dots(q, rel_key, layout)
    edge_k = _edge_dots(k, rel_query, layout)
    slot, first, last = geometry.to(q.device)
    dummy = slot
    mask_arg = mask if mask is not None else dummy
    cu_arg = cu if cu is not None else dummy
    rows, head_dim = geometry.rows, layout.head_dim
    common = launch_scalars(layout, geometry, tokens, scale, dropout_p, seed)
    flags = dict(
        ROWS=rows, HEAD_DIM=head_dim, VARLEN=layout.varlen, HAS_MASK=mask is not None,
        DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision(q.dtype),
    )
    dq = _output_like(q)
    dk = _output_like(k)
    dv = _output_like(v)
    results: dict[str, torch.Tensor] = {}

    heads = layout.heads

    def launch_dq(config, dq=dq, keep: bool = False):
        blocks = triton.cdiv(layout.max_len, config.block_m)
        items = layout.sequences * blocks
        programs = backward_programs(items, heads, q.device)
        part = torch.zeros(heads * programs, rows, head_dim, device=q.device, dtype=torch.float32)
        backward_dq_kernel[(programs, heads)](
            q, k, v, rel_key, rel_query, edge_q, edge_k, mask_arg, cu_arg, slot, first, last, do, lse, delta, dq, part,
            **common, items=items, blocks=blocks,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BAND=band_rows(geometry, config.block_m, config.block_n),
            num_warps=config.num_warps, num_stages=config.num_stages, **flags,
        )
        if keep:
            results["d_rel_key"] = part.view(heads, programs, rows, head_dim).sum(1)

    def launch_dkv(config, dk=dk, dv=dv, keep: bool = False):
        blocks = triton.cdiv(layout.max_len, config.block_n)
        items = layout.sequences * blocks
        programs = backward_programs(items, heads, q.device)
        part = torch.zeros(heads * programs, rows, head_dim, device=q.device, dtype=torch.float32)
        backward_dkv_kernel[(programs, heads)](
            q, k, v, rel_key, rel_query, edge_q, edge_k, mask_arg, cu_arg, slot, first, last, do, lse, delta, dk, dv, part,
            **common, items=items, blocks=blocks,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BAND=band_rows(geometry, config.block_m, config.block_n),
            num_warps=config.num_warps, num_stages=config.num_stages, **flags,
        )
        if keep:
            results["d_rel_query"] = part.view(heads, programs, rows, head_dim).sum(1)

    has_mask, dropout = mask is not None, dropout_p > 0.0
    launch_dq(tuner("backward_dq", q, layout, has_mask, dropout, geometry, launch_dq), keep=True)
    launch_dkv(tuner("backward_dkv", q, layout, has_mask, dropout, geometry, launch_dkv), keep=True)
    return dq, dk, dv, results["d_rel_key"].to(rel_key.dtype), results["d_rel_query"].to(rel_query.dtype)


def _on_device(x: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensors' one.
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_key, rel_query, mask, cu, layout, geometry, scale, dropout_p, seed, tuner):
        with _on_device(q):
            o, lse = _forward(q, k, v, rel_key, rel_query, mask, cu, layout, geometry, scale, dropout_p, seed, tuner)
        ctx.save_for_backward(q, k, v, rel_key, rel_query, o, lse)
        ctx.mask, ctx.cu = mask, cu
        ctx.settings = (layout, geometry, scale, dropout_p, seed, tuner)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, rel_key, rel_query, o, lse = ctx.saved_tensors
        layout, geometry, scale, dropout_p, seed, tuner = ctx.settings
        with _on_device(q):
            grads = _backward(
                q, k, v, rel_key, rel_query, ctx.mask, ctx.cu, o, lse, do.contiguous(), layout, geometry, scale, dropout_p, seed, tuner
            )
        return (*grads, None, None, None, None, None, None, None, None)


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the fused kernels cannot take ``q`` (None when they can)."""
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreter_active()):
        return f"tensors are on {q.device.type} (fused kernels need CUDA, or the CPU with TRITON_INTERPRET=1)"
    if q.dtype not in FUSED_DTYPES:
        return f"dtype {q.dtype} is not one of float16, bfloat16, float32"
    if q.shape[-1] not in FUSED_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not one of {FUSED_HEAD_DIMS}"
    return None


def _same_dtype_contiguous(q, k, v, rel_key, rel_query) -> list[torch.Tensor]:
    # The kernels' dots need one operand dtype; under autocast the relative projections can
    # come out in another. The cast happens outside the autograd function, so it is differentiated.
    return [t.to(q.dtype).contiguous() for t in (q, k, v, rel_key, rel_query)]


def _draw_seed(dropout_p: float) -> int:
    # Drawn from torch's CPU generator: reproducible under torch.manual_seed, restored by
    # activation checkpointing, and it costs no device synchronisation.
    return int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0.0 else 0


def _check_dropout(dropout_p: float, length: int) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and length * ((length + 3) // 4) >= 2**31:
        # The Philox counter i * ceil(L / 4) + j // 4 is computed in 32 bits.
        raise ValueError(f"attention dropout supports sequences up to 92681 tokens, got length {length}")


def fused_disentangled_attention(
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
    seed: int | None = None,
    config=None,
) -> torch.Tensor:
    """The fused path for padded ``[B, H, L, D]`` input (shapes checked by the dispatcher).

    ``seed`` fixes the dropout mask (see :func:`dropout_keep_mask`); ``config`` (a
    ``kernels.tuning.KernelConfig``) forces one tile shape for every pass.
    """
    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"fused disentangled attention unavailable: {reason}")
    batch, heads, length, head_dim = q.shape
    _check_dropout(dropout_p, length)
    geometry = slot_geometry(position_buckets, max_relative_positions)
    layout = Layout(varlen=False, sequences=batch, heads=heads, max_len=length, head_dim=head_dim)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.to(device=q.device, dtype=torch.int8).contiguous()
    seed = _draw_seed(dropout_p) if seed is None else int(seed)
    return _FusedAttention.apply(
        *_same_dtype_contiguous(q, k, v, rel_key, rel_query),
        mask, None, layout, geometry, float(scale if scale is not None else (3 * head_dim) ** -0.5),
        float(dropout_p), seed, tuner_for(config),
    )


def fused_disentangled_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_key: torch.Tensor,
    rel_query: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    position_buckets: int = 256,
    max_relative_positions: int = 512,
    dropout_p: float = 0.0,
    scale: float | None = None,
    seed: int | None = None,
    config=None,
) -> torch.Tensor:
    """The fused path for packed ``[T, H, D]`` input; relative positions restart at each ``cu_seqlens`` boundary."""
    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"fused disentangled attention unavailable: {reason}")
    tokens, heads, head_dim = q.shape
    _check_dropout(dropout_p, int(max_seqlen))
    geometry = slot_geometry(position_buckets, max_relative_positions)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    layout = Layout(varlen=True, sequences=cu.numel() - 1, heads=heads, max_len=int(max_seqlen), head_dim=head_dim)
    seed = _draw_seed(dropout_p) if seed is None else int(seed)
    return _FusedAttention.apply(
        *_same_dtype_contiguous(q, k, v, rel_key, rel_query),
        None, cu, layout, geometry, float(scale if scale is not None else (3 * head_dim) ** -0.5),
        float(dropout_p), seed, tuner_for(config),
    )


def dropout_keep_mask(seed: int, batch: int, heads: int, length: int, dropout_p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The boolean keep-mask ``[batch, heads, length, length]`` the kernels use for ``seed``.

    For packed batches pass ``batch = number of sequences`` and ``length = max_seqlen``; the
    mask of sequence ``z`` (length ``n``) is ``[z, :, :n, :n]``. Small shapes only: it is
    the ``[B, H, L, L]`` tensor the kernels never build.
    """
    out = torch.empty(batch, heads, length, length, dtype=torch.int8, device=device)
    block = 32
    grid = (batch * heads, triton.cdiv(length, block), triton.cdiv(length, block))
    with _on_device(out):
        keep_mask_kernel[grid](out, seed, float(dropout_p), length, BLOCK=block)
    return out.bool()
