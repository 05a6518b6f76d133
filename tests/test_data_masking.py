"""Dynamic masking: what may be masked, how much, the strategies, the official masker's position
rule, and that every mask is reproducible from (seed, epoch, sample index)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_pipeline.errors import ConfigError
from data_pipeline.masking import (
    IGNORE_INDEX,
    MASKING_STRATEGIES,
    MaskingConfig,
    mask_batch,
    official_max_predictions,
    official_window,
)

PAD, CLS, SEP, UNK, MASK, VOCAB = 0, 1, 2, 3, 999, 1000


def padded_batch(size: int = 64, length: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of random text tokens of random length, ``[CLS] ... [SEP] [PAD]*``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, MASK, (size, length), generator=generator)
    lengths = torch.randint(8, length + 1, (size,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[mask == 0] = PAD
    ids[:, 0] = CLS
    ids[torch.arange(size), lengths - 1] = SEP
    return ids, mask


def full_rows(size: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows filled to the last position, as stream packing makes them."""
    ids = torch.randint(4, MASK, (size, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 0], ids[:, -1] = CLS, SEP
    return ids, torch.ones_like(ids)


def masked(ids, mask, strategy="rtd", seed=0, epoch=0, indices=None, mask_prob=0.15):  # noqa: ANN001, ANN201
    indices = torch.arange(ids.shape[0]) if indices is None else indices
    return mask_batch(ids, mask, indices, seed=seed, epoch=epoch, config=MaskingConfig(strategy, mask_prob),
                      mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=(PAD, CLS, SEP))  # fmt: skip


def official_count(tokens: int, maskable: int, length: int, mask_prob: float = 0.15) -> int:
    """How many positions the official masker selects, from its description (Python's round)."""
    wanted = min(official_max_predictions(length, mask_prob), max(1, round(tokens * mask_prob)))
    return min(wanted, -(-maskable // official_window(mask_prob)))


# -- every strategy ------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", sorted(MASKING_STRATEGIES))
def test_masking_never_selects_special_tokens_or_padding(strategy: str) -> None:
    ids, mask = padded_batch()
    selected = masked(ids, mask, strategy).selected
    assert not selected[mask == 0].any()
    assert not selected[(ids == CLS) | (ids == SEP)].any()
    assert selected.any(dim=1).all(), "every row has a mask"


@pytest.mark.parametrize("strategy", sorted(MASKING_STRATEGIES))
def test_unk_is_never_masked_in_any_strategy(strategy: str) -> None:
    ids, mask = padded_batch(size=256)
    ids[(torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.3) & (ids > SEP)] = UNK
    selected = masked(ids, mask, strategy, mask_prob=0.5).selected
    assert (ids == UNK).sum() > 2000
    assert selected.sum() > 2000
    assert not selected[ids == UNK].any()


@pytest.mark.parametrize("strategy", sorted(MASKING_STRATEGIES))
def test_same_sample_same_mask_new_epoch_or_seed_new_mask(strategy: str) -> None:
    ids, mask = padded_batch(size=8)
    first = masked(ids, mask, strategy, indices=torch.arange(100, 108))
    # The same samples, in another order and in another batch, get the same masks.
    order = torch.randperm(8)
    again = masked(ids[order], mask[order], strategy, indices=torch.arange(100, 108)[order])
    assert torch.equal(again.selected, first.selected[order])
    assert torch.equal(again.masked_input_ids, first.masked_input_ids[order])
    other_epoch = masked(ids, mask, strategy, epoch=1, indices=torch.arange(100, 108))
    assert not torch.equal(other_epoch.selected, first.selected)
    assert not torch.equal(masked(ids, mask, strategy, seed=1, indices=torch.arange(100, 108)).selected, first.selected)


def test_masking_config_is_validated() -> None:
    with pytest.raises(ValueError, match="strategy"):
        MaskingConfig("span")
    with pytest.raises(ValueError, match="mask_prob"):
        MaskingConfig(mask_prob=1.5)
    with pytest.raises(ConfigError, match="'span' is not one of"):
        MaskingConfig("span")


def test_any_seed_works_and_changes_the_mask() -> None:
    ids, attention = full_rows(8, 64)
    masks = [
        mask_batch(ids, attention, np.arange(8), seed=seed, epoch=0, config=MaskingConfig(), mask_token_id=MASK,
                   vocab_size=VOCAB).selected
        for seed in (0, -1, 2**70, 2**64 + 5)
    ]  # fmt: skip
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[2], masks[3])


@pytest.mark.parametrize("strategy", sorted(MASKING_STRATEGIES))
def test_a_row_without_maskable_tokens_gets_no_mask(strategy: str) -> None:
    ids = torch.tensor([[CLS, SEP, PAD, PAD], [PAD, PAD, PAD, PAD], [CLS, UNK, UNK, SEP]])
    result = mask_batch(ids, (ids != PAD).long(), [5, -1, 7], seed=0, epoch=0, config=MaskingConfig(strategy),
                        mask_token_id=MASK, vocab_size=VOCAB)  # fmt: skip
    assert not result.selected.any() and torch.equal(result.masked_input_ids, ids)


# -- rtd, bert, electra: uniform positions --------------------------------------------------------


def test_masking_rate_holds_on_average() -> None:
    ids, mask = padded_batch(size=256)
    selected = masked(ids, mask).selected
    maskable = (mask == 1) & (ids != CLS) & (ids != SEP)
    rate = selected.sum().item() / maskable.sum().item()
    assert abs(rate - 0.15) < 0.01


def test_rtd_strategy_replaces_every_selected_token_with_mask() -> None:
    ids, mask = padded_batch()
    result = masked(ids, mask, "rtd")
    assert torch.all(result.masked_input_ids[result.selected] == MASK)
    assert torch.equal(result.masked_input_ids[~result.selected], ids[~result.selected])
    assert torch.equal(result.mlm_labels[result.selected], ids[result.selected])
    assert torch.all(result.mlm_labels[~result.selected] == IGNORE_INDEX)


def test_bert_strategy_mixes_mask_random_and_kept() -> None:
    ids, mask = padded_batch(size=256)
    result = masked(ids, mask, "bert")
    chosen = result.masked_input_ids[result.selected]
    original = ids[result.selected]
    mask_share = (chosen == MASK).float().mean().item()
    kept_share = (chosen == original).float().mean().item()
    assert abs(mask_share - 0.8) < 0.03
    assert 0.07 < kept_share < 0.14  # 10% kept, plus random draws that happen to hit the original


def test_random_replacements_are_never_special_mask_or_unk() -> None:
    small_mask, small_vocab = 99, 100  # a small vocabulary: every ordinary id is drawn often
    ids = torch.randint(4, small_mask, (256, 64), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = CLS, SEP
    attention = torch.ones_like(ids)
    result = mask_batch(
        ids, attention, torch.arange(len(ids)), seed=0, epoch=0, config=MaskingConfig("bert", 0.5),
        mask_token_id=small_mask, vocab_size=small_vocab, special_token_ids=(PAD, CLS, SEP), unk_token_id=UNK,
    )  # fmt: skip
    replaced = result.selected & (result.masked_input_ids != small_mask) & (result.masked_input_ids != ids)
    drawn = result.masked_input_ids[replaced]
    assert len(drawn) > 500
    assert not torch.isin(drawn, torch.tensor([PAD, CLS, SEP, UNK, small_mask])).any()
    assert drawn.min() >= 4 and drawn.max() < small_mask
    counts = np.bincount(drawn.numpy(), minlength=small_vocab)[4:small_mask]
    assert counts.min() > 0, "every ordinary token can be drawn"


# -- official: the official RTD masker's position rule ---------------------------------------------


def test_official_window_and_cap_follow_the_official_settings() -> None:
    assert official_window(0.15) == 6 and official_window(0.2) == 5 and official_window(0.6) == 1
    assert official_max_predictions(512, 0.15) == 80
    assert official_max_predictions(128, 0.15) == 20
    assert official_max_predictions(1024, 0.15) == 160
    assert official_max_predictions(8192, 0.15) == 1230


def test_official_full_512_row_masks_one_position_in_each_of_the_first_77_windows() -> None:
    rows, length = 3000, 512
    ids, mask = full_rows(rows, length)
    result = masked(ids, mask, "official")
    selected = result.selected.numpy()
    # 512 tokens: round(0.15 * 512) = 77 masks (under the cap of 80), from 85 windows of 6 over the
    # 510 maskable positions 1..510. Window w covers positions 1 + 6w .. 6 + 6w.
    assert (selected.sum(axis=1) == 77).all()
    windows = selected[:, 1 : 1 + 77 * 6].reshape(rows, 77, 6)
    assert (windows.sum(axis=2) == 1).all(), "exactly one mask in each used window"
    assert not selected[:, 1 + 77 * 6 :].any(), "nothing in the excluded tail (positions 463..511)"
    assert not selected[:, 0].any()
    assert torch.all(result.masked_input_ids[result.selected] == MASK)
    assert torch.equal(result.masked_input_ids[~result.selected], ids[~result.selected])
    # Uniform within each window: a chi-square over all 77 windows x 6 offsets (385 degrees of
    # freedom: mean 385, standard deviation 27.7); a bias of 2 points per offset would add ~500.
    counts = windows.sum(axis=0)  # [77, 6]
    expected = rows / 6
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 385 + 6 * 27.7, chi_square
    assert abs(counts.sum(axis=0) / counts.sum() - 1 / 6).max() < 0.005, "offsets are equally likely overall"


def test_official_windows_skip_unk_and_the_last_window_may_be_partial() -> None:
    # 9 text tokens between 30 [UNK]s: 41 tokens, round(0.15 * 41) = 6 wanted, but the 9 maskable
    # positions make only 2 windows (6 + 3): one mask in each, the second uniform over its 3.
    rows = 3000
    text = [i for i in range(1, 40) if i % 4 == 1][:9]
    row = [CLS] + [UNK] * 39 + [SEP]
    for position in text:
        row[position] = 10 + position
    ids = torch.tensor([row] * rows)
    result = masked(ids, torch.ones_like(ids), "official")
    selected = result.selected.numpy()[:, text]
    assert (selected.sum(axis=1) == 2).all()
    assert (selected[:, :6].sum(axis=1) == 1).all() and (selected[:, 6:].sum(axis=1) == 1).all()
    for counts, size in ((selected[:, :6].sum(axis=0), 6), (selected[:, 6:].sum(axis=0), 3)):
        expected = rows / size
        assert float(((counts - expected) ** 2 / expected).sum()) < 25, counts  # 5 or 2 dof: p < 1e-4
    assert not result.selected[ids == UNK].any()


def test_official_counts_follow_the_rule_on_padded_rows_with_unk() -> None:
    ids, mask = padded_batch(size=512, length=256, seed=3)
    ids[(torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) < 0.1) & (ids > SEP)] = UNK
    result = masked(ids, mask, "official")
    selected = result.selected.numpy()
    maskable = ((mask == 1) & (ids != CLS) & (ids != SEP) & (ids != UNK)).numpy()
    tokens = mask.sum(dim=1).numpy()
    for row in range(len(ids)):
        count = official_count(int(tokens[row]), int(maskable[row].sum()), ids.shape[1])
        assert selected[row].sum() == count, row
        # One per window, in the first `count` windows of the row's maskable positions.
        picked_windows = np.nonzero(selected[row][maskable[row]])[0] // 6
        assert list(picked_windows) == list(range(count)), row
    # Python's round: 0.15 * 30 = 4.5 rounds to 4 (half to even), 0.15 * 10 = 1.5 to 2.
    assert official_count(30, 28, 256) == 4 and official_count(10, 8, 256) == 2


def test_official_at_8192_tokens_masks_round_0_15_l_and_never_the_tail() -> None:
    rows, length = 64, 8192
    ids, mask = full_rows(rows, length)
    selected = masked(ids, mask, "official").selected.numpy()
    used = round(0.15 * length)  # 1229, under the cap of 1230; 1365 windows
    assert used == 1229 and official_max_predictions(length, 0.15) == 1230
    assert (selected.sum(axis=1) == used).all()
    assert (selected[:, 1 : 1 + used * 6].reshape(rows, used, 6).sum(axis=2) == 1).all()
    assert not selected[:, 1 + used * 6 :].any()


def test_official_is_spread_out_where_uniform_masking_is_not() -> None:
    ids, mask = full_rows(200, 512)
    gaps = {}
    for strategy in ("rtd", "official"):
        positions = [np.nonzero(row)[0] for row in masked(ids, mask, strategy).selected.numpy()]
        gaps[strategy] = np.concatenate([np.diff(p) for p in positions])
    assert gaps["official"].max() <= 11, "neighbouring windows' picks are at most 11 apart"
    assert gaps["rtd"].max() > 30
    assert math.isclose(gaps["official"].mean(), 6.0, abs_tol=0.1)
