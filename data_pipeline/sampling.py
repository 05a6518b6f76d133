"""Which row the loader reads for each global sample index: blending, language sampling, shuffling.

The loader's samples form one endless stream ``k = 0, 1, 2, ...``; ``k`` is all the state there is.
An epoch is ``N`` samples, ``N`` the number of rows in the blended sources. Each source (one
language of one data directory) contributes a fixed count ``c_s`` of an epoch's samples,
proportional to its sampling probability; a source with more rows than ``c_s`` shows a different
subset each epoch, one with fewer repeats its rows. With natural proportions (one directory,
``alpha = 1``) every row is seen exactly once per epoch.

Shuffling uses keyed permutations (a Feistel network with cycle walking) instead of stored index
arrays: sample ``k``'s row is a pure function of ``(seed, k)``, costs O(1) memory however large the
dataset, and is the same on every rank and after any resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from data_pipeline.hashing import derive_key, splitmix64

_ROUNDS = 6  # alternating half-rounds
_OUTER = 0x0F
_INNER = 0x1E


_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


_S1 = np.uint64(32)
_S2 = np.uint64(29)


def _round(half: np.ndarray, key: np.ndarray | np.uint64) -> np.ndarray:
    """Feistel round function: a cheap multiply-xorshift mix of ``half`` under ``key`` (array
    arithmetic wraps modulo 2**64 without warnings)."""
    h = half ^ key
    h *= _C1
    h ^= h >> _S1
    h *= _C2
    h ^= h >> _S2
    return h


def permute(indices: np.ndarray, n: int | np.ndarray, keys: int | np.ndarray) -> np.ndarray:
    """Images of ``indices`` under the bijection of ``[0, n)`` chosen by ``keys``; ``n`` and ``keys`` may
    be one value or one per index (each index in ``[0, its n)``).

    An alternating Feistel network on ``b = bit_length(n - 1)`` bits: the value is split into a low
    part of ``b // 2`` bits and a high part of the rest, and each round xors one part with a keyed
    hash of the other (a bijection whatever the widths). A result outside ``[0, n)`` is walked through
    the network again until it lands inside (cycle walking; the domain is under ``2n``, so on average
    fewer than two walks)."""
    x = np.asarray(indices, dtype=np.uint64).reshape(-1)
    sizes = np.broadcast_to(np.asarray(n, dtype=np.int64), x.shape)
    result = np.zeros_like(x)
    bits = np.frexp(np.maximum(sizes - 1, 1).astype(np.float64))[1]  # bit length of n - 1 (n < 2**53)
    bits = np.maximum(bits, 2)
    low_bits = (bits // 2).astype(np.uint64)
    low_mask = (np.uint64(1) << low_bits) - np.uint64(1)
    high_mask = (np.uint64(1) << (bits.astype(np.uint64) - low_bits)) - np.uint64(1)
    key_array = np.asarray(keys, dtype=np.uint64)
    scalar_key = key_array.ndim == 0 or bool((key_array == key_array.reshape(-1)[0]).all())
    key_array = key_array.reshape(-1)[:1] if scalar_key else np.broadcast_to(key_array, x.shape)
    round_keys = [splitmix64(key_array ^ np.uint64(r + 1)) for r in range(_ROUNDS)]
    if scalar_key:
        round_keys = [k[0] for k in round_keys]
    active = np.nonzero(sizes > 1)[0]
    current, limit = x[active], sizes[active].astype(np.uint64)
    shift, lows, highs = low_bits[active], low_mask[active], high_mask[active]
    keys_now = round_keys if scalar_key else [k[active] for k in round_keys]
    while active.size:
        low, high = current & lows, current >> shift
        for r in range(_ROUNDS):
            if r % 2 == 0:
                high = high ^ (_round(low, keys_now[r]) & highs)
            else:
                low = low ^ (_round(high, keys_now[r]) & lows)
        current = (high << shift) | low
        inside = current < limit
        result[active[inside]] = current[inside]
        if inside.all():
            break
        outside = ~inside
        active, current, limit = active[outside], current[outside], limit[outside]
        shift, lows, highs = shift[outside], lows[outside], highs[outside]
        if not scalar_key:
            keys_now = [k[outside] for k in keys_now]
    return result.reshape(np.shape(indices))


def largest_remainder(probabilities: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to ``total``, as close as possible to ``probabilities * total``."""
    exact = np.asarray(probabilities, dtype=np.float64) * total
    counts = np.floor(exact + 1e-9).astype(np.int64)
    leftover = int(total - counts.sum())
    if leftover > 0:
        order = np.lexsort((np.arange(len(exact)), -(exact - counts)))
        counts[order[:leftover]] += 1
    elif leftover < 0:
        order = np.lexsort((np.arange(len(exact)), exact - counts))
        taken = 0
        for index in order:
            if taken == -leftover:
                break
            if counts[index] > 0:
                counts[index] -= 1
                taken += 1
    return counts


def source_probabilities(
    rows: Sequence[int], groups: Sequence[int], group_weights: Sequence[float], alpha: float
) -> np.ndarray:
    """Probability of each source: its group's (data directory's) weight, shared among the group's
    sources (languages) in proportion to ``p_i ** alpha``, ``p_i`` the source's share of its group's rows."""
    rows = np.asarray(rows, dtype=np.float64)
    groups = np.asarray(groups)
    weights = np.asarray(group_weights, dtype=np.float64)
    weights = weights / weights.sum()
    probabilities = np.zeros(len(rows))
    for group, weight in enumerate(weights):
        members = groups == group
        shares = rows[members] / rows[members].sum()
        tempered = shares**alpha
        probabilities[members] = weight * tempered / tempered.sum()
    return probabilities


@dataclass
class EpochPlan:
    """Maps global sample indices to (source, row of that source)."""

    source_rows: np.ndarray  # rows of each source
    counts: np.ndarray  # samples each source contributes per epoch (sums to samples_per_epoch)
    seed: int
    shuffle: bool

    def __post_init__(self) -> None:
        self.source_rows = np.asarray(self.source_rows, dtype=np.int64)
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if (self.source_rows <= 0).any():
            raise ValueError("every source needs at least one row")
        self.samples_per_epoch = int(self.counts.sum())
        self.ends = np.cumsum(self.counts)
        self.starts = self.ends - self.counts

    @classmethod
    def build(cls, source_rows: Sequence[int], probabilities: Sequence[float], seed: int, shuffle: bool) -> EpochPlan:
        total = int(np.sum(source_rows))
        return cls(np.asarray(source_rows), largest_remainder(probabilities, total), seed, shuffle)

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For global sample indices: (epoch, source, row within the source)."""
        samples = np.asarray(samples, dtype=np.int64)
        epochs = samples // self.samples_per_epoch
        positions = (samples % self.samples_per_epoch).astype(np.uint64)
        if self.shuffle:
            positions = permute(positions, self.samples_per_epoch, derive_key(self.seed, _OUTER, epochs))
        positions = positions.astype(np.int64)
        sources = np.searchsorted(self.ends, positions, side="right")
        offsets = positions - self.starts[sources]
        rows_of_source = self.source_rows[sources]
        repeats, rows = np.divmod(offsets, rows_of_source)
        if self.shuffle:
            keys = derive_key(self.seed, _INNER, sources, epochs, repeats)
            rows = permute(rows, rows_of_source, keys).astype(np.int64)
        return epochs, sources, rows
