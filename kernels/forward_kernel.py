"""The forward kernel: one program per (query block, sequence, head), online softmax in base 2.

It walks the key tiles of its query block in order of decreasing distance: far tiles whose
every pair maps to the last slot (c2p a per-row vector, p2c a per-column vector, both
precomputed: plain flash attention with a rank-1 bias), band tiles (``q @ Kr[band]^T`` and
``Qr[band] @ k^T`` on the tensor cores, then a gather by slot), and far tiles of slot 0. It
saves ``O`` and the row log-sum-exp (base 2) for the backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.tiles import (
    band_bias,
    band_index,
    keep_mask,
    load_band,
    load_key_tile,
    load_rows,
    masked_log2_scores,
    sequence_span,
)


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, k, V, kv_base, j0, offs_n, offs_d, n_len, stride_l, bias,
    row_valid, MASK, mask_base, qk_scale, seed, rng_stream, rng_len, offs_m, dropout_p,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = j0 + offs_n
    v, col_ok, key_valid = load_key_tile(V, MASK, kv_base, mask_base, cols, offs_d, n_len, stride_l, HAS_MASK)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) + bias
    s2 = masked_log2_scores(s, qk_scale, col_ok, row_valid, key_valid, HAS_MASK)
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = keep_mask(seed, rng_stream, offs_m, j0, rng_len, dropout_p, BLOCK_M, BLOCK_N)
        p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["row_stride_z", "row_stride_h", "seq_len", "seed", "rng_len"])
def forward_kernel(
    Q, K, V, KR, QR, EDGE_Q, EDGE_K, MASK, CU, SLOT, OUT, LSE,
    stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
    seq_len, num_heads, sm_scale, dropout_p, seed, rng_len,
    max_distance, exact_lo, exact_hi, far_lo, far_hi,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BAND: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One grid axis: (sequence x head) blocks of query rows can outnumber the 65,535 a second axis allows.
    q_blocks = tl.cdiv(seq_len, BLOCK_M)
    pid_m = tl.program_id(0) % q_blocks
    zh = tl.program_id(0) // q_blocks
    z = zh // num_heads
    h = zh % num_heads
    start, n_len = sequence_span(CU, z, seq_len, VARLEN)
    i0 = pid_m * BLOCK_M
    if i0 >= n_len:
        return
    qk_scale = sm_scale * 1.4426950408889634

    base = z.to(tl.int64) * stride_z + h.to(tl.int64) * stride_h + start.to(tl.int64) * stride_l
    row_base = z.to(tl.int64) * row_stride_z + h.to(tl.int64) * row_stride_h + start
    mask_base = z.to(tl.int64) * seq_len
    rng_stream = zh
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_len
    q = tl.load(Q + base + offs_m[:, None] * stride_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    c2p_lo = tl.load(EDGE_Q + (row_base + offs_m) * 2, mask=row_ok, other=0.0)
    c2p_hi = tl.load(EDGE_Q + (row_base + offs_m) * 2 + 1, mask=row_ok, other=0.0)
    row_valid = row_ok
    if HAS_MASK:
        row_valid = tl.load(MASK + mask_base + offs_m, mask=row_ok, other=0) != 0
    kr = KR + h * (ROWS * HEAD_DIM)
    qr = QR + h * (ROWS * HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Key tiles in order of decreasing distance: far (last slot), band, far (slot 0).
    n_kb = tl.cdiv(n_len, BLOCK_N)
    kb_band = tl.minimum(tl.maximum(i0 + 1 - far_hi, 0) // BLOCK_N, n_kb)
    kb_far_lo = tl.minimum(tl.maximum((i0 + BLOCK_M - 1 - far_lo + BLOCK_N - 1) // BLOCK_N, kb_band), n_kb)

    for kb in range(0, kb_band):
        j0 = kb * BLOCK_N
        p2c = tl.load(EDGE_K + (row_base + j0 + offs_n) * 2 + 1, mask=j0 + offs_n < n_len, other=0.0)
        bias = c2p_hi[:, None] + p2c[None, :]
        k = load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k, V, base, j0, offs_n, offs_d, n_len, stride_l, bias,
            row_valid, MASK, mask_base, qk_scale, seed, rng_stream, rng_len, offs_m, dropout_p,
            HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
    for kb in range(kb_band, kb_far_lo):
        j0 = kb * BLOCK_N
        s_lo, is_shift, index = band_index(i0, j0, SLOT, max_distance, exact_lo, exact_hi, BLOCK_M, BLOCK_N)
        k = load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        bias = band_bias(
            q, k, load_band(kr, s_lo, offs_d, ROWS, HEAD_DIM, BAND), load_band(qr, s_lo, offs_d, ROWS, HEAD_DIM, BAND),
            index, DOT_PRECISION,
        )
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k, V, base, j0, offs_n, offs_d, n_len, stride_l, bias,
            row_valid, MASK, mask_base, qk_scale, seed, rng_stream, rng_len, offs_m, dropout_p,
            HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )
    for kb in range(kb_far_lo, n_kb):
        j0 = kb * BLOCK_N
        p2c = tl.load(EDGE_K + (row_base + j0 + offs_n) * 2, mask=j0 + offs_n < n_len, other=0.0)
        bias = c2p_lo[:, None] + p2c[None, :]
        k = load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k, V, base, j0, offs_n, offs_d, n_len, stride_l, bias,
            row_valid, MASK, mask_base, qk_scale, seed, rng_stream, rng_len, offs_m, dropout_p,
            HAS_MASK, DROPOUT, DOT_PRECISION, BLOCK_M, BLOCK_N,
        )

    out = acc / l_i[:, None]
    tl.store(OUT + base + offs_m[:, None] * stride_l + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + row_base + offs_m, m_i + tl.log2(l_i), mask=row_ok)
