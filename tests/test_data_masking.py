"""Masking details the loader relies on (tests/test_masking.py covers the strategies)."""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.masking import MaskingConfig, mask_batch

PAD, CLS, SEP, UNK, MASK, VOCAB = 0, 1, 2, 3, 99, 100


def batch(size: int = 256, length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(4, MASK, (size, length), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = CLS, SEP
    return ids, torch.ones_like(ids)


def test_random_replacements_are_never_special_mask_or_unk() -> None:
    ids, attention = batch()
    result = mask_batch(
        ids, attention, torch.arange(len(ids)), seed=0, epoch=0, config=MaskingConfig("bert", 0.5),
        mask_token_id=MASK, vocab_size=VOCAB, special_token_ids=(PAD, CLS, SEP), unk_token_id=UNK,
    )  # fmt: skip
    replaced = result.selected & (result.masked_input_ids != MASK) & (result.masked_input_ids != ids)
    drawn = result.masked_input_ids[replaced]
    assert len(drawn) > 500
    assert not torch.isin(drawn, torch.tensor([PAD, CLS, SEP, UNK, MASK])).any()
    assert drawn.min() >= 4 and drawn.max() < MASK
    counts = np.bincount(drawn.numpy(), minlength=VOCAB)[4:MASK]
    assert counts.min() > 0, "every ordinary token can be drawn"


def test_any_seed_works_and_changes_the_mask() -> None:
    ids, attention = batch(8)
    masks = [
        mask_batch(ids, attention, np.arange(8), seed=seed, epoch=0, config=MaskingConfig(), mask_token_id=MASK,
                   vocab_size=VOCAB).selected
        for seed in (0, -1, 2**70, 2**64 + 5)
    ]  # fmt: skip
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[2], masks[3])


def test_a_row_without_maskable_tokens_gets_no_mask() -> None:
    ids = torch.tensor([[CLS, SEP, PAD, PAD], [PAD, PAD, PAD, PAD]])
    result = mask_batch(ids, (ids != PAD).long(), [5, -1], seed=0, epoch=0, config=MaskingConfig(),
                        mask_token_id=MASK, vocab_size=VOCAB)  # fmt: skip
    assert not result.selected.any() and torch.equal(result.masked_input_ids, ids)
