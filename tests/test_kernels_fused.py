"""The fused Triton kernels against the float64 reference, on fresh random inputs each run.

Under ``TRITON_INTERPRET=1`` (set by conftest when there is no GPU) the same kernels run on
the CPU; on a GPU machine they run compiled. Every output the kernels allocate is filled
with NaN first (``DV3_KERNEL_POISON=1``), so an element no program writes fails the test.
Error measure: ``||x - ref|| / ||ref||``; NaN never passes.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernels.config import BACKWARD_VARIANTS, Layout
from kernels.fused import (
    dropout_keep_mask,
    forward_grid,
    fused_disentangled_attention,
    fused_disentangled_attention_varlen,
    key_grid,
)
from kernels.reference import disentangled_attention_reference
from kernels.relative_position import relative_span, slot_geometry
from kernels.tuning import KernelConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5
LOW_PRECISION_TOL = 1e-2
NAMES = ("out", "q", "k", "v", "rel_key", "rel_query")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv("DV3_KERNEL_POISON", "1")


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def make_inputs(seed, batch, heads, length, head_dim, rows, dtype, tokens_first=False):
    gen = torch.Generator().manual_seed(seed)
    shape = (length, heads, head_dim) if tokens_first else (batch, heads, length, head_dim)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    # Relative projections of a LayerNormed table: O(1) entries like q and k.
    rel_key, rel_query = (torch.randn(heads, rows, head_dim, generator=gen) for _ in range(2))
    grad_out = torch.randn(shape, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v, rel_key, rel_query)], grad_out.to(DEVICE, dtype)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x64 = x.detach().double().cpu()
    ref64 = ref.detach().double().cpu()
    if not torch.isfinite(x64).all():
        return float("inf")
    return ((x64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def run_fused(inputs, grad_out, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fused_disentangled_attention(*leaves[:5], kwargs.pop("mask", None), **kwargs)
    out.backward(grad_out)
    return [out] + [t.grad for t in leaves]


def run_reference(inputs, grad_out, mask=None, **kwargs):
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    out = disentangled_attention_reference(*leaves, None if mask is None else mask.cpu(), **kwargs)
    out.backward(grad_out.double().cpu())
    return [out] + [t.grad for t in leaves]


def assert_close(fused, reference, tolerance, context):
    errors = {name: relative_error(x, ref) for name, x, ref in zip(NAMES, fused, reference, strict=True)}
    worst = max(errors.values())
    assert worst < tolerance, f"{context}: relative errors {errors}"
    return errors


CASES = [
    # (batch, heads, length, head_dim, position_buckets, max_relative_positions, block_m, block_n, dtype)
    pytest.param(2, 2, 70, 32, 8, 32, 16, 16, torch.float32, id="fp32-L70-all-regions"),
    pytest.param(1, 2, 67, 32, 8, 32, 32, 16, torch.float32, id="fp32-L67-tall-tiles"),
    pytest.param(1, 1, 53, 64, 16, 64, 16, 32, torch.float32, id="fp32-L53-wide-tiles-d64"),
    pytest.param(1, 1, 33, 128, 8, 32, 16, 16, torch.float32, id="fp32-d128"),
    pytest.param(1, 2, 40, 32, 256, 512, 16, 16, torch.float32, id="fp32-v3-geometry"),
    pytest.param(1, 1, 45, 32, 0, 16, 16, 16, torch.float32, id="fp32-no-buckets"),
    pytest.param(2, 2, 64, 32, 8, 32, 16, 16, torch.bfloat16, id="bf16-L64"),
    pytest.param(1, 2, 50, 32, 16, 64, 16, 16, torch.float16, id="fp16-L50"),
]


@pytest.mark.parametrize("batch,heads,length,head_dim,buckets,max_position,block_m,block_n,dtype", CASES)
def test_fused_matches_float64_reference_values_and_all_gradients(
    batch, heads, length, head_dim, buckets, max_position, block_m, block_n, dtype
):
    seed = fresh_seed()
    rows = 2 * relative_span(buckets, max_position)
    inputs, grad_out = make_inputs(seed, batch, heads, length, head_dim, rows, dtype)
    settings = dict(position_buckets=buckets, max_relative_positions=max_position)
    fused = run_fused(inputs, grad_out, config=KernelConfig(block_m, block_n, 4, 1), **settings)
    reference = run_reference(inputs, grad_out, **settings)
    tolerance = FP32_TOL if dtype == torch.float32 else LOW_PRECISION_TOL
    assert_close(fused, reference, tolerance, f"seed={seed}")


def test_lengths_span_all_three_slot_regions():
    # Guard for the cases above: at L=70 with (8, 32) there are exact, log and edge distances.
    g = slot_geometry(8, 32)
    assert g.exact_hi < g.far_hi < 69 and -69 < g.far_lo < g.exact_lo


@pytest.mark.parametrize("backward", BACKWARD_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_mask_with_all_padding_tail_and_padding_only_sequence(dtype, backward):
    seed = fresh_seed()
    batch, heads, length, head_dim = 3, 2, 45, 32
    inputs, grad_out = make_inputs(seed, batch, heads, length, head_dim, 32, dtype)
    mask = torch.ones(batch, length, dtype=torch.long, device=DEVICE)
    mask[0, 30:] = 0  # right padding: an all-padding tail of rows and keys
    mask[1, 5:9] = 0  # holes in the middle
    mask[2, :] = 0  # nothing but padding (HF: uniform rows)
    settings = dict(position_buckets=16, max_relative_positions=64, mask=mask)
    fused = run_fused(inputs, grad_out, config=KernelConfig(16, 16, 4, 1), backward=backward, **settings)
    reference = run_reference(inputs, grad_out, **settings)
    # HF's padding rows are uniform over all keys; the kernels reproduce that, so all rows compare.
    assert_close(fused, reference, FP32_TOL if dtype == torch.float32 else LOW_PRECISION_TOL, f"seed={seed}")


@pytest.mark.parametrize("backward", BACKWARD_VARIANTS)
def test_dropout_mask_is_shared_by_forward_and_backward(backward):
    seed, rng_seed = fresh_seed(), fresh_seed()
    batch, heads, length, head_dim, p = 2, 2, 50, 32, 0.3
    inputs, grad_out = make_inputs(seed, batch, heads, length, head_dim, 16, torch.float32)
    mask = torch.ones(batch, length, dtype=torch.long, device=DEVICE)
    mask[1, 37:] = 0
    settings = dict(position_buckets=8, max_relative_positions=32)
    fused = run_fused(
        inputs, grad_out, mask=mask, dropout_p=p, seed=rng_seed, config=KernelConfig(16, 16, 4, 1), backward=backward,
        **settings,
    )
    keep = dropout_keep_mask(rng_seed, batch, heads, length, p, device=DEVICE)
    kept = keep.float().mean().item()
    assert abs(kept - (1 - p)) < 0.03, f"kept fraction {kept} for p={p}"
    reference = run_reference(inputs, grad_out, mask=mask, dropout_p=p, dropout_mask=keep.cpu(), **settings)
    assert_close(fused, reference, FP32_TOL, f"seed={seed} rng_seed={rng_seed}")
    # A different mask gives a different answer: the comparison above can fail.
    other = run_reference(
        inputs, grad_out, mask=mask, dropout_p=p,
        dropout_mask=dropout_keep_mask(rng_seed + 1, batch, heads, length, p).cpu(), **settings,
    )
    assert relative_error(fused[0], other[0]) > 1e-2


def test_dropout_zero_is_exact_and_seed_repeats_bitwise():
    seed, rng_seed = fresh_seed(), fresh_seed()
    inputs, grad_out = make_inputs(seed, 1, 2, 40, 32, 16, torch.float32)
    settings = dict(position_buckets=8, max_relative_positions=32, config=KernelConfig(16, 16, 4, 1))
    plain = run_fused(inputs, grad_out, **settings)
    zero = run_fused(inputs, grad_out, dropout_p=0.0, seed=rng_seed, **settings)
    for a, b in zip(plain, zero, strict=True):
        assert torch.equal(a, b)
    # Determinism: the same seed reproduces every output and gradient bit for bit (no atomics).
    first = run_fused(inputs, grad_out, dropout_p=0.2, seed=rng_seed, **settings)
    second = run_fused(inputs, grad_out, dropout_p=0.2, seed=rng_seed, **settings)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first[0], plain[0])


def varlen_reference(inputs, grad_out, boundaries, keep=None, dropout_p=0.0, **settings):
    """Each packed sequence through the reference on its own (batch of one), float64."""
    q, k, v, rel_key, rel_query = (t.detach().double().cpu().requires_grad_() for t in inputs)
    outputs = []
    for z, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:], strict=True)):
        n = end - start
        if n == 0:
            continue
        piece = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        sequence_keep = None if keep is None else keep[z : z + 1, :, :n, :n].cpu()
        out = disentangled_attention_reference(
            *piece, rel_key, rel_query, None, dropout_p=dropout_p, dropout_mask=sequence_keep, **settings
        )
        outputs.append(out.squeeze(0).transpose(0, 1))
    out = torch.cat(outputs)
    out.backward(grad_out.double().cpu())
    return [out, q.grad, k.grad, v.grad, rel_key.grad, rel_query.grad]


@pytest.mark.parametrize("backward", BACKWARD_VARIANTS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_varlen_matches_per_sequence_reference(dropout_p, backward):
    seed, rng_seed = fresh_seed(), fresh_seed()
    boundaries = [0, 23, 23, 70, 71, 101]  # includes an empty sequence and a one-token one
    tokens, heads, head_dim = boundaries[-1], 2, 32
    inputs, grad_out = make_inputs(seed, None, heads, tokens, head_dim, 16, torch.float32, tokens_first=True)
    cu = torch.tensor(boundaries, dtype=torch.int32, device=DEVICE)
    max_len = max(b - a for a, b in zip(boundaries[:-1], boundaries[1:], strict=True))
    settings = dict(position_buckets=8, max_relative_positions=32)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fused_disentangled_attention_varlen(
        *leaves, cu, max_len, dropout_p=dropout_p, seed=rng_seed, config=KernelConfig(16, 16, 4, 1),
        backward=backward, **settings,
    )
    out.backward(grad_out)
    fused = [out] + [t.grad for t in leaves]
    keep = dropout_keep_mask(rng_seed, len(boundaries) - 1, heads, max_len, dropout_p, device=DEVICE) if dropout_p else None
    reference = varlen_reference(inputs, grad_out, boundaries, keep=keep, dropout_p=dropout_p, **settings)
    assert_close(fused, reference, FP32_TOL, f"seed={seed} rng_seed={rng_seed}")


def test_unwritten_outputs_would_fail():
    # The poison is real: a NaN anywhere makes the error infinite, whatever the reference.
    ref = torch.ones(3)
    assert relative_error(torch.tensor([1.0, float("nan"), 1.0]), ref) == float("inf")


@pytest.mark.skipif(DEVICE == "cuda", reason="the split is set by the GPU's multiprocessor count there")
def test_backward_does_not_depend_on_how_blocks_are_split_among_programs(monkeypatch):
    seed = fresh_seed()
    inputs, grad_out = make_inputs(seed, 2, 1, 45, 32, 16, torch.float32)
    settings = dict(position_buckets=8, max_relative_positions=32, config=KernelConfig(16, 16, 4, 1))
    results = {}
    for programs in ("1", "2", "1000"):  # one program per head walks all blocks ... one block each
        monkeypatch.setenv("DV3_KERNEL_CPU_PROGRAMS", programs)
        results[programs] = run_fused(inputs, grad_out, **settings)
    for programs in ("2", "1000"):
        for name, a, b in zip(NAMES, results["1"], results[programs], strict=True):
            assert relative_error(a, b) < 1e-6, (name, programs, seed)


# The split backward: band and far kernels of a pass own pairs (by distance), not tiles, so each
# may take its own tile shape; here the far kernels take larger, asymmetric tiles than the band ones.
SPLIT_TILES = {
    "forward": KernelConfig(16, 16, 4, 1),
    "backward_band_dq": KernelConfig(16, 16, 4, 1),
    "backward_far_dq": KernelConfig(32, 16, 4, 2),
    "backward_band_dkv": KernelConfig(16, 32, 4, 1),
    "backward_far_dkv": KernelConfig(16, 32, 4, 2),
}
SPLIT_CASES = [
    # (batch, heads, length, head_dim, position_buckets, max_relative_positions, dtype)
    pytest.param(2, 2, 70, 32, 8, 32, torch.float32, id="fp32-L70-all-regions"),
    pytest.param(1, 1, 97, 32, 16, 32, torch.float32, id="fp32-L97-long-far-runs"),
    pytest.param(1, 2, 40, 32, 256, 512, torch.float32, id="fp32-v3-geometry"),
    pytest.param(1, 1, 45, 32, 0, 16, torch.float32, id="fp32-no-buckets"),
    pytest.param(2, 2, 64, 32, 8, 32, torch.bfloat16, id="bf16-L64"),
]


@pytest.mark.parametrize("batch,heads,length,head_dim,buckets,max_position,dtype", SPLIT_CASES)
def test_split_backward_with_its_own_far_tiles_matches_float64_reference(
    batch, heads, length, head_dim, buckets, max_position, dtype
):
    seed = fresh_seed()
    rows = 2 * relative_span(buckets, max_position)
    inputs, grad_out = make_inputs(seed, batch, heads, length, head_dim, rows, dtype)
    settings = dict(position_buckets=buckets, max_relative_positions=max_position)
    fused = run_fused(inputs, grad_out, config=SPLIT_TILES, backward="split", **settings)
    reference = run_reference(inputs, grad_out, **settings)
    tolerance = FP32_TOL if dtype == torch.float32 else LOW_PRECISION_TOL
    assert_close(fused, reference, tolerance, f"seed={seed}")


def test_both_backward_variants_agree_and_are_each_deterministic():
    seed, rng_seed = fresh_seed(), fresh_seed()
    inputs, grad_out = make_inputs(seed, 1, 2, 50, 32, 16, torch.float32)
    settings = dict(position_buckets=8, max_relative_positions=32, dropout_p=0.2, seed=rng_seed)
    runs = {b: run_fused(inputs, grad_out, config=KernelConfig(16, 16, 4, 1), backward=b, **settings) for b in BACKWARD_VARIANTS}
    again = run_fused(inputs, grad_out, config=KernelConfig(16, 16, 4, 1), backward="split", **settings)
    for name, a, b, c in zip(NAMES, runs["slices"], runs["split"], again, strict=True):
        assert relative_error(b, a) < 1e-6, (name, seed)
        assert torch.equal(b, c), name


def test_grids_put_sequences_times_heads_on_the_unlimited_axis():
    # 70,000 packed sequences x 2 heads: more than a CUDA grid's second axis (65,535) can hold.
    layout = Layout(varlen=True, sequences=70_000, heads=2, max_len=2, head_dim=32)
    config = KernelConfig(16, 16, 4, 1)
    for grid in (forward_grid(layout, config), key_grid(layout, config)):
        assert len(grid) == 1 and 140_000 <= grid[0] < 2**31


@pytest.mark.parametrize("backward", BACKWARD_VARIANTS)
def test_many_short_packed_sequences(backward):
    # Dozens of one- and two-token sequences: program ids decode into (block, sequence, head).
    seed = fresh_seed()
    lengths = [1 + (i % 3 == 0) for i in range(40)]
    boundaries = [0]
    for n in lengths:
        boundaries.append(boundaries[-1] + n)
    inputs, grad_out = make_inputs(seed, None, 1, boundaries[-1], 32, 16, torch.float32, tokens_first=True)
    cu = torch.tensor(boundaries, dtype=torch.int32, device=DEVICE)
    settings = dict(position_buckets=8, max_relative_positions=32)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fused_disentangled_attention_varlen(
        *leaves, cu, 2, config=KernelConfig(16, 16, 4, 1), backward=backward, **settings
    )
    out.backward(grad_out)
    fused = [out] + [t.grad for t in leaves]
    reference = varlen_reference(inputs, grad_out, boundaries, **settings)
    assert_close(fused, reference, FP32_TOL, f"seed={seed}")
