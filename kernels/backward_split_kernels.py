"""The backward built for Hopper ("split"): band pairs and far pairs in separate kernels.

A pair ``(i, j)`` is *far* when ``i - j >= far_hi`` (its slot is the last) or ``i - j <= far_lo``
(slot 0), else it is a *band* pair. Every pair belongs to exactly one of the two kernels of a
pass, whatever tile shapes each uses, so each kernel can take the tiles that suit it:

* band kernels (``band_dq_kernel``, ``band_dkv_kernel``) walk only the tiles that hold band
  pairs. The c2p (p2c) score gradient is reduced into slot space per owned row (column) and
  *stored*, not added: every ``(row, slot)`` element is written by exactly one tile, because a
  slot that a row's keys share across two neighbouring tiles is carried in registers into
  the next tile and written there. No read-modify-write, no barrier. The stored
  ``[H, rows, 2k]`` slot gradients are then folded once by a matmul on the host
  (``dKr = dC2P^T Q``, ``dQr = dP2C^T K``). They write ``dq`` (``dk``, ``dv``) in fp32.
* far kernels (``far_dq_kernel``, ``far_dkv_kernel``) are plain flash-attention backward with
  the rank-1 bias ``c2p_edge[i] + p2c_edge[j]``: no band tables, no gathers, so they afford
  large tiles and a deep pipeline. Tiles entirely in one far region skip all pair masking;
  the few tiles that straddle the band boundary mask the band pairs out. They add the band
  kernel's fp32 result, the rank-one edge terms, store the gradient in its dtype, and store
  the per-row (per-column) sums of the far score gradient for the edge rows of the fold.

One program per (block, sequence, head), all on grid axis 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.backward_kernels import tile_grad
from kernels.tiles import (
    band_bias,
    band_index,
    cols_to_slots,
    load_band,
    load_gradient_rows,
    load_key_tile,
    load_rows,
    rows_to_slots,
    sequence_span,
)


@triton.jit
def _slot_of(SLOT, distance, max_distance):
    return tl.load(SLOT + max_distance + tl.minimum(tl.maximum(distance, -max_distance), max_distance))


@triton.jit
def _count_le(x, BLOCK: tl.constexpr):
    """Number of blocks ``b >= 0`` with ``b * BLOCK <= x`` (Triton's ``//`` truncates toward zero)."""
    return tl.where(x >= 0, x // BLOCK + 1, 0)


@triton.jit
def _first_ge(x, BLOCK: tl.constexpr):
    """Smallest block ``b >= 0`` with ``b * BLOCK >= x``."""
    return (tl.maximum(x, 0) + BLOCK - 1) // BLOCK


@triton.jit
def _program_block(seq_len, num_heads, BLOCK: tl.constexpr):
    blocks = tl.cdiv(seq_len, BLOCK)
    zh = tl.program_id(0) // blocks
    return tl.program_id(0) % blocks, zh, zh // num_heads, zh % num_heads


@triton.jit
def _key_tile_ranges(i0, n_len, far_lo, far_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles of query block ``i0`` (distances fall as the tile index rises): all far-hi ``[0, a)``,
    some far-hi ``[a, b)``, some far-lo ``[c, d)``, all far-lo ``[d, n)``; band pairs lie in ``[a, d)``."""
    n = tl.cdiv(n_len, BLOCK_N)
    a = tl.minimum(_count_le(i0 - BLOCK_N + 1 - far_hi, BLOCK_N), n)
    b = tl.minimum(tl.maximum(_count_le(i0 + BLOCK_M - 1 - far_hi, BLOCK_N), a), n)
    d = tl.minimum(tl.maximum(_first_ge(i0 + BLOCK_M - 1 - far_lo, BLOCK_N), b), n)
    c = tl.minimum(tl.maximum(_first_ge(i0 - BLOCK_N + 1 - far_lo, BLOCK_N), b), d)
    return a, b, c, d, n


@triton.jit
def _query_tile_ranges(j0, n_len, far_lo, far_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles of key block ``j0`` (distances rise with the tile index): all far-lo ``[0, a)``,
    some far-lo ``[a, b)``, some far-hi ``[c, d)``, all far-hi ``[d, n)``; band pairs lie in ``[a, d)``."""
    n = tl.cdiv(n_len, BLOCK_M)
    a = tl.minimum(_count_le(j0 + far_lo - BLOCK_M + 1, BLOCK_M), n)
    b = tl.minimum(tl.maximum(_count_le(j0 + BLOCK_N - 1 + far_lo, BLOCK_M), a), n)
    d = tl.minimum(tl.maximum(_first_ge(j0 + BLOCK_N - 1 + far_hi, BLOCK_M), b), n)
    c = tl.minimum(tl.maximum(_first_ge(j0 + far_hi - BLOCK_M + 1, BLOCK_M), b), d)
    return a, b, c, d, n


# ---------------------------------------------------------------------------------------
# Tile math with an ownership mask on the pairs
# ---------------------------------------------------------------------------------------


@triton.jit
def _dq_pairs(
    dq, q, do, lse, delta, k, V, base, j0, offs_m, offs_n, offs_d, n_len, stride_l, bias, pair_ok,
    row_valid, MASK, mask_base, sm_scale, seed, zh, rng_len, dropout_p,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOME_PAIRS: tl.constexpr,
):
    cols = j0 + offs_n
    v, col_ok, key_valid = load_key_tile(V, MASK, base, mask_base, cols, offs_d, n_len, stride_l, HAS_MASK)
    g, _ = tile_grad(
        q, k, v, do, lse, delta, bias, col_ok, row_valid, key_valid, sm_scale,
        seed, zh, rng_len, offs_m, j0, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
    )
    if SOME_PAIRS:
        g = tl.where(pair_ok, g, 0.0)
    dq += tl.dot(g.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq, g


@triton.jit
def _dkv_pairs(
    dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m, offs_d,
    j0, col_ok, key_valid, n_len, stride_l, bias, pair_ok, sm_scale, seed, zh, rng_len, dropout_p,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SOME_PAIRS: tl.constexpr,
):
    rows = i0 + offs_m
    do, lse, delta, row_valid = load_gradient_rows(DO, LSE, DELTA, MASK, base, row_base, mask_base, rows, offs_d, n_len,
                                                   stride_l, HAS_MASK)
    g, p_dropped = tile_grad(
        q, k, v, do, lse, delta, bias, col_ok, row_valid, key_valid, sm_scale,
        seed, zh, rng_len, rows, j0, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
    )
    if SOME_PAIRS:
        g = tl.where(pair_ok, g, 0.0)
        p_dropped = tl.where(pair_ok, p_dropped, 0.0)
    dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=DOT_PRECISION)
    dk += tl.dot(tl.trans(g.to(q.dtype)), q, input_precision=DOT_PRECISION)
    return dk, dv, g


# ---------------------------------------------------------------------------------------
# Band kernels: slot-space score gradients stored by a single writer
# ---------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["row_stride_z", "row_stride_h", "seq_len", "seed", "rng_len", "head_stride_h"])
def band_dq_kernel(
    Q, K, V, KR, QR, MASK, CU, SLOT, FIRST, LAST, DO, LSE, DELTA, DQ_ACC, DC2P,
    stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
    seq_len, num_heads, sm_scale, dropout_p, seed, rng_len,
    max_distance, exact_lo, exact_hi, far_lo, far_hi, head_stride_z, head_stride_h,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BAND: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Query block: band part of dq (fp32, to ``DQ_ACC``) and its rows of ``dC2P`` (``DC2P [H, rows, 2k]``)."""
    pid_m, zh, z, h = _program_block(seq_len, num_heads, BLOCK_M)
    start, n_len = sequence_span(CU, z, seq_len, VARLEN)
    i0 = pid_m * BLOCK_M
    if i0 >= n_len:
        return
    base = z.to(tl.int64) * stride_z + h.to(tl.int64) * stride_h + start.to(tl.int64) * stride_l
    row_base = z.to(tl.int64) * row_stride_z + h.to(tl.int64) * row_stride_h + start
    mask_base = z.to(tl.int64) * seq_len
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_len
    q = tl.load(Q + base + offs_m[:, None] * stride_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * stride_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    row_valid = row_ok
    if HAS_MASK:
        row_valid = tl.load(MASK + mask_base + offs_m, mask=row_ok, other=0) != 0
    kr = KR + h * (ROWS * HEAD_DIM)
    qr = QR + h * (ROWS * HEAD_DIM)
    slot_rows = DC2P + (h.to(tl.int64) * head_stride_h + z.to(tl.int64) * head_stride_z + start) * ROWS
    t = tl.arange(0, BAND)[None, :]

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    carry = tl.zeros([BLOCK_M], dtype=tl.float32)
    kb_first, _, _, kb_end, _ = _key_tile_ranges(i0, n_len, far_lo, far_hi, BLOCK_M, BLOCK_N)
    for kb in range(kb_first, kb_end):
        j0 = kb * BLOCK_N
        s_lo, is_shift, index = band_index(i0, j0, SLOT, max_distance, exact_lo, exact_hi, BLOCK_M, BLOCK_N)
        k = load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        kr_band = load_band(kr, s_lo, offs_d, ROWS, HEAD_DIM, BAND)
        bias = band_bias(q, k, kr_band, load_band(qr, s_lo, offs_d, ROWS, HEAD_DIM, BAND), index, DOT_PRECISION)
        distance = offs_m[:, None] - (j0 + offs_n)[None, :]
        dq, g = _dq_pairs(
            dq, q, do, lse, delta, k, V, base, j0, offs_m, offs_n, offs_d, n_len, stride_l, bias,
            (distance > far_lo) & (distance < far_hi), row_valid, MASK, mask_base, sm_scale, seed, zh, rng_len,
            dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, True,
        )
        d_c2p = rows_to_slots(g, i0, j0, s_lo, is_shift, FIRST, LAST, ROWS, BLOCK_M, BLOCK_N, BAND)
        dq += tl.dot(d_c2p.to(q.dtype), kr_band, input_precision=DOT_PRECISION)
        # Row a's slots here run from lo (key j0 + N - 1) up to hi (key j0); the next tile's
        # highest slot is nxt. A slot shared with the next tile is carried there, not stored.
        hi = _slot_of(SLOT, offs_m - j0, max_distance) - s_lo
        lo = _slot_of(SLOT, offs_m - j0 - (BLOCK_N - 1), max_distance) - s_lo
        nxt = _slot_of(SLOT, offs_m - j0 - BLOCK_N, max_distance) - s_lo
        d_c2p += tl.where(t == hi[:, None], carry[:, None], 0.0)
        shared = (nxt == lo) & (kb + 1 < kb_end)
        carry = tl.where(shared, tl.sum(tl.where(t == lo[:, None], d_c2p, 0.0), 1), 0.0)
        owned = (t >= lo[:, None] + shared.to(tl.int32)[:, None]) & (t <= hi[:, None])
        tl.store(
            slot_rows + offs_m.to(tl.int64)[:, None] * ROWS + (s_lo + t), d_c2p.to(DC2P.dtype.element_ty),
            mask=owned & row_ok[:, None] & (s_lo + t < ROWS),
        )
    tl.store(DQ_ACC + base + offs_m[:, None] * stride_l + offs_d[None, :], dq, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["row_stride_z", "row_stride_h", "seq_len", "seed", "rng_len", "head_stride_h"])
def band_dkv_kernel(
    Q, K, V, KR, QR, MASK, CU, SLOT, FIRST, LAST, DO, LSE, DELTA, DK_ACC, DV_ACC, DP2C,
    stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
    seq_len, num_heads, sm_scale, dropout_p, seed, rng_len,
    max_distance, exact_lo, exact_hi, far_lo, far_hi, head_stride_z, head_stride_h,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BAND: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Key block: band part of dk, dv (fp32, to ``DK_ACC``/``DV_ACC``) and its rows of ``dP2C``."""
    pid_n, zh, z, h = _program_block(seq_len, num_heads, BLOCK_N)
    start, n_len = sequence_span(CU, z, seq_len, VARLEN)
    j0 = pid_n * BLOCK_N
    if j0 >= n_len:
        return
    base = z.to(tl.int64) * stride_z + h.to(tl.int64) * stride_h + start.to(tl.int64) * stride_l
    row_base = z.to(tl.int64) * row_stride_z + h.to(tl.int64) * row_stride_h + start
    mask_base = z.to(tl.int64) * seq_len
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = j0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_len
    k = tl.load(K + base + cols[:, None] * stride_l + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + base + cols[:, None] * stride_l + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    key_valid = col_ok
    if HAS_MASK:
        key_valid = tl.load(MASK + mask_base + cols, mask=col_ok, other=0) != 0
    kr = KR + h * (ROWS * HEAD_DIM)
    qr = QR + h * (ROWS * HEAD_DIM)
    slot_rows = DP2C + (h.to(tl.int64) * head_stride_h + z.to(tl.int64) * head_stride_z + start) * ROWS
    t = tl.arange(0, BAND)[:, None]

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    qb_first, _, _, qb_end, _ = _query_tile_ranges(j0, n_len, far_lo, far_hi, BLOCK_M, BLOCK_N)
    for qb in range(qb_first, qb_end):
        i0 = qb * BLOCK_M
        s_lo, is_shift, index = band_index(i0, j0, SLOT, max_distance, exact_lo, exact_hi, BLOCK_M, BLOCK_N)
        q = load_rows(Q, base, i0 + offs_m, n_len, stride_l, offs_d)
        qr_band = load_band(qr, s_lo, offs_d, ROWS, HEAD_DIM, BAND)
        bias = band_bias(q, k, load_band(kr, s_lo, offs_d, ROWS, HEAD_DIM, BAND), qr_band, index, DOT_PRECISION)
        distance = (i0 + offs_m)[:, None] - cols[None, :]
        dk, dv, g = _dkv_pairs(
            dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m, offs_d,
            j0, col_ok, key_valid, n_len, stride_l, bias, (distance > far_lo) & (distance < far_hi), sm_scale,
            seed, zh, rng_len, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, True,
        )
        d_p2c = cols_to_slots(g, i0, j0, s_lo, is_shift, FIRST, LAST, ROWS, BLOCK_M, BLOCK_N, BAND)
        dk += tl.dot(tl.trans(d_p2c.to(k.dtype)), qr_band, input_precision=DOT_PRECISION)
        # Column b's slots here run from lo (query i0) up to hi (query i0 + M - 1); the next
        # tile's lowest slot is nxt. A slot shared with the next tile is carried there.
        lo = _slot_of(SLOT, i0 - cols, max_distance) - s_lo
        hi = _slot_of(SLOT, i0 + BLOCK_M - 1 - cols, max_distance) - s_lo
        nxt = _slot_of(SLOT, i0 + BLOCK_M - cols, max_distance) - s_lo
        d_p2c += tl.where(t == lo[None, :], carry[None, :], 0.0)
        shared = (nxt == hi) & (qb + 1 < qb_end)
        carry = tl.where(shared, tl.sum(tl.where(t == hi[None, :], d_p2c, 0.0), 0), 0.0)
        owned = (t >= lo[None, :]) & (t <= hi[None, :] - shared.to(tl.int32)[None, :])
        tl.store(
            slot_rows + cols.to(tl.int64)[None, :] * ROWS + (s_lo + t), d_p2c.to(DP2C.dtype.element_ty),
            mask=owned & col_ok[None, :] & (s_lo + t < ROWS),
        )
    tl.store(DK_ACC + base + cols[:, None] * stride_l + offs_d[None, :], dk, mask=col_ok[:, None])
    tl.store(DV_ACC + base + cols[:, None] * stride_l + offs_d[None, :], dv, mask=col_ok[:, None])


# ---------------------------------------------------------------------------------------
# Far kernels: flash-attention backward with a rank-1 bias
# ---------------------------------------------------------------------------------------


@triton.jit
def _far_dq_boundary(
    dq, g_hi, g_lo, q, do, lse, delta, K, V, EDGE_K, base, row_base, j0, offs_m, offs_n, offs_d, n_len, stride_l,
    c2p_lo, c2p_hi, far_lo, far_hi, row_valid, MASK, mask_base, sm_scale, seed, zh, rng_len, dropout_p,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """A key tile that holds band pairs too: only its far pairs count here."""
    cols = j0 + offs_n
    col_ok = cols < n_len
    p2c_lo = tl.load(EDGE_K + (row_base + cols) * 2, mask=col_ok, other=0.0)
    p2c_hi = tl.load(EDGE_K + (row_base + cols) * 2 + 1, mask=col_ok, other=0.0)
    distance = offs_m[:, None] - cols[None, :]
    hi = distance >= far_hi
    lo = distance <= far_lo
    bias = tl.where(hi, c2p_hi[:, None] + p2c_hi[None, :], c2p_lo[:, None] + p2c_lo[None, :])
    k = load_rows(K, base, cols, n_len, stride_l, offs_d)
    dq, g = _dq_pairs(
        dq, q, do, lse, delta, k, V, base, j0, offs_m, offs_n, offs_d, n_len, stride_l, bias, hi | lo,
        row_valid, MASK, mask_base, sm_scale, seed, zh, rng_len, dropout_p,
        HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, True,
    )
    return dq, g_hi + tl.sum(tl.where(hi, g, 0.0), 1), g_lo + tl.sum(tl.where(lo, g, 0.0), 1)


@triton.jit(do_not_specialize=["row_stride_z", "row_stride_h", "seq_len", "seed", "rng_len", "head_stride_h"])
def far_dq_kernel(
    Q, K, V, KR, EDGE_Q, EDGE_K, MASK, CU, DO, LSE, DELTA, DQ_ACC, DQ, EDGE_G,
    stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
    seq_len, num_heads, sm_scale, dropout_p, seed, rng_len, far_lo, far_hi, head_stride_z, head_stride_h,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Query block: far part of dq added to the band part, stored; per-row far score-gradient sums to ``EDGE_G``."""
    pid_m, zh, z, h = _program_block(seq_len, num_heads, BLOCK_M)
    start, n_len = sequence_span(CU, z, seq_len, VARLEN)
    i0 = pid_m * BLOCK_M
    if i0 >= n_len:
        return
    base = z.to(tl.int64) * stride_z + h.to(tl.int64) * stride_h + start.to(tl.int64) * stride_l
    row_base = z.to(tl.int64) * row_stride_z + h.to(tl.int64) * row_stride_h + start
    mask_base = z.to(tl.int64) * seq_len
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_len
    tile = base + offs_m[:, None] * stride_l + offs_d[None, :]
    q = tl.load(Q + tile, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + tile, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    c2p_lo = tl.load(EDGE_Q + (row_base + offs_m) * 2, mask=row_ok, other=0.0)
    c2p_hi = tl.load(EDGE_Q + (row_base + offs_m) * 2 + 1, mask=row_ok, other=0.0)
    row_valid = row_ok
    if HAS_MASK:
        row_valid = tl.load(MASK + mask_base + offs_m, mask=row_ok, other=0) != 0

    dq = tl.load(DQ_ACC + tile, mask=row_ok[:, None], other=0.0)
    g_hi = tl.zeros([BLOCK_M], dtype=tl.float32)
    g_lo = tl.zeros([BLOCK_M], dtype=tl.float32)
    a, b, c, d, n_kb = _key_tile_ranges(i0, n_len, far_lo, far_hi, BLOCK_M, BLOCK_N)
    for kb in range(0, a):  # every pair has the last slot
        j0 = kb * BLOCK_N
        p2c = tl.load(EDGE_K + (row_base + j0 + offs_n) * 2 + 1, mask=j0 + offs_n < n_len, other=0.0)
        k = load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        dq, g = _dq_pairs(
            dq, q, do, lse, delta, k, V, base, j0, offs_m, offs_n, offs_d, n_len, stride_l,
            c2p_hi[:, None] + p2c[None, :], 0, row_valid, MASK, mask_base, sm_scale, seed, zh, rng_len, dropout_p,
            HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, False,
        )
        g_hi += tl.sum(g, 1)
    for kb in range(a, b):
        dq, g_hi, g_lo = _far_dq_boundary(
            dq, g_hi, g_lo, q, do, lse, delta, K, V, EDGE_K, base, row_base, kb * BLOCK_N, offs_m, offs_n, offs_d,
            n_len, stride_l, c2p_lo, c2p_hi, far_lo, far_hi, row_valid, MASK, mask_base, sm_scale, seed, zh,
            rng_len, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
    for kb in range(c, d):
        dq, g_hi, g_lo = _far_dq_boundary(
            dq, g_hi, g_lo, q, do, lse, delta, K, V, EDGE_K, base, row_base, kb * BLOCK_N, offs_m, offs_n, offs_d,
            n_len, stride_l, c2p_lo, c2p_hi, far_lo, far_hi, row_valid, MASK, mask_base, sm_scale, seed, zh,
            rng_len, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
    for kb in range(d, n_kb):  # every pair has slot 0
        j0 = kb * BLOCK_N
        p2c = tl.load(EDGE_K + (row_base + j0 + offs_n) * 2, mask=j0 + offs_n < n_len, other=0.0)
        k = load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        dq, g = _dq_pairs(
            dq, q, do, lse, delta, k, V, base, j0, offs_m, offs_n, offs_d, n_len, stride_l,
            c2p_lo[:, None] + p2c[None, :], 0, row_valid, MASK, mask_base, sm_scale, seed, zh, rng_len, dropout_p,
            HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, False,
        )
        g_lo += tl.sum(g, 1)

    kr = KR + h * (ROWS * HEAD_DIM)
    kr_lo = tl.load(kr + offs_d).to(tl.float32)
    kr_hi = tl.load(kr + (ROWS - 1) * HEAD_DIM + offs_d).to(tl.float32)
    dq += g_hi[:, None] * kr_hi[None, :] + g_lo[:, None] * kr_lo[None, :]
    tl.store(DQ + tile, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
    edge = EDGE_G + (h.to(tl.int64) * head_stride_h + z.to(tl.int64) * head_stride_z + start + offs_m) * 2
    tl.store(edge, g_lo, mask=row_ok)
    tl.store(edge + 1, g_hi, mask=row_ok)


@triton.jit
def _far_dkv_boundary(
    dk, dv, g_hi, g_lo, k, v, Q, DO, LSE, DELTA, EDGE_Q, MASK, base, row_base, mask_base, i0, offs_m, offs_d,
    j0, cols, col_ok, key_valid, n_len, stride_l, p2c_lo, p2c_hi, far_lo, far_hi, sm_scale, seed, zh, rng_len,
    dropout_p, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """A query tile that holds band pairs too: only its far pairs count here."""
    rows = i0 + offs_m
    row_ok = rows < n_len
    c2p_lo = tl.load(EDGE_Q + (row_base + rows) * 2, mask=row_ok, other=0.0)
    c2p_hi = tl.load(EDGE_Q + (row_base + rows) * 2 + 1, mask=row_ok, other=0.0)
    distance = rows[:, None] - cols[None, :]
    hi = distance >= far_hi
    lo = distance <= far_lo
    bias = tl.where(hi, c2p_hi[:, None] + p2c_hi[None, :], c2p_lo[:, None] + p2c_lo[None, :])
    q = load_rows(Q, base, rows, n_len, stride_l, offs_d)
    dk, dv, g = _dkv_pairs(
        dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m, offs_d,
        j0, col_ok, key_valid, n_len, stride_l, bias, hi | lo, sm_scale, seed, zh, rng_len, dropout_p,
        HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, True,
    )
    return dk, dv, g_hi + tl.sum(tl.where(hi, g, 0.0), 0), g_lo + tl.sum(tl.where(lo, g, 0.0), 0)


@triton.jit(do_not_specialize=["row_stride_z", "row_stride_h", "seq_len", "seed", "rng_len", "head_stride_h"])
def far_dkv_kernel(
    Q, K, V, QR, EDGE_Q, EDGE_K, MASK, CU, DO, LSE, DELTA, DK_ACC, DV_ACC, DK, DV, EDGE_G,
    stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
    seq_len, num_heads, sm_scale, dropout_p, seed, rng_len, far_lo, far_hi, head_stride_z, head_stride_h,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Key block: far part of dk, dv added to the band part, stored; per-column far sums to ``EDGE_G``."""
    pid_n, zh, z, h = _program_block(seq_len, num_heads, BLOCK_N)
    start, n_len = sequence_span(CU, z, seq_len, VARLEN)
    j0 = pid_n * BLOCK_N
    if j0 >= n_len:
        return
    base = z.to(tl.int64) * stride_z + h.to(tl.int64) * stride_h + start.to(tl.int64) * stride_l
    row_base = z.to(tl.int64) * row_stride_z + h.to(tl.int64) * row_stride_h + start
    mask_base = z.to(tl.int64) * seq_len
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = j0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_len
    tile = base + cols[:, None] * stride_l + offs_d[None, :]
    k = tl.load(K + tile, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + tile, mask=col_ok[:, None], other=0.0)
    p2c_lo = tl.load(EDGE_K + (row_base + cols) * 2, mask=col_ok, other=0.0)
    p2c_hi = tl.load(EDGE_K + (row_base + cols) * 2 + 1, mask=col_ok, other=0.0)
    key_valid = col_ok
    if HAS_MASK:
        key_valid = tl.load(MASK + mask_base + cols, mask=col_ok, other=0) != 0

    dk = tl.load(DK_ACC + tile, mask=col_ok[:, None], other=0.0)
    dv = tl.load(DV_ACC + tile, mask=col_ok[:, None], other=0.0)
    g_hi = tl.zeros([BLOCK_N], dtype=tl.float32)
    g_lo = tl.zeros([BLOCK_N], dtype=tl.float32)
    a, b, c, d, n_qb = _query_tile_ranges(j0, n_len, far_lo, far_hi, BLOCK_M, BLOCK_N)
    for qb in range(0, a):  # every pair has slot 0
        i0 = qb * BLOCK_M
        c2p = tl.load(EDGE_Q + (row_base + i0 + offs_m) * 2, mask=i0 + offs_m < n_len, other=0.0)
        q = load_rows(Q, base, i0 + offs_m, n_len, stride_l, offs_d)
        dk, dv, g = _dkv_pairs(
            dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m, offs_d,
            j0, col_ok, key_valid, n_len, stride_l, c2p[:, None] + p2c_lo[None, :], 0, sm_scale, seed, zh, rng_len,
            dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, False,
        )
        g_lo += tl.sum(g, 0)
    for qb in range(a, b):
        dk, dv, g_hi, g_lo = _far_dkv_boundary(
            dk, dv, g_hi, g_lo, k, v, Q, DO, LSE, DELTA, EDGE_Q, MASK, base, row_base, mask_base, qb * BLOCK_M,
            offs_m, offs_d, j0, cols, col_ok, key_valid, n_len, stride_l, p2c_lo, p2c_hi, far_lo, far_hi, sm_scale,
            seed, zh, rng_len, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
    for qb in range(c, d):
        dk, dv, g_hi, g_lo = _far_dkv_boundary(
            dk, dv, g_hi, g_lo, k, v, Q, DO, LSE, DELTA, EDGE_Q, MASK, base, row_base, mask_base, qb * BLOCK_M,
            offs_m, offs_d, j0, cols, col_ok, key_valid, n_len, stride_l, p2c_lo, p2c_hi, far_lo, far_hi, sm_scale,
            seed, zh, rng_len, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
    for qb in range(d, n_qb):  # every pair has the last slot
        i0 = qb * BLOCK_M
        c2p = tl.load(EDGE_Q + (row_base + i0 + offs_m) * 2 + 1, mask=i0 + offs_m < n_len, other=0.0)
        q = load_rows(Q, base, i0 + offs_m, n_len, stride_l, offs_d)
        dk, dv, g = _dkv_pairs(
            dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m, offs_d,
            j0, col_ok, key_valid, n_len, stride_l, c2p[:, None] + p2c_hi[None, :], 0, sm_scale, seed, zh, rng_len,
            dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N, False,
        )
        g_hi += tl.sum(g, 0)

    qr = QR + h * (ROWS * HEAD_DIM)
    qr_lo = tl.load(qr + offs_d).to(tl.float32)
    qr_hi = tl.load(qr + (ROWS - 1) * HEAD_DIM + offs_d).to(tl.float32)
    dk += g_hi[:, None] * qr_hi[None, :] + g_lo[:, None] * qr_lo[None, :]
    tl.store(DK + tile, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])
    edge = EDGE_G + (h.to(tl.int64) * head_stride_h + z.to(tl.int64) * head_stride_z + start + cols) * 2
    tl.store(edge, g_lo, mask=col_ok)
    tl.store(edge + 1, g_hi, mask=col_ok)
