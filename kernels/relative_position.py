"""Relative positions of DeBERTa-v2/v3: log buckets and the slot table.

For query position ``i`` and key position ``j`` the relative distance is ``r = i - j``.
DeBERTa-v3 keeps ``|r| <= mid`` (``mid = position_buckets // 2``) exact and log-buckets
larger distances; the bucket is then shifted into a row ("slot") of the relative
embedding table, which has ``2 * span`` rows (``span = position_buckets`` when buckets are
used, else ``max_relative_positions``):

    slot(r) = clamp(bucket(r) + span, 0, 2 * span - 1)

Both c2p and p2c use the same ``slot(i - j)`` (Hugging Face gathers p2c with the negated
distance and then transposes, which cancels out).

Buckets are computed once on the host, with exactly the float32 operations of Hugging Face's
``make_log_bucket_position`` (the official code does the same): a model trained here must see
the positions it will see after export. Exact (float64) arithmetic differs from it by one bucket
at a few distances in some geometries, e.g. (512, 4096); at v3's (256, 512) they agree. Kernels
read these tables; they never evaluate ``ceil(log(.))`` themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


def relative_span(position_buckets: int, max_relative_positions: int) -> int:
    """Half the number of rows of the relative embedding table."""
    return position_buckets if position_buckets > 0 else max_relative_positions


def log_buckets(distances: torch.Tensor, position_buckets: int, max_relative_positions: int) -> torch.Tensor:
    """Buckets of relative distances (int64), with HF ``make_log_bucket_position``'s own float32 steps."""
    relative = distances.to(torch.int64)
    if position_buckets <= 0 or max_relative_positions <= 0:
        return relative
    mid = position_buckets // 2
    sign = torch.sign(relative)
    magnitude = torch.where((relative < mid) & (relative > -mid), torch.tensor(mid - 1), relative.abs())
    scale = torch.log(torch.tensor((max_relative_positions - 1) / mid, dtype=torch.float32))
    log_position = torch.ceil(torch.log(magnitude.to(torch.float32) / mid) / scale * (mid - 1)) + mid
    return torch.where(magnitude <= mid, relative.to(torch.float32), log_position * sign).to(torch.int64)


def log_bucket(distance: int, position_buckets: int, max_relative_positions: int) -> int:
    """Bucket of one relative distance, exactly as HF ``make_log_bucket_position``."""
    return int(log_buckets(torch.tensor([distance]), position_buckets, max_relative_positions)[0])


def _slots(distances: torch.Tensor, position_buckets: int, max_relative_positions: int) -> torch.Tensor:
    span = relative_span(position_buckets, max_relative_positions)
    return (log_buckets(distances, position_buckets, max_relative_positions) + span).clamp(0, 2 * span - 1)


@lru_cache(maxsize=64)
def _slot_of_distance_cpu(max_distance: int, position_buckets: int, max_relative_positions: int) -> torch.Tensor:
    distances = torch.arange(-max_distance, max_distance + 1)
    return _slots(distances, position_buckets, max_relative_positions).to(torch.int32)


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


@torch.compiler.assume_constant_result  # a constant of the shapes: torch.compile must not trace the lookup
def used_slots(length: int, position_buckets: int, max_relative_positions: int) -> tuple[int, int]:
    """``(first, last)``: the rows of the relative table that ``slot(i - j)`` reaches for
    ``i, j < length``. ``slot`` is monotone in the distance, so these rows are one window; rows
    outside it are never read. At v3's 256 buckets and length 128 it is 255 of the 512 rows, so
    projecting and scoring only the window halves that work (the table is always 2k rows)."""
    table = _slot_of_distance_cpu(max(length - 1, 0), position_buckets, max_relative_positions)
    return int(table[0]), int(table[-1])


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


# ---------------------------------------------------------------------------------------
# Slot geometry: what a tiled kernel needs to know about slot(r) beyond the lookup table.
# ---------------------------------------------------------------------------------------

# Distances written for the edge slots' open ends; small enough that ``i - SENTINEL`` and
# ``j + SENTINEL`` stay inside int32 for any sequence a kernel will see.
DISTANCE_SENTINEL = 1 << 30


@dataclass(frozen=True)
class SlotGeometry:
    """The slot map of one ``(position_buckets, max_relative_positions)`` pair, as kernels use it.

    ``slot(r)`` is monotone in ``r``. Three regions follow from that:

    * exact: ``exact_lo <= r <= exact_hi`` has ``slot(r) == r + span`` (a plain shift);
    * edges: ``r >= far_hi`` has the last slot, ``r <= far_lo`` slot 0;
    * log region in between, read from ``table``.

    ``table[r + max_distance]`` is ``slot(r)`` for ``|r| <= max_distance``; ``max_distance``
    reaches both edges, so ``slot(r) = table[clamp(r, -max_distance, max_distance) + max_distance]``
    for every ``r``. ``first``/``last`` give, per slot, the range of distances mapped to it
    (edge slots open-ended via ``DISTANCE_SENTINEL``; a slot no distance reaches has
    ``first > last``). ``max_step`` is the largest ``slot(r + 1) - slot(r)``.
    """

    position_buckets: int
    max_relative_positions: int
    span: int
    rows: int
    max_distance: int
    exact_lo: int
    exact_hi: int
    far_lo: int
    far_hi: int
    max_step: int
    table: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor

    def band_width(self, block_m: int, block_n: int) -> int:
        """Most slots one ``block_m x block_n`` tile can touch (its distances are ``block_m + block_n - 1`` consecutive values)."""
        window = block_m + block_n - 2
        slots = self.table.tolist()
        last_index = len(slots) - 1
        return max(slots[min(start + window, last_index)] - slots[start] for start in range(len(slots))) + 1

    def to(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(table, first, last)`` on ``device`` (cached per device)."""
        return _geometry_tensors(self.position_buckets, self.max_relative_positions, str(device))


@lru_cache(maxsize=32)
def slot_geometry(position_buckets: int, max_relative_positions: int) -> SlotGeometry:
    """Build (once per pair) the :class:`SlotGeometry` for these settings."""
    span = relative_span(position_buckets, max_relative_positions)
    if span <= 0:
        raise ValueError(
            f"position_buckets={position_buckets} and max_relative_positions={max_relative_positions} "
            "give an empty relative table"
        )
    rows = 2 * span

    # The log buckets grow without bound, so both edges are reached at a finite distance: widen
    # the window until it holds both, then find where each edge starts (slot(r) is monotone).
    reach, limit = 1024, 1 << 24
    while True:
        window = _slots(torch.arange(-reach, reach + 1), position_buckets, max_relative_positions).tolist()
        if window[-1] == rows - 1 and window[0] == 0:
            break
        reach *= 2
        if reach > limit:
            raise ValueError(f"slot map never reaches both edges for position_buckets={position_buckets}")
    far_hi = window.index(rows - 1) - reach
    far_lo = len(window) - 1 - window[::-1].index(0) - reach
    max_distance = max(far_hi, -far_lo, 1)
    slots = window[reach - max_distance:reach + max_distance + 1]

    exact_hi = 0
    while exact_hi + 1 <= max_distance and slots[exact_hi + 1 + max_distance] == exact_hi + 1 + span:
        exact_hi += 1
    exact_lo = 0
    while exact_lo - 1 >= -max_distance and slots[exact_lo - 1 + max_distance] == exact_lo - 1 + span:
        exact_lo -= 1
    if slots[max_distance] != span:
        raise ValueError(f"slot(0) is {slots[max_distance]}, expected {span}")

    first = [1] * rows
    last = [0] * rows
    seen = [False] * rows
    for offset, s in enumerate(slots):
        r = offset - max_distance
        if not seen[s]:
            first[s], seen[s] = r, True
        last[s] = r
    first[0] = -DISTANCE_SENTINEL
    last[rows - 1] = DISTANCE_SENTINEL
    max_step = max(b - a for a, b in zip(slots, slots[1:], strict=False))
    return SlotGeometry(
        position_buckets=position_buckets,
        max_relative_positions=max_relative_positions,
        span=span,
        rows=rows,
        max_distance=max_distance,
        exact_lo=exact_lo,
        exact_hi=exact_hi,
        far_lo=far_lo,
        far_hi=far_hi,
        max_step=max_step,
        table=torch.tensor(slots, dtype=torch.int32),
        first=torch.tensor(first, dtype=torch.int32),
        last=torch.tensor(last, dtype=torch.int32),
    )


@lru_cache(maxsize=64)
def _geometry_tensors(
    position_buckets: int, max_relative_positions: int, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    geometry = slot_geometry(position_buckets, max_relative_positions)
    return geometry.table.to(device), geometry.first.to(device), geometry.last.to(device)
