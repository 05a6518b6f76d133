"""What the GPU will run: the tuned tile configs of every pass and both backward variants, in
bf16 at DeBERTa-v3's geometry (position_buckets 256, max_relative_positions 512) at a length
where the exact, log and far regions all occur, and a packed batch with more sequences x heads
than a CUDA grid's second axis holds. Compiled kernels only: these need a CUDA GPU (the CPU
interpreter runs the same kernels in tests/test_kernels_fused.py on small shapes)."""

from __future__ import annotations

import random

import pytest
import torch

from kernels.config import BACKWARD_VARIANTS, PHASES, interpreter_active
from kernels.fused import fused_disentangled_attention, fused_disentangled_attention_varlen
from kernels.reference import disentangled_attention_reference
from kernels.relative_position import slot_geometry
from kernels.tuning import candidate_configs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or interpreter_active(),
    reason="needs a CUDA GPU: compiles and runs the tuned tile configs on the device",
)

NAMES = ("out", "q", "k", "v", "rel_key", "rel_query")
BF16_TOL = 2e-2
V3 = dict(position_buckets=256, max_relative_positions=512)
LENGTH = 1100  # > far_hi (506) and > -far_lo (512): exact, log and far tiles in both directions


def _phase_configs(index: int, dtype: torch.dtype, head_dim: int) -> dict:
    """Candidate ``index`` of every phase (cycling through shorter lists)."""
    chosen = {}
    for phase in PHASES:
        candidates = candidate_configs(phase, head_dim, dtype)
        chosen[phase] = candidates[index % len(candidates)]
    return chosen


def _rounds(dtype: torch.dtype, head_dim: int) -> int:
    return max(len(candidate_configs(phase, head_dim, dtype)) for phase in PHASES)


def _relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x64, ref64 = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x64).all():
        return float("inf")
    return ((x64 - ref64).norm() / ref64.norm()).item()


def _inputs(seed: int, shape: tuple, heads: int, head_dim: int, dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, grad = (torch.randn(shape, generator=gen, device="cuda") for _ in range(4))
    rel_key, rel_query = (torch.randn(heads, 512, head_dim, generator=gen, device="cuda") for _ in range(2))
    return [t.to(dtype) for t in (q, k, v, rel_key, rel_query)], grad.to(dtype)


def test_v3_geometry_length_covers_every_region():
    g = slot_geometry(**V3)
    assert g.far_hi < LENGTH - 1 and -g.far_lo < LENGTH - 1 and g.exact_hi < g.far_hi


@pytest.mark.parametrize("backward", BACKWARD_VARIANTS)
@pytest.mark.parametrize("index", range(_rounds(torch.bfloat16, 64)))
def test_bf16_v3_every_tuning_candidate_all_gradients_against_float64(index, backward):
    seed = random.SystemRandom().randrange(2**31)
    heads, head_dim = 2, 64
    inputs, grad = _inputs(seed, (1, heads, LENGTH, head_dim), heads, head_dim, torch.bfloat16)
    configs = _phase_configs(index, torch.bfloat16, head_dim)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fused_disentangled_attention(*leaves, None, config=configs, backward=backward, **V3)
    out.backward(grad)
    fused = [out] + [t.grad for t in leaves]
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = disentangled_attention_reference(*ref_leaves, None, **V3)
    ref.backward(grad.double())
    reference = [ref] + [t.grad for t in ref_leaves]
    errors = {name: _relative_error(a, b) for name, a, b in zip(NAMES, fused, reference, strict=True)}
    assert max(errors.values()) < BF16_TOL, f"seed={seed} configs={configs}: {errors}"


@pytest.mark.parametrize("backward", BACKWARD_VARIANTS)
def test_varlen_with_more_sequences_times_heads_than_a_grid_axis_holds(backward):
    # 35,000 sequences of 1 or 2 tokens x 2 heads = 70,000 (sequence, head) pairs > 65,535.
    seed = random.SystemRandom().randrange(2**31)
    heads, head_dim, count = 2, 32, 35_000
    lengths = torch.tensor([1 + (i % 2) for i in range(count)], device="cuda")
    cu = torch.zeros(count + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(lengths, 0)
    tokens = int(cu[-1])
    inputs, grad = _inputs(seed, (tokens, heads, head_dim), heads, head_dim, torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fused_disentangled_attention_varlen(*leaves, cu, 2, backward=backward, **V3)
    out.backward(grad)
    fused = [out] + [t.grad for t in leaves]

    # Reference: the one-token and the two-token sequences each as one padded batch (float64).
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    q, k, v, rel_key, rel_query = ref_leaves
    starts = cu[:-1].long()
    out_ref = torch.empty_like(q)
    for n in (1, 2):
        first = starts[lengths == n]
        index = first[:, None] + torch.arange(n, device="cuda")[None, :]  # [S, n]
        pieces = [t[index].permute(0, 2, 1, 3) for t in (q, k, v)]  # [S, H, n, D]
        out_n = disentangled_attention_reference(*pieces, rel_key, rel_query, None, **V3)
        out_ref = out_ref.index_put((index,), out_n.permute(0, 2, 1, 3))
    out_ref.backward(grad.double())
    reference = [out_ref] + [t.grad for t in ref_leaves]
    errors = {name: _relative_error(a, b) for name, a, b in zip(NAMES, fused, reference, strict=True)}
    assert max(errors.values()) < 1e-4, f"seed={seed}: {errors}"
