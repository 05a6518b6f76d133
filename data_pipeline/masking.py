"""Dynamic masking for MLM/RTD, reproducible from ``(seed, epoch, sample index)``.

Which positions are selected is decided by counter-based hashing rather than a stateful RNG: the
same sample masked on any rank, in any worker, after any resume, gets the same mask, and a new
epoch gives a new mask. ``[CLS]``, ``[SEP]``, padding, ``[MASK]`` and ``[UNK]`` are never selected.

Strategies:

- ``rtd``:      ``max(1, round(mask_prob * n))`` of a row's ``n`` maskable tokens, uniformly at
  random, all become ``[MASK]``
- ``bert``:     the same positions; 80% ``[MASK]``, 10% a random token, 10% unchanged
- ``electra``:  the same positions; 85% ``[MASK]``, 15% unchanged
- ``official``: the position rule of the official DeBERTa RTD masker (see :func:`official_selection`);
  all become ``[MASK]``

A random replacement token is never a special id, ``[MASK]`` or ``[UNK]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from data_pipeline.errors import ConfigError
from data_pipeline.hashing import derive_key, splitmix64
from data_pipeline.tokenizer import UNK_ID

IGNORE_INDEX = -100

# strategy -> (fraction replaced by [MASK], fraction replaced by a random token); the rest stays.
MASKING_STRATEGIES: dict[str, tuple[float, float]] = {
    "rtd": (1.0, 0.0),
    "bert": (0.8, 0.1),
    "electra": (0.85, 0.0),
    "official": (1.0, 0.0),
}


@dataclass(frozen=True)
class MaskingConfig:
    strategy: str = "rtd"
    mask_prob: float = 0.15

    def __post_init__(self) -> None:
        if self.strategy not in MASKING_STRATEGIES:
            raise ConfigError(f"masking strategy {self.strategy!r} is not one of {sorted(MASKING_STRATEGIES)}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"mask_prob must be in (0, 1), got {self.mask_prob}")


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


def official_window(mask_prob: float) -> int:
    """Maskable tokens per window of the official masker: ``int(1 / mask_prob)`` (6 at 0.15)."""
    return max(1, int(1.0 / mask_prob))


def official_max_predictions(seq_len: int, mask_prob: float) -> int:
    """The official masker's cap on masks per row, set from the maximum sequence length:
    ``mask_prob * seq_len`` rounded up to a multiple of ten (80 at 512, 160 at 1024, 1230 at 8192)."""
    return math.ceil(seq_len * mask_prob / 10) * 10


def official_selection(
    maskable: np.ndarray, tokens: np.ndarray, mask_prob: float, seed: int, epoch: int, indices: np.ndarray
) -> np.ndarray:
    """The official DeBERTa RTD masker's positions, ``[B, L]`` bool.

    A row's maskable positions, in order, are cut into consecutive windows of
    :func:`official_window` of them (the last window holds what is left, possibly fewer); one
    position is drawn uniformly within each window. The first ``k`` windows' positions are selected,
    ``k = min(cap, max(1, round(mask_prob * tokens)), number of windows)``, where ``tokens`` counts
    the row's non-padding tokens including ``[CLS]`` and ``[SEP]``, ``round`` rounds half to even
    (as Python's does) and ``cap`` is :func:`official_max_predictions` of the row length ``L``.
    So masks are spread about one per window, and the maskable tokens after the ``k``-th window
    (the last ~9% of a full row) are never masked."""
    batch, length = maskable.shape
    window = official_window(mask_prob)
    rank = np.cumsum(maskable, axis=1) - 1  # position's index among its row's maskable positions
    n_maskable = maskable.sum(axis=1)
    n_windows = -(-n_maskable // window)
    wanted = np.maximum(1, np.rint(tokens * mask_prob)).astype(np.int64)
    used = np.minimum(np.minimum(wanted, official_max_predictions(length, mask_prob)), n_windows)

    max_windows = -(-length // window)
    starts = np.arange(max_windows, dtype=np.int64)[None, :] * window
    sizes = np.clip(n_maskable[:, None] - starts, 0, window)  # the last window may be partial
    draws = _uniform(seed, epoch, indices, max_windows, stream=3)
    picks = np.minimum((draws * sizes).astype(np.int64), np.maximum(sizes - 1, 0))

    window_of = np.where(maskable, rank // window, 0)
    in_window = np.where(maskable, rank % window, -1)
    pick_here = np.take_along_axis(picks, window_of, axis=1)
    return maskable & (window_of < used[:, None]) & (in_window == pick_here)


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
    unk_token_id: int | None = UNK_ID,
) -> MaskedBatch:
    """Mask a ``[B, L]`` batch; ``sample_indices`` are the samples' global indices in the dataset.

    ``vocab_size`` includes ``[MASK]``. ``unk_token_id`` (dv3's ``[UNK]`` by default; None for a
    vocabulary without one) is never selected and never drawn as a random replacement: predicting
    ``[UNK]`` teaches nothing, and the official masker skips it too."""
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

    never = sorted(set(special_token_ids) | {mask_token_id} | ({unk_token_id} if unk_token_id is not None else set()))
    maskable = mask != 0
    for token in never:
        maskable &= ids != token
    if config.strategy == "official":
        selected = official_selection(maskable, (mask != 0).sum(axis=1), config.mask_prob, seed, epoch, indices)
    else:
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
            random_ids = _random_tokens(_hash_bits(seed, epoch, indices, length, stream=2), vocab_size, never)
            masked[to_random] = random_ids[to_random]
    labels = np.where(selected, ids, IGNORE_INDEX)
    return MaskedBatch(masked_input_ids=torch.from_numpy(masked), mlm_labels=torch.from_numpy(labels))
