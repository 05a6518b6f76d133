"""The slot map the kernels read equals Hugging Face's, and its geometry describes it exactly."""

import pytest
import torch
from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

from kernels.reference import disentangled_attention_reference
from kernels.relative_position import (
    DISTANCE_SENTINEL,
    log_bucket,
    log_buckets,
    relative_slots,
    relative_span,
    slot_geometry,
    slot_of_distance,
    used_slots,
)

# (position_buckets, max_relative_positions): the v3 setting first, then small ones the kernel
# tests use, then long-context ones. At (512, 4096) exact (float64) arithmetic differs from HF's
# float32 by one bucket at 4 distances: dv3 follows HF there too, so an export sees what training saw.
HF_SETTINGS = [(256, 512), (8, 32), (16, 64), (32, 128), (64, 512), (128, 256), (256, 1024), (4, 16),
               (512, 4096), (1024, 8192), (256, 8192)]


@pytest.mark.parametrize("buckets,max_position", HF_SETTINGS)
def test_log_bucket_and_slot_table_equal_hf_make_log_bucket_position(buckets, max_position):
    reach = 12_000
    distances = torch.arange(-reach, reach + 1)
    hf_bucket = make_log_bucket_position(distances, buckets, max_position).long()
    ours = log_buckets(distances, buckets, max_position)
    assert all(log_bucket(int(r), buckets, max_position) == int(hf_bucket[r + reach]) for r in range(-reach, reach, 997))
    mismatch = (ours != hf_bucket).nonzero().flatten()
    assert mismatch.numel() == 0, f"log_bucket differs from HF at r={distances[mismatch][:5].tolist()}"

    span = relative_span(buckets, max_position)
    hf_slot = (hf_bucket + span).clamp(0, 2 * span - 1)
    table = slot_of_distance(reach, buckets, max_position).long()
    assert torch.equal(table, hf_slot)


def test_relative_slots_equal_hf_build_relative_position_layout():
    query_len, key_len = 37, 37
    slots = relative_slots(query_len, key_len, 8, 32)
    rel = torch.arange(query_len)[:, None] - torch.arange(key_len)[None, :]
    expected = (make_log_bucket_position(rel, 8, 32).long() + 8).clamp(0, 15)
    assert torch.equal(slots, expected)


@pytest.mark.parametrize("buckets,max_position", [(256, 512), (8, 32), (16, 64), (0, 16), (4, 16)])
def test_slot_geometry_describes_the_slot_map(buckets, max_position):
    g = slot_geometry(buckets, max_position)
    reach = g.max_distance + 300
    slot = slot_of_distance(reach, buckets, max_position).tolist()

    def at(r: int) -> int:
        return slot[r + reach]

    assert g.rows == 2 * g.span
    # The table reaches both edges, so clamping a distance into it is exact.
    for r in range(-reach, reach + 1):
        assert g.table[min(max(r, -g.max_distance), g.max_distance) + g.max_distance].item() == at(r)
    # Edges: everything beyond far_hi/far_lo is the edge slot, and the thresholds are tight.
    assert all(at(r) == g.rows - 1 for r in range(g.far_hi, reach + 1))
    assert at(g.far_hi - 1) != g.rows - 1
    assert all(at(r) == 0 for r in range(-reach, g.far_lo + 1))
    assert at(g.far_lo + 1) != 0
    # Exact region is a plain shift and is maximal.
    assert all(at(r) == r + g.span for r in range(g.exact_lo, g.exact_hi + 1))
    assert at(g.exact_hi + 1) != g.exact_hi + 1 + g.span or g.exact_hi == g.max_distance
    # first/last bracket exactly the distances of each slot.
    for s in range(g.rows):
        members = [r for r in range(-reach, reach + 1) if at(r) == s]
        first, last = g.first[s].item(), g.last[s].item()
        if not members:
            assert first > last
            continue
        assert first == (-DISTANCE_SENTINEL if s == 0 else members[0])
        assert last == (DISTANCE_SENTINEL if s == g.rows - 1 else members[-1])
        assert members == list(range(members[0], members[-1] + 1))
    # Band width is the most slots any window of block_m + block_n - 1 distances spans.
    for block_m, block_n in ((16, 16), (32, 16), (64, 64)):
        window = block_m + block_n - 1
        widest = max(at(r + window - 1) - at(r) + 1 for r in range(-reach, reach - window + 1))
        assert g.band_width(block_m, block_n) == widest


def test_v3_geometry_matches_the_design_notes():
    g = slot_geometry(256, 512)
    assert (g.rows, g.far_hi, g.far_lo) == (512, 506, -512)
    assert g.exact_lo <= -128 and g.exact_hi >= 128


@pytest.mark.parametrize("buckets,max_position", HF_SETTINGS + [(0, 16)])
@pytest.mark.parametrize("length", [1, 2, 17, 128, 300, 1024])
def test_used_slots_is_the_window_of_rows_a_length_reaches(buckets, max_position, length):
    slots = relative_slots(length, length, buckets, max_position)
    assert used_slots(length, buckets, max_position) == (int(slots.min()), int(slots.max()))


def test_reference_attention_never_reads_a_row_outside_the_window():
    torch.manual_seed(0)
    batch, heads, length, head_dim, buckets, max_position = 2, 2, 24, 8, 32, 128
    q, k, v = (torch.randn(batch, heads, length, head_dim) for _ in range(3))
    rel_key, rel_query = torch.randn(heads, 2 * buckets, head_dim), torch.randn(heads, 2 * buckets, head_dim)
    first, last = used_slots(length, buckets, max_position)
    assert 0 < first and last < 2 * buckets - 1  # the window is a strict part of the table here
    expected = disentangled_attention_reference(q, k, v, rel_key, rel_query, position_buckets=buckets,
                                                max_relative_positions=max_position)
    outside = torch.ones(2 * buckets, dtype=torch.bool)
    outside[first:last + 1] = False
    rel_key[:, outside], rel_query[:, outside] = float("nan"), float("nan")
    got = disentangled_attention_reference(q, k, v, rel_key, rel_query, position_buckets=buckets,
                                           max_relative_positions=max_position)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
