"""Dynamic masking for MLM/RTD, reproducible from ``(seed, epoch, sample index)``.

Each sample gets exactly ``max(1, round(mask_prob * n))`` masked positions out of its ``n``
maskable tokens (never ``[CLS]``, ``[SEP]``, padding or other special ids), chosen by
counter-based hashing rather than a stateful RNG: the same sample masked on any rank, in any
worker, after any resume, gets the same mask. A new epoch gives a new mask.

Strategies (what a selected position becomes):

- ``rtd``:     all ``[MASK]`` (the official DeBERTaV3 RTD recipe)
- ``bert``:    80% ``[MASK]``, 10% a random token, 10% unchanged
- ``electra``: 85% ``[MASK]``, 15% unchanged

A random replacement token is never a special id, ``[MASK]`` or (when given) ``[UNK]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.hashing import derive_key, splitmix64

IGNORE_INDEX = -100

# strategy -> (fraction replaced by [MASK], fraction replaced by a random token); the rest stays.
MASKING_STRATEGIES: dict[str, tuple[float, float]] = {
    "rtd": (1.0, 0.0),
    "bert": (0.8, 0.1),
    "electra": (0.85, 0.0),
}


@dataclass(frozen=True)
class MaskingConfig:
    strategy: str = "rtd"
    mask_prob: float = 0.15

    def __post_init__(self) -> None:
        if self.strategy not in MASKING_STRATEGIES:
            raise ValueError(f"masking strategy {self.strategy!r} is not one of {sorted(MASKING_STRATEGIES)}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {self.mask_prob}")


@dataclass
class MaskedBatch:
    """``masked_input_ids`` is the generator's input; ``mlm_labels`` holds the original id at
    selected positions and ``IGNORE_INDEX`` elsewhere."""

    masked_input_ids: torch.Tensor
    mlm_labels: torch.Tensor

    @property
    def selected(self) -> torch.Tensor:
        return self.mlm_labels != IGNORE_INDEX


_POSITION_STRIDE = np.uint64(0xD1B54A32D192ED03)


def _hash_bits(seed: int, epoch: int, sample_indices: np.ndarray, length: int, stream: int) -> np.ndarray:
    """``[B, length]`` uint64 hashes, a pure function of (seed, epoch, sample, position, stream)."""
    key = derive_key(seed, epoch, stream)
    samples = splitmix64(sample_indices.astype(np.uint64) ^ key)
    counters = samples[:, None] + np.arange(length, dtype=np.uint64)[None, :] * _POSITION_STRIDE
    return splitmix64(counters)


def _uniform(seed: int, epoch: int, sample_indices: np.ndarray, length: int, stream: int) -> np.ndarray:
    """``[B, length]`` floats in [0, 1)."""
    return (_hash_bits(seed, epoch, sample_indices, length, stream) >> np.uint64(11)).astype(np.float64) * (
        1.0 / (1 << 53)
    )


def _random_tokens(hashes: np.ndarray, vocab_size: int, excluded: Sequence[int]) -> np.ndarray:
    """Uniform ids in ``[0, vocab_size)`` minus ``excluded``: draw among the allowed count, then step
    over each excluded id in increasing order."""
    excluded = sorted({int(i) for i in excluded if 0 <= int(i) < vocab_size})
    allowed = vocab_size - len(excluded)
    if allowed <= 0:
        raise ValueError(f"vocab_size {vocab_size} leaves no token for random replacement")
    ids = ((hashes >> np.uint64(11)).astype(np.float64) * (allowed / (1 << 53))).astype(np.int64)
    for token in excluded:
        ids += ids >= token
    return ids


_NOT_MASKABLE = np.uint64(0xFFFFFFFFFFFFFFFF)
_POSITION_BITS = np.uint64(16)


def _priorities(seed: int, epoch: int, indices: np.ndarray, length: int, maskable: np.ndarray) -> np.ndarray:
    """Per position a hash with the position in its low bits, so no two positions of a row tie;
    positions that may not be masked get the largest value."""
    if length > 1 << 16:
        raise ValueError(f"mask_batch supports sequences of up to 65536 tokens, got {length}")
    hashes = _hash_bits(seed, epoch, indices, length, stream=0)
    hashes >>= _POSITION_BITS
    hashes <<= _POSITION_BITS
    hashes |= np.arange(length, dtype=np.uint64)[None, :]
    hashes[~maskable] = _NOT_MASKABLE
    return hashes


def _select_smallest(priority: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[B, L]`` mask of each row's ``counts[row]`` smallest priorities (a partition, not a sort: rows
    of a packed batch mostly share one count)."""
    selected = np.zeros(priority.shape, dtype=bool)
    for count in np.unique(counts):
        if count == 0:
            continue
        rows = np.nonzero(counts == count)[0]
        block = priority[rows]
        threshold = np.partition(block, count - 1, axis=1)[:, count - 1 : count]
        selected[rows] = block <= threshold
    return selected


def mask_batch(
    input_ids: torch.Tensor | np.ndarray,
    attention_mask: torch.Tensor | np.ndarray,
    sample_indices: torch.Tensor | np.ndarray | Sequence[int],
    *,
    seed: int,
    epoch: int,
    config: MaskingConfig,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Sequence[int] = (0, 1, 2),
    unk_token_id: int | None = None,
) -> MaskedBatch:
    """Mask a ``[B, L]`` batch; ``sample_indices`` are the samples' global indices in the dataset.

    ``vocab_size`` includes ``[MASK]``. ``unk_token_id``, when given, is never drawn as a random
    replacement (it may still be masked, as any text token)."""
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask)
    indices = np.asarray(
        sample_indices.cpu() if isinstance(sample_indices, torch.Tensor) else sample_indices, dtype=np.int64
    )
    if ids.ndim != 2 or mask.shape != ids.shape or indices.shape != (ids.shape[0],):
        raise ValueError(
            f"mask_batch needs input_ids [B, L], attention_mask [B, L] and sample_indices [B]; got "
            f"{ids.shape}, {mask.shape}, {indices.shape}"
        )
    batch, length = ids.shape

    never = sorted(set(special_token_ids) | {mask_token_id})
    maskable = mask != 0
    for token in never:
        maskable &= ids != token
    n_maskable = maskable.sum(axis=1)
    n_select = np.where(n_maskable > 0, np.maximum(1, np.rint(config.mask_prob * n_maskable)), 0).astype(np.int64)
    selected = _select_smallest(_priorities(seed, epoch, indices, length, maskable), n_select)

    mask_fraction, random_fraction = MASKING_STRATEGIES[config.strategy]
    masked = ids.copy()
    if mask_fraction >= 1.0:
        masked[selected] = mask_token_id
    else:
        action = _uniform(seed, epoch, indices, length, stream=1)
        masked[selected & (action < mask_fraction)] = mask_token_id
        to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
        if to_random.any():
            excluded = list(never) + ([unk_token_id] if unk_token_id is not None else [])
            random_ids = _random_tokens(_hash_bits(seed, epoch, indices, length, stream=2), vocab_size, excluded)
            masked[to_random] = random_ids[to_random]
    labels = np.where(selected, ids, IGNORE_INDEX)
    return MaskedBatch(masked_input_ids=torch.from_numpy(masked), mlm_labels=torch.from_numpy(labels))
