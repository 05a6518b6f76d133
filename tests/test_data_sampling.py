"""Keyed permutations, blending counts and the epoch plan behind the loader's shuffle."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.sampling import EpochPlan, largest_remainder, permute, source_probabilities


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 100, 1023, 1024, 1025, 65_537])
def test_permute_is_a_bijection_of_range_n(n: int) -> None:
    images = permute(np.arange(n), n, 12345)
    assert sorted(images.tolist()) == list(range(n))


def test_permute_takes_a_size_and_key_per_index() -> None:
    sizes = np.array([10] * 10 + [7] * 7 + [1])
    indices = np.concatenate([np.arange(10), np.arange(7), [0]])
    keys = np.array([3] * 10 + [4] * 7 + [5])
    images = permute(indices, sizes, keys)
    assert sorted(images[:10].tolist()) == list(range(10)) and sorted(images[10:17].tolist()) == list(range(7))
    assert images[17] == 0
    assert np.array_equal(images[:10], permute(np.arange(10), 10, 3))


def test_permute_depends_on_the_key_and_looks_uniform() -> None:
    assert not np.array_equal(permute(np.arange(1000), 1000, 1), permute(np.arange(1000), 1000, 2))
    positions = permute(np.full(20_000, 3), 100, np.arange(20_000)).astype(np.int64)  # one key per draw
    counts = np.bincount(positions, minlength=100)
    assert counts.min() > 130 and counts.max() < 280  # expected 200 each
    images = permute(np.arange(100_000), 100_000, 7).astype(np.int64)
    assert abs(np.corrcoef(np.arange(100_000), images)[0, 1]) < 0.02, "no trace of the input order"


def test_largest_remainder_sums_to_the_total() -> None:
    counts = largest_remainder([0.5, 0.3, 0.2], 7)
    assert counts.sum() == 7 and counts.tolist() == [4, 2, 1]
    assert largest_remainder([1 / 3] * 3, 100).tolist() == [34, 33, 33]


def test_source_probabilities_temper_languages_within_each_directory() -> None:
    probabilities = source_probabilities([900, 100, 50], groups=[0, 0, 1], group_weights=[3.0, 1.0], alpha=0.5)
    assert probabilities.sum() == pytest.approx(1.0)
    assert probabilities[2] == pytest.approx(0.25)
    assert probabilities[0] / probabilities[1] == pytest.approx((900 / 100) ** 0.5)


def test_epoch_plan_with_natural_proportions_reads_every_row_once_per_epoch() -> None:
    rows = [37, 5, 1]
    plan = EpochPlan.build(rows, np.array(rows) / sum(rows), seed=4, shuffle=True)
    for epoch in range(3):
        epochs, sources, within = plan.locate(np.arange(epoch * 43, (epoch + 1) * 43))
        assert set(epochs.tolist()) == {epoch}
        assert sorted(zip(sources.tolist(), within.tolist(), strict=True)) == [
            (s, r) for s, n in enumerate(rows) for r in range(n)
        ]


def test_epoch_plan_repeats_small_sources_and_varies_the_subset_of_large_ones() -> None:
    plan = EpochPlan.build([100, 4], [0.5, 0.5], seed=0, shuffle=True)
    assert plan.counts.tolist() == [52, 52]
    _, sources, within = plan.locate(np.arange(104))
    small = within[sources == 1]
    assert sorted(small.tolist()) == sorted(list(range(4)) * 13), "each row of the small source 13 times"
    first_epoch = set(within[sources == 0].tolist())
    _, sources, within = plan.locate(np.arange(104, 208))
    assert len(first_epoch) == 52 and set(within[sources == 0].tolist()) != first_epoch
