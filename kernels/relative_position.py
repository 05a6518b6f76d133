"""Relative positions of DeBERTa-v2/v3: log buckets and the slot table.

For query position ``i`` and key position ``j`` the relative distance is ``r = i - j``.
DeBERTa-v3 keeps ``|r| <= mid`` (``mid = position_buckets // 2``) exact and log-buckets
larger distances; the bucket is then shifted into a row ("slot") of the relative
embedding table, which has ``2 * span`` rows (``span = position_buckets`` when buckets are
used, else ``max_relative_positions``):

    slot(r) = clamp(bucket(r) + span, 0, 2 * span - 1)

Both c2p and p2c use the same ``slot(i - j)`` (Hugging Face gathers p2c with the negated
distance and then transposes, which cancels out).

Buckets are computed on the host in float64: a float32 ``ceil(log(.))`` evaluated inside
a kernel is off by one at a few distances, so kernels read these tables instead.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def relative_span(position_buckets: int, max_relative_positions: int) -> int:
    """Half the number of rows of the relative embedding table."""
    return position_buckets if position_buckets > 0 else max_relative_positions


def log_bucket(distance: int, position_buckets: int, max_relative_positions: int) -> int:
    """Bucket of one relative distance, exactly as HF ``make_log_bucket_position``."""
    if position_buckets <= 0 or max_relative_positions <= 0:
        return distance
    mid = position_buckets // 2
    magnitude = abs(distance)
    if magnitude <= mid:
        return distance
    log_ratio = math.log(magnitude / mid) / math.log((max_relative_positions - 1) / mid)
    bucket = math.ceil(log_ratio * (mid - 1)) + mid
    return bucket if distance > 0 else -bucket


@lru_cache(maxsize=64)
def _slot_of_distance_cpu(max_distance: int, position_buckets: int, max_relative_positions: int) -> torch.Tensor:
    span = relative_span(position_buckets, max_relative_positions)
    slots = [
        min(max(log_bucket(r, position_buckets, max_relative_positions) + span, 0), 2 * span - 1)
        for r in range(-max_distance, max_distance + 1)
    ]
    return torch.tensor(slots, dtype=torch.int32)


def slot_of_distance(
    max_distance: int,
    position_buckets: int,
    max_relative_positions: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Lookup table ``table[r + max_distance] = slot(r)`` for ``r`` in ``[-max_distance, max_distance]``.

    int32, length ``2 * max_distance + 1``. This is the table kernels read: an ``[L, L]``
    slot matrix is never needed, ``slot(i - j) = table[i - j + L - 1]`` with
    ``max_distance = L - 1``.
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    table = _slot_of_distance_cpu(max_distance, position_buckets, max_relative_positions)
    return table if device is None else table.to(device)


def relative_slots(
    query_len: int,
    key_len: int,
    position_buckets: int,
    max_relative_positions: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``[query_len, key_len]`` int64 matrix of slots ``slot(i - j)`` (reference path only)."""
    max_distance = max(query_len, key_len) - 1
    table = slot_of_distance(max_distance, position_buckets, max_relative_positions).long()
    distance = torch.arange(query_len)[:, None] - torch.arange(key_len)[None, :]
    slots = table[distance + max_distance]
    return slots if device is None else slots.to(device)
