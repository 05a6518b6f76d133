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
from kernels.backward_split_kernels import band_dkv_kernel, band_dq_kernel, far_dkv_kernel, far_dq_kernel
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
KERNELS = {
    "forward": forward_kernel,
    "backward_dq": backward_dq_kernel,
    "backward_dkv": backward_dkv_kernel,
    "backward_band_dq": band_dq_kernel,
    "backward_far_dq": far_dq_kernel,
    "backward_band_dkv": band_dkv_kernel,
    "backward_far_dkv": far_dkv_kernel,
}

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
    head_stride_z, head_stride_h = layout.head_major_strides(tokens)
    return dict(
        stride_z=stride_z, stride_h=stride_h, stride_l=stride_l, row_stride_z=row_stride_z, row_stride_h=row_stride_h,
        seq_len=layout.max_len, num_heads=layout.heads, sm_scale=float(scale), dropout_p=float(dropout_p), seed=seed,
        rng_len=layout.max_len, max_distance=geometry.max_distance, exact_lo=geometry.exact_lo,
        exact_hi=geometry.exact_hi, far_lo=geometry.far_lo, far_hi=geometry.far_hi,
        head_stride_z=head_stride_z, head_stride_h=head_stride_h,
    )


def forward_grid(layout: Layout, config: KernelConfig) -> tuple[int]:
    """One program per (query block, sequence, head), all on grid axis 0 (up to 2**31 - 1; axes 1 and 2 stop at 65,535)."""
    return (triton.cdiv(layout.max_len, config.block_m) * layout.sequences * layout.heads,)


def key_grid(layout: Layout, config: KernelConfig) -> tuple[int]:
    """One program per (key block, sequence, head), on grid axis 0."""
    return (triton.cdiv(layout.max_len, config.block_n) * layout.sequences * layout.heads,)


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


class _BackwardInputs:
    """What both backward variants read: the saved tensors, the per-row vectors, the launch flags."""

    def __init__(self, q, k, v, rel_key, rel_query, mask, cu, o, lse, do, layout, geometry, scale, dropout_p, seed):
        self.q, self.k, self.v, self.rel_key, self.rel_query = q, k, v, rel_key, rel_query
        self.do, self.lse, self.layout, self.geometry = do, lse, layout, geometry
        self.tokens = q.shape[0] if layout.varlen else 0
        self.delta = _delta(o, do, layout)
        self.edge_q = _edge_dots(q, rel_key, layout)
        self.edge_k = _edge_dots(k, rel_query, layout)
        self.slot, self.first, self.last = geometry.to(q.device)
        self.mask = mask if mask is not None else self.slot  # a dummy pointer when unused
        self.cu = cu if cu is not None else self.slot
        self.has_mask, self.dropout = mask is not None, dropout_p > 0.0
        self.scalars = launch_scalars(layout, geometry, self.tokens, scale, dropout_p, seed)
        self.flags = dict(
            ROWS=geometry.rows, HEAD_DIM=layout.head_dim, VARLEN=layout.varlen, HAS_MASK=mask is not None,
            DROPOUT=dropout_p > 0.0, DOT_PRECISION=dot_precision(q.dtype),
        )

    def tune(self, tuner, phase: str, launch) -> KernelConfig:
        return tuner(phase, self.q, self.layout, self.has_mask, self.dropout, self.geometry, launch)


def _backward_slices(x: _BackwardInputs, tuner) -> tuple[torch.Tensor, ...]:
    """The first backward: two passes whose programs own ``[2k, D]`` fp32 partial slices."""
    q, layout, geometry = x.q, x.layout, x.geometry
    rows, head_dim, heads = geometry.rows, layout.head_dim, layout.heads
    dq, dk, dv = _output_like(q), _output_like(x.k), _output_like(x.v)
    results: dict[str, torch.Tensor] = {}

    def launch_dq(config, keep: bool = False):
        blocks = triton.cdiv(layout.max_len, config.block_m)
        items = layout.sequences * blocks
        programs = backward_programs(items, heads, q.device)
        part = torch.zeros(heads * programs, rows, head_dim, device=q.device, dtype=torch.float32)
        backward_dq_kernel[(programs, heads)](
            q, x.k, x.v, x.rel_key, x.rel_query, x.edge_q, x.edge_k, x.mask, x.cu, x.slot, x.first, x.last,
            x.do, x.lse, x.delta, dq, part, **x.scalars, items=items, blocks=blocks,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BAND=band_rows(geometry, config.block_m, config.block_n),
            num_warps=config.num_warps, num_stages=config.num_stages, **x.flags,
        )
        if keep:
            results["d_rel_key"] = part.view(heads, programs, rows, head_dim).sum(1)

    def launch_dkv(config, keep: bool = False):
        blocks = triton.cdiv(layout.max_len, config.block_n)
        items = layout.sequences * blocks
        programs = backward_programs(items, heads, q.device)
        part = torch.zeros(heads * programs, rows, head_dim, device=q.device, dtype=torch.float32)
        backward_dkv_kernel[(programs, heads)](
            q, x.k, x.v, x.rel_key, x.rel_query, x.edge_q, x.edge_k, x.mask, x.cu, x.slot, x.first, x.last,
            x.do, x.lse, x.delta, dk, dv, part, **x.scalars, items=items, blocks=blocks,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BAND=band_rows(geometry, config.block_m, config.block_n),
            num_warps=config.num_warps, num_stages=config.num_stages, **x.flags,
        )
        if keep:
            results["d_rel_query"] = part.view(heads, programs, rows, head_dim).sum(1)

    launch_dq(x.tune(tuner, "backward_dq", launch_dq), keep=True)
    launch_dkv(x.tune(tuner, "backward_dkv", launch_dkv), keep=True)
    return dq, dk, dv, results["d_rel_key"].to(x.rel_key.dtype), results["d_rel_query"].to(x.rel_query.dtype)


def _per_head(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``[H, rows, D]``: padded ``[Z, H, L, D]`` or packed ``[T, H, D]`` rows grouped by head (the fold's operand)."""
    if layout.varlen:
        return t.transpose(0, 1)
    return t.transpose(0, 1).reshape(layout.heads, -1, layout.head_dim)


def _fold(slot_grad: torch.Tensor, edge_grad: torch.Tensor, rows_by_head: torch.Tensor) -> torch.Tensor:
    """``d(table)[h] = slot_grad[h]^T rows[h]``, plus the far pairs' edge-slot sums: ``[H, 2k, D]`` fp32.

    One batched matmul (deterministic, fp32 accumulation) in place of per-tile read-modify-writes.
    """
    folded = torch.bmm(slot_grad.transpose(1, 2), rows_by_head).float()
    edges = torch.bmm(edge_grad.transpose(1, 2), rows_by_head.float())  # [H, 2, D]: slot 0, last slot
    folded[:, 0] += edges[:, 0]
    folded[:, -1] += edges[:, 1]
    return folded


def _backward_split(x: _BackwardInputs, tuner) -> tuple[torch.Tensor, ...]:
    """The Hopper backward: band kernels store slot-space gradients once, far kernels are plain flash attention."""
    q, layout, geometry = x.q, x.layout, x.geometry
    heads = layout.heads
    rows_per_head = x.tokens if layout.varlen else layout.sequences * layout.max_len
    # dC2P, then dP2C: in the input dtype, like the P and dS tiles that feed the kernels' dots.
    slot_grad = torch.zeros(heads, rows_per_head, geometry.rows, device=q.device, dtype=q.dtype)
    edge_grad = _output((heads, rows_per_head, 2), q.device)
    dq_acc = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    dq, dk, dv = _output_like(q), _output_like(x.k), _output_like(x.v)
    far_scalars = {name: x.scalars[name] for name in x.scalars if name not in ("max_distance", "exact_lo", "exact_hi")}

    def launch_band_dq(config):
        band_dq_kernel[forward_grid(layout, config)](
            q, x.k, x.v, x.rel_key, x.rel_query, x.mask, x.cu, x.slot, x.first, x.last, x.do, x.lse, x.delta,
            dq_acc, slot_grad, **x.scalars,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BAND=band_rows(geometry, config.block_m, config.block_n),
            num_warps=config.num_warps, num_stages=config.num_stages, **x.flags,
        )

    def launch_far_dq(config):
        far_dq_kernel[forward_grid(layout, config)](
            q, x.k, x.v, x.rel_key, x.edge_q, x.edge_k, x.mask, x.cu, x.do, x.lse, x.delta, dq_acc, dq, edge_grad,
            **far_scalars, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            num_warps=config.num_warps, num_stages=config.num_stages, **x.flags,
        )

    launch_band_dq(x.tune(tuner, "backward_band_dq", launch_band_dq))
    launch_far_dq(x.tune(tuner, "backward_far_dq", launch_far_dq))
    d_rel_key = _fold(slot_grad, edge_grad, _per_head(q, layout))

    slot_grad.zero_()
    dk_acc = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    dv_acc = torch.empty(q.shape, device=q.device, dtype=torch.float32)

    def launch_band_dkv(config):
        band_dkv_kernel[key_grid(layout, config)](
            q, x.k, x.v, x.rel_key, x.rel_query, x.mask, x.cu, x.slot, x.first, x.last, x.do, x.lse, x.delta,
            dk_acc, dv_acc, slot_grad, **x.scalars,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BAND=band_rows(geometry, config.block_m, config.block_n),
            num_warps=config.num_warps, num_stages=config.num_stages, **x.flags,
        )

    def launch_far_dkv(config):
        far_dkv_kernel[key_grid(layout, config)](
            q, x.k, x.v, x.rel_query, x.edge_q, x.edge_k, x.mask, x.cu, x.do, x.lse, x.delta, dk_acc, dv_acc,
            dk, dv, edge_grad, **far_scalars, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            num_warps=config.num_warps, num_stages=config.num_stages, **x.flags,
        )

    launch_band_dkv(x.tune(tuner, "backward_band_dkv", launch_band_dkv))
    launch_far_dkv(x.tune(tuner, "backward_far_dkv", launch_far_dkv))
    d_rel_query = _fold(slot_grad, edge_grad, _per_head(x.k, layout))
    return dq, dk, dv, d_rel_key.to(x.rel_key.dtype), d_rel_query.to(x.rel_query.dtype)


BACKWARDS = {"slices": _backward_slices, "split": _backward_split}


def _backward(q, k, v, rel_key, rel_query, mask, cu, o, lse, do, layout, geometry, scale, dropout_p, seed, tuner):
    inputs = _BackwardInputs(q, k, v, rel_key, rel_query, mask, cu, o, lse, do, layout, geometry, scale, dropout_p, seed)
    variant = tuner.backward_variant(
        q, layout, inputs.has_mask, inputs.dropout, geometry, lambda name: BACKWARDS[name](inputs, tuner)
    )
    return BACKWARDS[variant](inputs, tuner)


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
    backward: str | None = None,
) -> torch.Tensor:
    """The fused path for padded ``[B, H, L, D]`` input (shapes checked by the dispatcher).

    ``seed`` fixes the dropout mask (see :func:`dropout_keep_mask`); ``config`` (a
    ``kernels.tuning.KernelConfig``) forces one tile shape for every pass; ``backward`` (``"slices"`` or
    ``"split"``) forces a backward variant (default: ``DV3_KERNEL_BACKWARD``, else timed on the GPU).
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
        float(dropout_p), seed, tuner_for(config, backward),
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
    backward: str | None = None,
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
        float(dropout_p), seed, tuner_for(config, backward),
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
