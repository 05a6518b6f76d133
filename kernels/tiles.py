"""Triton device functions shared by the forward and backward kernels: the tile math.

A ``BLOCK_M x BLOCK_N`` tile of queries ``[i0, i0 + M)`` and keys ``[j0, j0 + N)`` has the
``M + N - 1`` consecutive distances ``i0 - j0 - N + 1 .. i0 - j0 + M - 1``, so its slots form a
band of at most ``BAND`` consecutive rows of ``Kr``/``Qr``. These helpers find that band,
compute the band tile's c2p + p2c bias, reduce a score gradient into slot space, draw the
dropout mask, and read rows of one (sequence, head). docs/kernels.md has the whole design.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def keep_mask(seed, zh, rows, j0, rng_len, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dropout keep-mask of the tile ``rows x [j0, j0 + BLOCK_N)`` (``j0`` a multiple of 4).

    One Philox call gives four 32-bit draws: columns ``4c .. 4c + 3`` of row ``i`` share the
    counters ``(i * ceil(Lr / 4) + c, sequence * heads + head)``. The mask of an element depends
    on its position only, never on the tile shape, so every pass and every variant draws the same.
    """
    quads = j0 // 4 + tl.arange(0, BLOCK_N // 4)
    counter = (rows[:, None] * ((rng_len + 3) // 4) + quads[None, :]).to(tl.uint32)
    zero = counter * 0
    stream = (zero + zh).to(tl.uint32)
    r0, r1, r2, r3 = tl.random.philox(seed, counter, stream, zero, zero)
    # [M, N/4, 2, 2] -> [M, N]: column 4c + k takes draw k of call c.
    bits = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [BLOCK_M, BLOCK_N])
    return tl.random.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def masked_log2_scores(s, qk_scale, col_ok, row_valid, key_valid, HAS_MASK: tl.constexpr):
    """Scale into the exp2 domain and mask like HF.

    A masked key of a real row gets -1e30 (weight exactly 0); a padding row (all its pairs
    masked) gets a constant, hence HF's uniform softmax; columns past the sequence get -inf.
    """
    s2 = s * qk_scale
    if HAS_MASK:
        s2 = tl.where(key_valid[None, :], s2, -1.0e30)
        s2 = tl.where(row_valid[:, None], s2, 0.0)
    return tl.where(col_ok[None, :], s2, float("-inf"))


@triton.jit
def band_index(
    i0, j0, SLOT, max_distance, exact_lo, exact_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Slot band of tile (i0, j0): (first slot, is the tile all-exact, [M, N] index into the band)."""
    dmin = i0 - j0 - (BLOCK_N - 1)
    dmax = i0 - j0 + (BLOCK_M - 1)
    s_lo = tl.load(SLOT + max_distance + tl.minimum(tl.maximum(dmin, -max_distance), max_distance))
    is_shift = (dmin >= exact_lo) & (dmax <= exact_hi)
    local = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :]
    shift_index = local + (BLOCK_N - 1)
    # Log region: read slot(r) from the host table (skipped by the mask in exact tiles).
    r = tl.minimum(tl.maximum(local + (i0 - j0), -max_distance), max_distance)
    table_index = tl.load(SLOT + max_distance + r, mask=(r == r) & (is_shift == 0), other=0) - s_lo
    return s_lo, is_shift, tl.where(is_shift, shift_index, table_index)


@triton.jit
def load_band(TABLE, s_lo, offs_d, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BAND: tl.constexpr):
    rows = s_lo + tl.arange(0, BAND)
    return tl.load(TABLE + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=(rows < ROWS)[:, None], other=0.0)


@triton.jit
def band_bias(q, k, kr_band, qr_band, index, DOT_PRECISION: tl.constexpr):
    """c2p + p2c of a band tile: dense products against the band, then gather by slot."""
    c2p_band = tl.dot(q, tl.trans(kr_band), input_precision=DOT_PRECISION)  # [M, BAND]
    p2c_band = tl.dot(qr_band, tl.trans(k), input_precision=DOT_PRECISION)  # [BAND, N]
    return tl.gather(c2p_band, index, 1) + tl.gather(p2c_band, index, 0)


@triton.jit
def rows_to_slots(
    g, i0, j0, s_lo, is_shift, FIRST, LAST,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr,
):
    """out[a, t] = sum_b g[a, b] over pairs with slot(i0 + a - j0 - b) == s_lo + t  ([M, BAND])."""
    a = tl.arange(0, BLOCK_M)[:, None]
    t = tl.arange(0, BAND)[None, :]
    if is_shift:
        # One pair per (row, slot): b = a - t + N - 1.
        b = a - t + (BLOCK_N - 1)
        ok = (b >= 0) & (b < BLOCK_N)
        out = tl.where(ok, tl.gather(g, tl.minimum(tl.maximum(b, 0), BLOCK_N - 1), 1), 0.0)
    else:
        # Keys of one row sharing a slot are contiguous: b in [i - last - j0, i - first - j0].
        slot = s_lo + t
        slot_ok = slot < ROWS
        first = tl.load(FIRST + slot, mask=slot_ok, other=1)
        last = tl.load(LAST + slot, mask=slot_ok, other=0)
        b_hi = tl.minimum(i0 + a - first - j0, BLOCK_N - 1)
        b_lo = tl.maximum(i0 + a - last - j0, 0)
        inclusive = tl.cumsum(g, 1)
        exclusive = inclusive - g
        upper = tl.gather(inclusive, tl.maximum(b_hi, 0), 1)
        lower = tl.gather(exclusive, tl.minimum(b_lo, BLOCK_N - 1), 1)
        out = tl.where((b_lo <= b_hi) & slot_ok, upper - lower, 0.0)
    return out


@triton.jit
def cols_to_slots(
    g, i0, j0, s_lo, is_shift, FIRST, LAST,
    ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BAND: tl.constexpr,
):
    """out[t, b] = sum_a g[a, b] over pairs with slot(i0 + a - j0 - b) == s_lo + t  ([BAND, N])."""
    t = tl.arange(0, BAND)[:, None]
    b = tl.arange(0, BLOCK_N)[None, :]
    if is_shift:
        a = t + b - (BLOCK_N - 1)
        ok = (a >= 0) & (a < BLOCK_M)
        out = tl.where(ok, tl.gather(g, tl.minimum(tl.maximum(a, 0), BLOCK_M - 1), 0), 0.0)
    else:
        # Queries of one column sharing a slot are contiguous: a in [j + first - i0, j + last - i0].
        slot = s_lo + t
        slot_ok = slot < ROWS
        first = tl.load(FIRST + slot, mask=slot_ok, other=1)
        last = tl.load(LAST + slot, mask=slot_ok, other=0)
        a_lo = tl.maximum(j0 + b + first - i0, 0)
        a_hi = tl.minimum(j0 + b + last - i0, BLOCK_M - 1)
        inclusive = tl.cumsum(g, 0)
        exclusive = inclusive - g
        upper = tl.gather(inclusive, tl.maximum(a_hi, 0), 0)
        lower = tl.gather(exclusive, tl.minimum(a_lo, BLOCK_M - 1), 0)
        out = tl.where((a_lo <= a_hi) & slot_ok, upper - lower, 0.0)
    return out


@triton.jit
def add_to_band(PART, s_lo, offs_d, contribution, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BAND: tl.constexpr):
    """Read-modify-write of this program's own partial slice; the barrier orders consecutive tiles."""
    rows = s_lo + tl.arange(0, BAND)
    ptrs = PART + rows[:, None] * HEAD_DIM + offs_d[None, :]
    ok = (rows < ROWS)[:, None]
    current = tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg")
    tl.store(ptrs, current + contribution, mask=ok)
    tl.debug_barrier()


@triton.jit
def add_to_row(PART, row, offs_d, contribution, HEAD_DIM: tl.constexpr):
    ptrs = PART + row * HEAD_DIM + offs_d
    tl.store(ptrs, tl.load(ptrs, cache_modifier=".cg") + contribution)
    tl.debug_barrier()


@triton.jit
def load_rows(PTR, base, rows, n_len, stride_l, offs_d):
    """Rows ``rows`` of one (sequence, head) slice ``[len, D]``; rows past the end read as 0."""
    return tl.load(PTR + base + rows[:, None] * stride_l + offs_d[None, :], mask=(rows < n_len)[:, None], other=0.0)


@triton.jit
def load_key_tile(V, MASK, base, mask_base, cols, offs_d, n_len, stride_l, HAS_MASK: tl.constexpr):
    """A key tile's values, which of its columns exist, and which of those are tokens (not padding)."""
    col_ok = cols < n_len
    v = load_rows(V, base, cols, n_len, stride_l, offs_d)
    key_valid = col_ok
    if HAS_MASK:
        key_valid = tl.load(MASK + mask_base + cols, mask=col_ok, other=0) != 0
    return v, col_ok, key_valid


@triton.jit
def load_gradient_rows(DO, LSE, DELTA, MASK, base, row_base, mask_base, rows, offs_d, n_len, stride_l,
                       HAS_MASK: tl.constexpr):
    """What a backward pass reads of a query tile: the output gradient, the rows' log-sum-exp and
    ``Delta = rowsum(dO * O)``, and which rows are tokens (rows past the end read as no row)."""
    row_ok = rows < n_len
    do = load_rows(DO, base, rows, n_len, stride_l, offs_d)
    lse = tl.load(LSE + row_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    row_valid = row_ok
    if HAS_MASK:
        row_valid = tl.load(MASK + mask_base + rows, mask=row_ok, other=0) != 0
    return do, lse, delta, row_valid


@triton.jit
def sequence_span(CU, z, seq_len, VARLEN: tl.constexpr):
    """(first token, length) of sequence z: a packed slice, or the padded row of length seq_len."""
    if VARLEN:
        start = tl.load(CU + z)
        length = tl.load(CU + z + 1) - start
    else:
        start = z * 0
        length = seq_len + z * 0
    return start, length
