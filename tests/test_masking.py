"""Dynamic masking: what may be masked, how much, and that it is reproducible."""

import pytest
import torch

from data_pipeline.masking import IGNORE_INDEX, MaskingConfig, mask_batch

PAD, CLS, SEP, MASK, VOCAB = 0, 1, 2, 999, 1000


def padded_batch(size=64, length=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, MASK, (size, length), generator=generator)
    lengths = torch.randint(8, length + 1, (size,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[mask == 0] = PAD
    ids[:, 0] = CLS
    ids[torch.arange(size), lengths - 1] = SEP
    return ids, mask


def masked(ids, mask, strategy="rtd", seed=0, epoch=0, indices=None):
    indices = torch.arange(ids.shape[0]) if indices is None else indices
    return mask_batch(ids, mask, indices, seed=seed, epoch=epoch, config=MaskingConfig(strategy),
                      mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=(PAD, CLS, SEP))


@pytest.mark.parametrize("strategy", ["rtd", "bert", "electra"])
def test_masking_never_selects_special_tokens_or_padding(strategy):
    ids, mask = padded_batch()
    selected = masked(ids, mask, strategy).selected
    assert not selected[mask == 0].any()
    assert not selected[(ids == CLS) | (ids == SEP)].any()


def test_masking_rate_holds_on_average():
    ids, mask = padded_batch(size=256)
    selected = masked(ids, mask).selected
    maskable = (mask == 1) & (ids != CLS) & (ids != SEP)
    rate = selected.sum().item() / maskable.sum().item()
    assert abs(rate - 0.15) < 0.01


def test_rtd_strategy_replaces_every_selected_token_with_mask():
    ids, mask = padded_batch()
    result = masked(ids, mask, "rtd")
    assert torch.all(result.masked_input_ids[result.selected] == MASK)
    assert torch.equal(result.masked_input_ids[~result.selected], ids[~result.selected])
    assert torch.equal(result.mlm_labels[result.selected], ids[result.selected])
    assert torch.all(result.mlm_labels[~result.selected] == IGNORE_INDEX)


def test_bert_strategy_mixes_mask_random_and_kept():
    ids, mask = padded_batch(size=256)
    result = masked(ids, mask, "bert")
    chosen = result.masked_input_ids[result.selected]
    original = ids[result.selected]
    mask_share = (chosen == MASK).float().mean().item()
    kept_share = (chosen == original).float().mean().item()
    assert abs(mask_share - 0.8) < 0.03
    assert 0.07 < kept_share < 0.14  # 10% kept, plus random draws that happen to hit the original


def test_same_sample_same_mask_new_epoch_new_mask():
    ids, mask = padded_batch(size=8)
    first = masked(ids, mask, indices=torch.arange(100, 108))
    # The same samples, in another order and in another batch, get the same masks.
    order = torch.randperm(8)
    again = masked(ids[order], mask[order], indices=torch.arange(100, 108)[order])
    assert torch.equal(again.selected, first.selected[order])
    assert not torch.equal(masked(ids, mask, epoch=1, indices=torch.arange(100, 108)).selected, first.selected)
    assert not torch.equal(masked(ids, mask, seed=1, indices=torch.arange(100, 108)).selected, first.selected)


def test_masking_config_is_validated():
    with pytest.raises(ValueError, match="strategy"):
        MaskingConfig("span")
    with pytest.raises(ValueError, match="mask_prob"):
        MaskingConfig(mask_prob=1.5)
