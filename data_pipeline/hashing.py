"""Counter-based hashing: reproducible pseudo-randomness as a pure function of integers.

Masks and shuffles are computed from ``(seed, epoch, index, ...)`` rather than drawn from a
stateful generator, so any rank, worker or resumed run gets the same answer for the same sample.
"""

from __future__ import annotations

import numpy as np

_MASK64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each element (uint64 arithmetic wraps by design)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def derive_key(*parts: int | np.ndarray) -> np.ndarray:
    """One uint64 key (or an array of keys) from a sequence of integers, each mixed in turn.

    Python ints of any size and sign are reduced modulo 2**64 first, so large or negative seeds work."""
    key = np.uint64(0x6A09E667F3BCC908)
    with np.errstate(over="ignore"):
        for part in parts:
            if isinstance(part, int | np.integer):
                value = np.uint64(int(part) & _MASK64)
            else:
                value = np.asarray(part).astype(np.uint64)
            key = splitmix64(key ^ value)
    return key
