"""The backward kernels that own slot-space partial slices: a dQ pass and a dK/dV pass.

``G = dS * scale`` is the gradient of every score term. The dQ pass owns query rows (dq and,
reduced into slot space row by row, the c2p gradient: ``dq += dC2P @ Kr[band]``,
``dKr[band] += dC2P^T @ q``); the dK/dV pass owns key columns (dk, dv, p2c by columns). Each
program adds its relative-table gradient into its own ``[2k, D]`` fp32 slice (a
read-modify-write per band tile, ordered by a barrier); the host sums the slices in a fixed
order: deterministic, no atomics. Far tiles add only rank-one edge updates.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.tiles import (
    add_to_band,
    add_to_row,
    band_bias,
    band_index,
    cols_to_slots,
    keep_mask,
    load_band,
    load_gradient_rows,
    load_key_tile,
    load_rows,
    masked_log2_scores,
    rows_to_slots,
    sequence_span,
)

# ---------------------------------------------------------------------------------------
# Backward: shared tile math
# ---------------------------------------------------------------------------------------


@triton.jit
def tile_grad(
    q, k, v, do, lse, delta, bias, col_ok, row_valid, key_valid, sm_scale,
    seed, rng_stream, rng_len, rows, j0, dropout_p,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Recompute P of one tile and return (G = dS * scale, P after dropout) in fp32."""
    qk_scale = sm_scale * 1.4426950408889634
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) + bias
    s2 = masked_log2_scores(s, qk_scale, col_ok, row_valid, key_valid, HAS_MASK)
    p = tl.exp2(s2 - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = keep_mask(seed, rng_stream, rows, j0, rng_len, dropout_p, BLOCK_M, BLOCK_N)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        p_dropped = tl.where(keep, p / (1.0 - dropout_p), 0.0)
    else:
        p_dropped = p
    g = p * (dp - delta[:, None]) * sm_scale
    if HAS_MASK:
        # A padding row's uniform weights come from constant (masked) scores: no gradient.
        g = tl.where(row_valid[:, None] & key_valid[None, :], g, 0.0)
    return g, p_dropped


# ---------------------------------------------------------------------------------------
# Backward, dQ pass: owns query rows -> dq and this block's share of d(rel_key)
# ---------------------------------------------------------------------------------------


@triton.jit
def dq_tile(
    dq, q, do, lse, delta, k, V, base, j0, offs_n, offs_d, n_len, stride_l, bias,
    row_valid, MASK, mask_base, sm_scale, seed, rng_stream, rng_len, offs_m, dropout_p,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = j0 + offs_n
    v, col_ok, key_valid = load_key_tile(V, MASK, base, mask_base, cols, offs_d, n_len, stride_l, HAS_MASK)
    g, _ = tile_grad(
        q, k, v, do, lse, delta, bias, col_ok, row_valid, key_valid, sm_scale,
        seed, rng_stream, rng_len, offs_m, j0, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
    )
    dq += tl.dot(g.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq, g


@triton.jit
def _bwd_dq_block(
    Q, K, V, KR, QR, EDGE_Q, EDGE_K, MASK, SLOT, FIRST, LAST, DO, LSE, DELTA, DQ, part, z, h, pid_m, start, n_len,
    stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
    seq_len, num_heads, sm_scale, dropout_p, seed, rng_len,
    max_distance, exact_lo, exact_hi, far_lo, far_hi,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BAND: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One query block (sequence z, head h, rows from ``start``): dq, and d(rel_key) added into ``part``."""
    i0 = pid_m * BLOCK_M
    zh = z * num_heads + h
    base = z.to(tl.int64) * stride_z + h.to(tl.int64) * stride_h + start.to(tl.int64) * stride_l
    row_base = z.to(tl.int64) * row_stride_z + h.to(tl.int64) * row_stride_h + start
    mask_base = z.to(tl.int64) * seq_len
    rng_stream = zh
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_len
    q = tl.load(Q + base + offs_m[:, None] * stride_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + base + offs_m[:, None] * stride_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    c2p_lo = tl.load(EDGE_Q + (row_base + offs_m) * 2, mask=row_ok, other=0.0)
    c2p_hi = tl.load(EDGE_Q + (row_base + offs_m) * 2 + 1, mask=row_ok, other=0.0)
    row_valid = row_ok
    if HAS_MASK:
        row_valid = tl.load(MASK + mask_base + offs_m, mask=row_ok, other=0) != 0
    kr = KR + h * (ROWS * HEAD_DIM)
    qr = QR + h * (ROWS * HEAD_DIM)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    g_hi = tl.zeros([BLOCK_M], dtype=tl.float32)
    g_lo = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_kb = tl.cdiv(n_len, BLOCK_N)
    kb_band = tl.minimum(tl.maximum(i0 + 1 - far_hi, 0) // BLOCK_N, n_kb)
    kb_far_lo = tl.minimum(tl.maximum((i0 + BLOCK_M - 1 - far_lo + BLOCK_N - 1) // BLOCK_N, kb_band), n_kb)

    for kb in range(0, kb_band):
        j0 = kb * BLOCK_N
        p2c = tl.load(EDGE_K + (row_base + j0 + offs_n) * 2 + 1, mask=j0 + offs_n < n_len, other=0.0)
        k = load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        dq, g = dq_tile(
            dq, q, do, lse, delta, k, V, base, j0, offs_n, offs_d, n_len, stride_l,
            c2p_hi[:, None] + p2c[None, :], row_valid, MASK, mask_base, sm_scale, seed, rng_stream, rng_len,
            offs_m, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
        g_hi += tl.sum(g, 1)
    for kb in range(kb_band, kb_far_lo):
        j0 = kb * BLOCK_N
        s_lo, is_shift, index = band_index(i0, j0, SLOT, max_distance, exact_lo, exact_hi, BLOCK_M, BLOCK_N)
        k = load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        kr_band = load_band(kr, s_lo, offs_d, ROWS, HEAD_DIM, BAND)
        bias = band_bias(q, k, kr_band, load_band(qr, s_lo, offs_d, ROWS, HEAD_DIM, BAND), index, DOT_PRECISION)
        dq, g = dq_tile(
            dq, q, do, lse, delta, k, V, base, j0, offs_n, offs_d, n_len, stride_l, bias,
            row_valid, MASK, mask_base, sm_scale, seed, rng_stream, rng_len, offs_m, dropout_p,
            HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
        d_c2p = rows_to_slots(g, i0, j0, s_lo, is_shift, FIRST, LAST, ROWS, BLOCK_M, BLOCK_N, BAND)
        dq += tl.dot(d_c2p.to(q.dtype), kr_band, input_precision=DOT_PRECISION)
        d_kr = tl.dot(tl.trans(d_c2p.to(q.dtype)), q, input_precision=DOT_PRECISION)
        add_to_band(part, s_lo, offs_d, d_kr, ROWS, HEAD_DIM, BAND)
    for kb in range(kb_far_lo, n_kb):
        j0 = kb * BLOCK_N
        p2c = tl.load(EDGE_K + (row_base + j0 + offs_n) * 2, mask=j0 + offs_n < n_len, other=0.0)
        k = load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        dq, g = dq_tile(
            dq, q, do, lse, delta, k, V, base, j0, offs_n, offs_d, n_len, stride_l,
            c2p_lo[:, None] + p2c[None, :], row_valid, MASK, mask_base, sm_scale, seed, rng_stream, rng_len,
            offs_m, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
        g_lo += tl.sum(g, 1)

    # Far tiles touch only the edge slots: rank-one updates from the per-row sums.
    kr_lo = tl.load(kr + offs_d).to(tl.float32)
    kr_hi = tl.load(kr + (ROWS - 1) * HEAD_DIM + offs_d).to(tl.float32)
    dq += g_hi[:, None] * kr_hi[None, :] + g_lo[:, None] * kr_lo[None, :]
    q32 = q.to(tl.float32)
    add_to_row(part, ROWS - 1, offs_d, tl.sum(g_hi[:, None] * q32, 0), HEAD_DIM)
    add_to_row(part, 0, offs_d, tl.sum(g_lo[:, None] * q32, 0), HEAD_DIM)
    tl.store(DQ + base + offs_m[:, None] * stride_l + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------
# Backward, dK/dV pass: owns key columns -> dk, dv and this block's share of d(rel_query)
# ---------------------------------------------------------------------------------------


@triton.jit
def dkv_tile(
    dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m_local, offs_d,
    j0, cols, col_ok, key_valid, n_len, stride_l, bias, sm_scale, seed, rng_stream, rng_len, dropout_p,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = i0 + offs_m_local
    do, lse, delta, row_valid = load_gradient_rows(DO, LSE, DELTA, MASK, base, row_base, mask_base, rows, offs_d, n_len,
                                                   stride_l, HAS_MASK)
    g, p_dropped = tile_grad(
        q, k, v, do, lse, delta, bias, col_ok, row_valid, key_valid, sm_scale,
        seed, rng_stream, rng_len, rows, j0, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
    )
    dv += tl.dot(tl.trans(p_dropped.to(do.dtype)), do, input_precision=DOT_PRECISION)
    dk += tl.dot(tl.trans(g.to(q.dtype)), q, input_precision=DOT_PRECISION)
    return dk, dv, g


@triton.jit
def _bwd_dkv_block(
    Q, K, V, KR, QR, EDGE_Q, EDGE_K, MASK, SLOT, FIRST, LAST, DO, LSE, DELTA, DK, DV, part, z, h, pid_n, start, n_len,
    stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
    seq_len, num_heads, sm_scale, dropout_p, seed, rng_len,
    max_distance, exact_lo, exact_hi, far_lo, far_hi,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BAND: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One key block (sequence z, head h, rows from ``start``): dk, dv, and d(rel_query) added into ``part``."""
    j0 = pid_n * BLOCK_N
    zh = z * num_heads + h
    base = z.to(tl.int64) * stride_z + h.to(tl.int64) * stride_h + start.to(tl.int64) * stride_l
    row_base = z.to(tl.int64) * row_stride_z + h.to(tl.int64) * row_stride_h + start
    mask_base = z.to(tl.int64) * seq_len
    rng_stream = zh
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    cols = j0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_len
    k = tl.load(K + base + cols[:, None] * stride_l + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + base + cols[:, None] * stride_l + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    p2c_lo = tl.load(EDGE_K + (row_base + cols) * 2, mask=col_ok, other=0.0)
    p2c_hi = tl.load(EDGE_K + (row_base + cols) * 2 + 1, mask=col_ok, other=0.0)
    key_valid = col_ok
    if HAS_MASK:
        key_valid = tl.load(MASK + mask_base + cols, mask=col_ok, other=0) != 0
    kr = KR + h * (ROWS * HEAD_DIM)
    qr = QR + h * (ROWS * HEAD_DIM)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    g_hi = tl.zeros([BLOCK_N], dtype=tl.float32)
    g_lo = tl.zeros([BLOCK_N], dtype=tl.float32)
    # Query tiles in order of increasing distance: far (slot 0), band, far (last slot).
    n_qb = tl.cdiv(n_len, BLOCK_M)
    qb_band = tl.minimum(tl.maximum(j0 + far_lo + 1, 0) // BLOCK_M, n_qb)
    qb_far_hi = tl.minimum(tl.maximum((j0 + BLOCK_N - 1 + far_hi + BLOCK_M - 1) // BLOCK_M, qb_band), n_qb)

    for qb in range(0, qb_band):
        i0 = qb * BLOCK_M
        c2p = tl.load(EDGE_Q + (row_base + i0 + offs_m) * 2, mask=i0 + offs_m < n_len, other=0.0)
        q = load_rows(Q, base, i0 + offs_m, n_len, stride_l, offs_d)
        dk, dv, g = dkv_tile(
            dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m, offs_d,
            j0, cols, col_ok, key_valid, n_len, stride_l, c2p[:, None] + p2c_lo[None, :], sm_scale,
            seed, rng_stream, rng_len, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
        g_lo += tl.sum(g, 0)
    for qb in range(qb_band, qb_far_hi):
        i0 = qb * BLOCK_M
        s_lo, is_shift, index = band_index(i0, j0, SLOT, max_distance, exact_lo, exact_hi, BLOCK_M, BLOCK_N)
        q = load_rows(Q, base, i0 + offs_m, n_len, stride_l, offs_d)
        qr_band = load_band(qr, s_lo, offs_d, ROWS, HEAD_DIM, BAND)
        bias = band_bias(q, k, load_band(kr, s_lo, offs_d, ROWS, HEAD_DIM, BAND), qr_band, index, DOT_PRECISION)
        dk, dv, g = dkv_tile(
            dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m, offs_d,
            j0, cols, col_ok, key_valid, n_len, stride_l, bias, sm_scale,
            seed, rng_stream, rng_len, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
        d_p2c = cols_to_slots(g, i0, j0, s_lo, is_shift, FIRST, LAST, ROWS, BLOCK_M, BLOCK_N, BAND)
        dk += tl.dot(tl.trans(d_p2c.to(k.dtype)), qr_band, input_precision=DOT_PRECISION)
        d_qr = tl.dot(d_p2c.to(k.dtype), k, input_precision=DOT_PRECISION)
        add_to_band(part, s_lo, offs_d, d_qr, ROWS, HEAD_DIM, BAND)
    for qb in range(qb_far_hi, n_qb):
        i0 = qb * BLOCK_M
        c2p = tl.load(EDGE_Q + (row_base + i0 + offs_m) * 2 + 1, mask=i0 + offs_m < n_len, other=0.0)
        q = load_rows(Q, base, i0 + offs_m, n_len, stride_l, offs_d)
        dk, dv, g = dkv_tile(
            dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m, offs_d,
            j0, cols, col_ok, key_valid, n_len, stride_l, c2p[:, None] + p2c_hi[None, :], sm_scale,
            seed, rng_stream, rng_len, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
        g_hi += tl.sum(g, 0)

    qr_lo = tl.load(qr + offs_d).to(tl.float32)
    qr_hi = tl.load(qr + (ROWS - 1) * HEAD_DIM + offs_d).to(tl.float32)
    dk += g_hi[:, None] * qr_hi[None, :] + g_lo[:, None] * qr_lo[None, :]
    k32 = k.to(tl.float32)
    add_to_row(part, ROWS - 1, offs_d, tl.sum(g_hi[:, None] * k32, 0), HEAD_DIM)
    add_to_row(part, 0, offs_d, tl.sum(g_lo[:, None] * k32, 0), HEAD_DIM)
    tl.store(DK + base + cols[:, None] * stride_l + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + base + cols[:, None] * stride_l + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# The backward grids are (programs per head, heads). Program p of head h walks a contiguous
# run of (sequence, block) items and adds its relative-table gradient into its own partial
# slice; the number of slices (hence their memory) is fixed by the grid, not by the tokens.


@triton.jit
def _item_range(items):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    return (pid * items) // programs, ((pid + 1) * items) // programs


@triton.jit(do_not_specialize=["row_stride_z", "row_stride_h", "seq_len", "seed", "rng_len", "items", "blocks"])
def backward_dq_kernel(
    Q, K, V, KR, QR, EDGE_Q, EDGE_K, MASK, CU, SLOT, FIRST, LAST, DO, LSE, DELTA, DQ, DKR_PART,
    stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
    seq_len, num_heads, sm_scale, dropout_p, seed, rng_len,
    max_distance, exact_lo, exact_hi, far_lo, far_hi, items, blocks,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BAND: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    h = tl.program_id(1)
    part = DKR_PART + (h.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * (ROWS * HEAD_DIM)
    first, last = _item_range(items)
    for item in range(first, last):
        z = item // blocks
        block = item % blocks
        start, n_len = sequence_span(CU, z, seq_len, VARLEN)
        if block * BLOCK_M < n_len:  # packed sequences shorter than the longest have fewer blocks
            _bwd_dq_block(
                Q, K, V, KR, QR, EDGE_Q, EDGE_K, MASK, SLOT, FIRST, LAST, DO, LSE, DELTA, DQ, part,
                z, h, block, start, n_len,
                stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
                seq_len, num_heads, sm_scale, dropout_p, seed, rng_len,
                max_distance, exact_lo, exact_hi, far_lo, far_hi,
                ROWS, HEAD_DIM, BLOCK_M, BLOCK_N, BAND, VARLEN, HAS_MASK, DROPOUT, DOT_PRECISION,
            )


@triton.jit(do_not_specialize=["row_stride_z", "row_stride_h", "seq_len", "seed", "rng_len", "items", "blocks"])
def backward_dkv_kernel(
    Q, K, V, KR, QR, EDGE_Q, EDGE_K, MASK, CU, SLOT, FIRST, LAST, DO, LSE, DELTA, DK, DV, DQR_PART,
    stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
    seq_len, num_heads, sm_scale, dropout_p, seed, rng_len,
    max_distance, exact_lo, exact_hi, far_lo, far_hi, items, blocks,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BAND: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    h = tl.program_id(1)
    part = DQR_PART + (h.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)) * (ROWS * HEAD_DIM)
    first, last = _item_range(items)
    for item in range(first, last):
        z = item // blocks
        block = item % blocks
        start, n_len = sequence_span(CU, z, seq_len, VARLEN)
        if block * BLOCK_N < n_len:  # packed sequences shorter than the longest have fewer blocks
            _bwd_dkv_block(
                Q, K, V, KR, QR, EDGE_Q, EDGE_K, MASK, SLOT, FIRST, LAST, DO, LSE, DELTA, DK, DV, part,
                z, h, block, start, n_len,
                stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
                seq_len, num_heads, sm_scale, dropout_p, seed, rng_len,
                max_distance, exact_lo, exact_hi, far_lo, far_hi,
                ROWS, HEAD_DIM, BLOCK_M, BLOCK_N, BAND, VARLEN, HAS_MASK, DROPOUT, DOT_PRECISION,
            )
