"""The fused attention as ``torch.library`` custom ops, so ``torch.compile`` sees one opaque
operation (no graph break) and differentiates it with the kernels' own backward.

``dv3::fused_attention`` returns the output and the rows' log-sum-exp; its autograd formula calls
``dv3::fused_attention_backward``. Each op has a fake (meta) implementation, so the compiler
knows the output shapes without running a kernel. The dropout seed travels as a one-element
int64 tensor: drawing it does not break the graph, and the backward regenerates the same mask.
"""

from __future__ import annotations

import torch

from kernels.config import Layout
from kernels.fused import _backward, _forward, _on_device
from kernels.relative_position import slot_geometry
from kernels.tuning import tuner_for


def _layout(q: torch.Tensor) -> Layout:
    batch, heads, length, head_dim = q.shape
    return Layout(varlen=False, sequences=batch, heads=heads, max_len=length, head_dim=head_dim)


@torch.library.custom_op("dv3::fused_attention", mutates_args=())
def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_key: torch.Tensor,
                    rel_query: torch.Tensor, mask: torch.Tensor | None, position_buckets: int,
                    max_relative_positions: int, scale: float, dropout_p: float,
                    seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _on_device(q):
        return _forward(q, k, v, rel_key, rel_query, mask, None, _layout(q),
                        slot_geometry(position_buckets, max_relative_positions), scale, dropout_p, int(seed.item()),
                        tuner_for(None))


@fused_attention.register_fake
def _(q, k, v, rel_key, rel_query, mask, position_buckets, max_relative_positions, scale, dropout_p, seed):
    batch, heads, length, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, heads, length), dtype=torch.float32)


@torch.library.custom_op("dv3::fused_attention_backward", mutates_args=())
def fused_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             rel_key: torch.Tensor, rel_query: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                             mask: torch.Tensor | None, position_buckets: int, max_relative_positions: int, scale: float,
                             dropout_p: float, seed: torch.Tensor) -> list[torch.Tensor]:
    with _on_device(q):
        return list(_backward(q, k, v, rel_key, rel_query, mask, None, o, lse, do.contiguous(), _layout(q),
                              slot_geometry(position_buckets, max_relative_positions), scale, dropout_p,
                              int(seed.item()), tuner_for(None)))


@fused_attention_backward.register_fake
def _(do, q, k, v, rel_key, rel_query, o, lse, mask, position_buckets, max_relative_positions, scale, dropout_p, seed):
    return [torch.empty_like(t) for t in (q, k, v, rel_key, rel_query)]


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, rel_key, rel_query, mask, position_buckets, max_relative_positions, scale, dropout_p, seed = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, rel_key, rel_query, o, lse, mask, seed)
    ctx.settings = (position_buckets, max_relative_positions, scale, dropout_p)


def _backward_formula(ctx, do, dlse):
    q, k, v, rel_key, rel_query, o, lse, mask, seed = ctx.saved_tensors
    grads = torch.ops.dv3.fused_attention_backward(do, q, k, v, rel_key, rel_query, o, lse, mask, *ctx.settings, seed)
    return (*grads, None, None, None, None, None, None)


fused_attention.register_autograd(_backward_formula, setup_context=_setup_context)


def compilable_fused_attention(q, k, v, rel_key, rel_query, attention_mask=None, *, position_buckets: int = 256,
                               max_relative_positions: int = 512, dropout_p: float = 0.0,
                               scale: float | None = None) -> torch.Tensor:
    """``fused_disentangled_attention`` through the custom op (padded ``[B, H, L, D]`` input)."""
    head_dim = q.shape[-1]
    mask = None if attention_mask is None else attention_mask.to(device=q.device, dtype=torch.int8).contiguous()
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64) if dropout_p > 0.0 else torch.zeros(1, dtype=torch.int64)
    q, k, v, rel_key, rel_query = (t.to(q.dtype).contiguous() for t in (q, k, v, rel_key, rel_query))
    output, _ = torch.ops.dv3.fused_attention(q, k, v, rel_key, rel_query, mask, position_buckets,
                                              max_relative_positions,
                                              float(scale if scale is not None else (3 * head_dim) ** -0.5),
                                              float(dropout_p), seed)
    return output
