"""Dynamic masking for MLM/RTD, reproducible from ``(seed, epoch, sample index)``.

Each sample gets exactly ``max(1, round(mask_prob * n))`` masked positions out of its ``n``
maskable tokens (never ``[CLS]``, ``[SEP]``, padding or other special ids), chosen by
counter-based hashing rather than a stateful RNG: the same sample masked on any rank, in
any worker, after any resume, gets the same mask. A new epoch gives a new mask.

Strategies (what a selected position becomes):

- ``rtd``:     all ``[MASK]`` (the official DeBERTaV3 RTD recipe)
- ``bert``:    80% ``[MASK]``, 10% a random token, 10% unchanged
- ``electra``: 85% ``[MASK]``, 15% unchanged
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

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


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each element (uint64 arithmetic wraps by design)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _uniform(seed: int, epoch: int, sample_indices: np.ndarray, length: int, stream: int) -> np.ndarray:
    """``[B, length]`` floats in [0, 1), a pure function of (seed, epoch, sample, position, stream)."""
    key = _splitmix64(np.array([(seed * 1_000_003 + epoch) * 8 + stream], dtype=np.uint64))[0]
    samples = _splitmix64(sample_indices.astype(np.uint64) ^ key)
    with np.errstate(over="ignore"):
        counters = samples[:, None] + np.arange(length, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03)
    return (_splitmix64(counters) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


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
) -> MaskedBatch:
    """Mask a ``[B, L]`` batch; ``sample_indices`` are the samples' global indices in the dataset."""
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

    maskable = (mask != 0) & ~np.isin(ids, np.asarray(list(special_token_ids) + [mask_token_id], dtype=np.int64))
    n_maskable = maskable.sum(axis=1)
    n_select = np.where(n_maskable > 0, np.maximum(1, np.rint(config.mask_prob * n_maskable)), 0).astype(np.int64)

    # The n_select maskable positions with the smallest hash are selected.
    priority = np.where(maskable, _uniform(seed, epoch, indices, length, stream=0), 2.0)
    rank = np.empty_like(priority, dtype=np.int64)
    np.put_along_axis(rank, np.argsort(priority, axis=1, kind="stable"), np.arange(length)[None, :], axis=1)
    selected = rank < n_select[:, None]

    mask_fraction, random_fraction = MASKING_STRATEGIES[config.strategy]
    action = _uniform(seed, epoch, indices, length, stream=1)
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)

    masked = ids.copy()
    masked[to_mask] = mask_token_id
    if to_random.any():
        random_ids = (_uniform(seed, epoch, indices, length, stream=2) * vocab_size).astype(np.int64)
        masked[to_random] = random_ids[to_random]
    labels = np.where(selected, ids, IGNORE_INDEX)
    return MaskedBatch(masked_input_ids=torch.from_numpy(masked), mlm_labels=torch.from_numpy(labels))
