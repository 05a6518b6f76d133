"""Fused Triton disentangled attention: forward, backward (dQ pass, dK/dV pass), dropout, varlen.

The math is the reference's (``kernels/reference.py``)::

    S[i, j] = (q_i . k_j + q_i . Kr[s(i - j)] + k_j . Qr[s(i - j)]) * scale     (+ mask)
    O = dropout(softmax(S)) V

computed flash-style: one program owns a block of query rows (forward, dQ pass) or of key
columns (dK/dV pass) and walks the other axis tile by tile with an online softmax, so no
``[L, L]`` tensor exists. The forward saves only ``O`` and the row log-sum-exp (base 2).

Relative terms, tile by tile. The distances of a ``BLOCK_M x BLOCK_N`` tile are
``BLOCK_M + BLOCK_N - 1`` consecutive values, so its slots form a band of at most ``BAND``
consecutive rows of ``Kr``/``Qr`` (``SlotGeometry.band_width``). Walking the key tiles of a
query block in order meets three kinds of tile:

* far tiles, where every distance maps to the same edge slot: c2p is a per-row vector and
  p2c a per-column vector (precomputed ``q . Kr[edge]``, ``k . Qr[edge]``); no gather;
* band tiles: ``q @ Kr[band]^T`` (``[M, BAND]``) and ``Qr[band] @ k^T`` (``[BAND, N]``) on the
  tensor cores, then ``tl.gather`` by the slot index of each pair. Near the diagonal the
  index is a plain shift (``a - b + N - 1``); in the log region it is read from the host's
  int32 slot table.

Backward. ``G = dS * scale`` is the gradient of every score term. The dQ pass (owning query
rows) reduces ``G`` into slot space row by row (``dC2P[a, t] = sum_b G[a, b] [slot = t]``),
then ``dq += dC2P @ Kr[band]`` and ``dKr[band] += dC2P^T @ q``; the dK/dV pass does the same by
columns for p2c. Distances of one row that share a slot are contiguous key indices, so the
reduction is a prefix-sum difference (one gather each end) in the log region and a single
gather in the exact region. Each program adds into its own ``[2k, D]`` fp32 slice of a
partial buffer (read-modify-write inside one program, ordered by a barrier); the slices
are summed afterwards in a fixed order: deterministic, no atomics.

Dropout keeps element ``(z, h, i, j)`` iff the uniform from Philox(seed; counters
``i*Lr + j``, ``z*H + h``) is ``>= p``, so backward regenerates the forward's mask from the
seed alone.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.relative_position import SlotGeometry, slot_geometry

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FUSED_HEAD_DIMS = (32, 64, 128)


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


if interpreter_active():
    from kernels import _interpreter_compat

    _interpreter_compat.apply()


# ---------------------------------------------------------------------------------------
# Device helpers shared by the kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _keep_mask(seed, zh, offs_m, offs_n, rng_len, dropout_p):
    # Philox on two 32-bit counters: (i * Lr + j, sequence * heads + head). Unique for any
    # B*H*L*L (which overflows int32 at long L) without [M, N] int64 tensors in registers.
    within = (offs_m[:, None] * rng_len + offs_n[None, :]).to(tl.uint32)
    zero = within * 0
    which = (zero + zh).to(tl.uint32)
    bits, _, _, _ = tl.random.philox(seed, within, which, zero, zero)
    return tl.random.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _masked_log2_scores(s, qk_scale, col_ok, row_valid, key_valid, HAS_MASK: tl.constexpr):
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
def _band_index(
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
def _load_band(TABLE, s_lo, offs_d, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BAND: tl.constexpr):
    rows = s_lo + tl.arange(0, BAND)
    return tl.load(TABLE + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=(rows < ROWS)[:, None], other=0.0)


@triton.jit
def _band_bias(q, k, kr_band, qr_band, index, DOT_PRECISION: tl.constexpr):
    """c2p + p2c of a band tile: dense products against the band, then gather by slot."""
    c2p_band = tl.dot(q, tl.trans(kr_band), input_precision=DOT_PRECISION)  # [M, BAND]
    p2c_band = tl.dot(qr_band, tl.trans(k), input_precision=DOT_PRECISION)  # [BAND, N]
    return tl.gather(c2p_band, index, 1) + tl.gather(p2c_band, index, 0)


@triton.jit
def _rows_to_slots(
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
def _cols_to_slots(
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
def _add_to_band(PART, s_lo, offs_d, contribution, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BAND: tl.constexpr):
    """Read-modify-write of this program's own partial slice; the barrier orders consecutive tiles."""
    rows = s_lo + tl.arange(0, BAND)
    ptrs = PART + rows[:, None] * HEAD_DIM + offs_d[None, :]
    ok = (rows < ROWS)[:, None]
    current = tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg")
    tl.store(ptrs, current + contribution, mask=ok)
    tl.debug_barrier()


@triton.jit
def _add_to_row(PART, row, offs_d, contribution, HEAD_DIM: tl.constexpr):
    ptrs = PART + row * HEAD_DIM + offs_d
    tl.store(ptrs, tl.load(ptrs, cache_modifier=".cg") + contribution)
    tl.debug_barrier()


@triton.jit
def _load_rows(PTR, base, rows, n_len, stride_l, offs_d):
    """Rows ``rows`` of one (sequence, head) slice ``[len, D]``; rows past the end read as 0."""
    return tl.load(PTR + base + rows[:, None] * stride_l + offs_d[None, :], mask=(rows < n_len)[:, None], other=0.0)


@triton.jit
def _sequence(CU, z, seq_len, VARLEN: tl.constexpr):
    """(first token, length) of sequence z: a packed slice, or the padded row of length seq_len."""
    if VARLEN:
        start = tl.load(CU + z)
        length = tl.load(CU + z + 1) - start
    else:
        start = z * 0
        length = seq_len + z * 0
    return start, length


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, k, V, kv_base, j0, offs_n, offs_d, n_len, stride_l, bias,
    row_valid, MASK, mask_base, qk_scale, seed, rng_stream, rng_len, offs_m, dropout_p,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    cols = j0 + offs_n
    col_ok = cols < n_len
    v = tl.load(V + kv_base + cols[:, None] * stride_l + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    key_valid = col_ok
    if HAS_MASK:
        key_valid = tl.load(MASK + mask_base + cols, mask=col_ok, other=0) != 0
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) + bias
    s2 = _masked_log2_scores(s, qk_scale, col_ok, row_valid, key_valid, HAS_MASK)
    m_new = tl.maximum(m_i, tl.max(s2, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _keep_mask(seed, rng_stream, offs_m, cols, rng_len, dropout_p)
        p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["row_stride_z", "row_stride_h", "seq_len", "seed", "rng_len"])
def _fwd_kernel(
    Q, K, V, KR, QR, EDGE_Q, EDGE_K, MASK, CU, SLOT, OUT, LSE,
    stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
    seq_len, num_heads, sm_scale, dropout_p, seed, rng_len,
    max_distance, exact_lo, exact_hi, far_lo, far_hi,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BAND: tl.constexpr, VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // num_heads
    h = zh % num_heads
    start, n_len = _sequence(CU, z, seq_len, VARLEN)
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
        k = _load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k, V, base, j0, offs_n, offs_d, n_len, stride_l, bias,
            row_valid, MASK, mask_base, qk_scale, seed, rng_stream, rng_len, offs_m, dropout_p,
            HAS_MASK, DROPOUT, DOT_PRECISION,
        )
    for kb in range(kb_band, kb_far_lo):
        j0 = kb * BLOCK_N
        s_lo, is_shift, index = _band_index(i0, j0, SLOT, max_distance, exact_lo, exact_hi, BLOCK_M, BLOCK_N)
        k = _load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        bias = _band_bias(
            q, k, _load_band(kr, s_lo, offs_d, ROWS, HEAD_DIM, BAND), _load_band(qr, s_lo, offs_d, ROWS, HEAD_DIM, BAND),
            index, DOT_PRECISION,
        )
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k, V, base, j0, offs_n, offs_d, n_len, stride_l, bias,
            row_valid, MASK, mask_base, qk_scale, seed, rng_stream, rng_len, offs_m, dropout_p,
            HAS_MASK, DROPOUT, DOT_PRECISION,
        )
    for kb in range(kb_far_lo, n_kb):
        j0 = kb * BLOCK_N
        p2c = tl.load(EDGE_K + (row_base + j0 + offs_n) * 2, mask=j0 + offs_n < n_len, other=0.0)
        bias = c2p_lo[:, None] + p2c[None, :]
        k = _load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, k, V, base, j0, offs_n, offs_d, n_len, stride_l, bias,
            row_valid, MASK, mask_base, qk_scale, seed, rng_stream, rng_len, offs_m, dropout_p,
            HAS_MASK, DROPOUT, DOT_PRECISION,
        )

    out = acc / l_i[:, None]
    tl.store(OUT + base + offs_m[:, None] * stride_l + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + row_base + offs_m, m_i + tl.log2(l_i), mask=row_ok)


# ---------------------------------------------------------------------------------------
# Backward: shared tile math
# ---------------------------------------------------------------------------------------


@triton.jit
def _bwd_tile_grad(
    q, k, v, do, lse, delta, bias, col_ok, row_valid, key_valid, sm_scale,
    seed, rng_stream, rng_len, rows, cols, dropout_p,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Recompute P of one tile and return (G = dS * scale, P after dropout) in fp32."""
    qk_scale = sm_scale * 1.4426950408889634
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) + bias
    s2 = _masked_log2_scores(s, qk_scale, col_ok, row_valid, key_valid, HAS_MASK)
    p = tl.exp2(s2 - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _keep_mask(seed, rng_stream, rows, cols, rng_len, dropout_p)
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
def _bwd_dq_tile(
    dq, q, do, lse, delta, k, V, base, j0, offs_n, offs_d, n_len, stride_l, bias,
    row_valid, MASK, mask_base, sm_scale, seed, rng_stream, rng_len, offs_m, dropout_p,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    cols = j0 + offs_n
    col_ok = cols < n_len
    v = tl.load(V + base + cols[:, None] * stride_l + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    key_valid = col_ok
    if HAS_MASK:
        key_valid = tl.load(MASK + mask_base + cols, mask=col_ok, other=0) != 0
    g, _ = _bwd_tile_grad(
        q, k, v, do, lse, delta, bias, col_ok, row_valid, key_valid, sm_scale,
        seed, rng_stream, rng_len, offs_m, cols, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION,
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
        k = _load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        dq, g = _bwd_dq_tile(
            dq, q, do, lse, delta, k, V, base, j0, offs_n, offs_d, n_len, stride_l,
            c2p_hi[:, None] + p2c[None, :], row_valid, MASK, mask_base, sm_scale, seed, rng_stream, rng_len,
            offs_m, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION,
        )
        g_hi += tl.sum(g, 1)
    for kb in range(kb_band, kb_far_lo):
        j0 = kb * BLOCK_N
        s_lo, is_shift, index = _band_index(i0, j0, SLOT, max_distance, exact_lo, exact_hi, BLOCK_M, BLOCK_N)
        k = _load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        kr_band = _load_band(kr, s_lo, offs_d, ROWS, HEAD_DIM, BAND)
        bias = _band_bias(q, k, kr_band, _load_band(qr, s_lo, offs_d, ROWS, HEAD_DIM, BAND), index, DOT_PRECISION)
        dq, g = _bwd_dq_tile(
            dq, q, do, lse, delta, k, V, base, j0, offs_n, offs_d, n_len, stride_l, bias,
            row_valid, MASK, mask_base, sm_scale, seed, rng_stream, rng_len, offs_m, dropout_p,
            HAS_MASK, DROPOUT, DOT_PRECISION,
        )
        d_c2p = _rows_to_slots(g, i0, j0, s_lo, is_shift, FIRST, LAST, ROWS, BLOCK_M, BLOCK_N, BAND)
        dq += tl.dot(d_c2p.to(q.dtype), kr_band, input_precision=DOT_PRECISION)
        d_kr = tl.dot(tl.trans(d_c2p.to(q.dtype)), q, input_precision=DOT_PRECISION)
        _add_to_band(part, s_lo, offs_d, d_kr, ROWS, HEAD_DIM, BAND)
    for kb in range(kb_far_lo, n_kb):
        j0 = kb * BLOCK_N
        p2c = tl.load(EDGE_K + (row_base + j0 + offs_n) * 2, mask=j0 + offs_n < n_len, other=0.0)
        k = _load_rows(K, base, j0 + offs_n, n_len, stride_l, offs_d)
        dq, g = _bwd_dq_tile(
            dq, q, do, lse, delta, k, V, base, j0, offs_n, offs_d, n_len, stride_l,
            c2p_lo[:, None] + p2c[None, :], row_valid, MASK, mask_base, sm_scale, seed, rng_stream, rng_len,
            offs_m, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION,
        )
        g_lo += tl.sum(g, 1)

    # Far tiles touch only the edge slots: rank-one updates from the per-row sums.
    kr_lo = tl.load(kr + offs_d).to(tl.float32)
    kr_hi = tl.load(kr + (ROWS - 1) * HEAD_DIM + offs_d).to(tl.float32)
    dq += g_hi[:, None] * kr_hi[None, :] + g_lo[:, None] * kr_lo[None, :]
    q32 = q.to(tl.float32)
    _add_to_row(part, ROWS - 1, offs_d, tl.sum(g_hi[:, None] * q32, 0), HEAD_DIM)
    _add_to_row(part, 0, offs_d, tl.sum(g_lo[:, None] * q32, 0), HEAD_DIM)
    tl.store(DQ + base + offs_m[:, None] * stride_l + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------
# Backward, dK/dV pass: owns key columns -> dk, dv and this block's share of d(rel_query)
# ---------------------------------------------------------------------------------------


@triton.jit
def _bwd_dkv_tile(
    dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m_local, offs_d,
    cols, col_ok, key_valid, n_len, stride_l, bias, sm_scale, seed, rng_stream, rng_len, dropout_p,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    rows = i0 + offs_m_local
    row_ok = rows < n_len
    do = tl.load(DO + base + rows[:, None] * stride_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + row_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
    row_valid = row_ok
    if HAS_MASK:
        row_valid = tl.load(MASK + mask_base + rows, mask=row_ok, other=0) != 0
    g, p_dropped = _bwd_tile_grad(
        q, k, v, do, lse, delta, bias, col_ok, row_valid, key_valid, sm_scale,
        seed, rng_stream, rng_len, rows, cols, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION,
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
        q = _load_rows(Q, base, i0 + offs_m, n_len, stride_l, offs_d)
        dk, dv, g = _bwd_dkv_tile(
            dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m, offs_d,
            cols, col_ok, key_valid, n_len, stride_l, c2p[:, None] + p2c_lo[None, :], sm_scale,
            seed, rng_stream, rng_len, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION,
        )
        g_lo += tl.sum(g, 0)
    for qb in range(qb_band, qb_far_hi):
        i0 = qb * BLOCK_M
        s_lo, is_shift, index = _band_index(i0, j0, SLOT, max_distance, exact_lo, exact_hi, BLOCK_M, BLOCK_N)
        q = _load_rows(Q, base, i0 + offs_m, n_len, stride_l, offs_d)
        qr_band = _load_band(qr, s_lo, offs_d, ROWS, HEAD_DIM, BAND)
        bias = _band_bias(q, k, _load_band(kr, s_lo, offs_d, ROWS, HEAD_DIM, BAND), qr_band, index, DOT_PRECISION)
        dk, dv, g = _bwd_dkv_tile(
            dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m, offs_d,
            cols, col_ok, key_valid, n_len, stride_l, bias, sm_scale,
            seed, rng_stream, rng_len, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION,
        )
        d_p2c = _cols_to_slots(g, i0, j0, s_lo, is_shift, FIRST, LAST, ROWS, BLOCK_M, BLOCK_N, BAND)
        dk += tl.dot(tl.trans(d_p2c.to(k.dtype)), qr_band, input_precision=DOT_PRECISION)
        d_qr = tl.dot(d_p2c.to(k.dtype), k, input_precision=DOT_PRECISION)
        _add_to_band(part, s_lo, offs_d, d_qr, ROWS, HEAD_DIM, BAND)
    for qb in range(qb_far_hi, n_qb):
        i0 = qb * BLOCK_M
        c2p = tl.load(EDGE_Q + (row_base + i0 + offs_m) * 2 + 1, mask=i0 + offs_m < n_len, other=0.0)
        q = _load_rows(Q, base, i0 + offs_m, n_len, stride_l, offs_d)
        dk, dv, g = _bwd_dkv_tile(
            dk, dv, q, k, v, DO, LSE, DELTA, MASK, base, row_base, mask_base, i0, offs_m, offs_d,
            cols, col_ok, key_valid, n_len, stride_l, c2p[:, None] + p2c_hi[None, :], sm_scale,
            seed, rng_stream, rng_len, dropout_p, HAS_MASK, DROPOUT, DOT_PRECISION,
        )
        g_hi += tl.sum(g, 0)

    qr_lo = tl.load(qr + offs_d).to(tl.float32)
    qr_hi = tl.load(qr + (ROWS - 1) * HEAD_DIM + offs_d).to(tl.float32)
    dk += g_hi[:, None] * qr_hi[None, :] + g_lo[:, None] * qr_lo[None, :]
    k32 = k.to(tl.float32)
    _add_to_row(part, ROWS - 1, offs_d, tl.sum(g_hi[:, None] * k32, 0), HEAD_DIM)
    _add_to_row(part, 0, offs_d, tl.sum(g_lo[:, None] * k32, 0), HEAD_DIM)
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
def _bwd_dq_kernel(
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
        start, n_len = _sequence(CU, z, seq_len, VARLEN)
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
def _bwd_dkv_kernel(
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
        start, n_len = _sequence(CU, z, seq_len, VARLEN)
        if block * BLOCK_N < n_len:  # packed sequences shorter than the longest have fewer blocks
            _bwd_dkv_block(
                Q, K, V, KR, QR, EDGE_Q, EDGE_K, MASK, SLOT, FIRST, LAST, DO, LSE, DELTA, DK, DV, part,
                z, h, block, start, n_len,
                stride_z, stride_h, stride_l, row_stride_z, row_stride_h,
                seq_len, num_heads, sm_scale, dropout_p, seed, rng_len,
                max_distance, exact_lo, exact_hi, far_lo, far_hi,
                ROWS, HEAD_DIM, BLOCK_M, BLOCK_N, BAND, VARLEN, HAS_MASK, DROPOUT, DOT_PRECISION,
            )


# ---------------------------------------------------------------------------------------
# Dropout mask materialised (debugging and tests only)
# ---------------------------------------------------------------------------------------


@triton.jit
def _keep_mask_kernel(OUT, seed, dropout_p, rng_len, BLOCK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    zh = tl.program_id(2)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    keep = _keep_mask(seed, zh, rows, cols, rng_len, dropout_p)
    ok = (rows < rng_len)[:, None] & (cols < rng_len)[None, :]
    offsets = zh.to(tl.int64) * rng_len * rng_len + rows.to(tl.int64)[:, None] * rng_len + cols[None, :]
    tl.store(OUT + offsets, keep.to(tl.int8), mask=ok)


def dropout_keep_mask(seed: int, batch: int, heads: int, length: int, dropout_p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """The boolean keep-mask ``[batch, heads, length, length]`` the kernels use for ``seed``.

    For packed batches pass ``batch = number of sequences`` and ``length = max_seqlen``; the
    mask of sequence ``z`` (length ``n``) is ``[z, :, :n, :n]``. Small shapes only: it is
    the ``[B, H, L, L]`` tensor the kernels never build.
    """
    out = torch.empty(batch, heads, length, length, dtype=torch.int8, device=device)
    block = 32
    grid = (triton.cdiv(length, block), triton.cdiv(length, block), batch * heads)
    with _on_device(out):
        _keep_mask_kernel[grid](out, seed, float(dropout_p), length, BLOCK=block)
    return out.bool()


# ---------------------------------------------------------------------------------------
# Per-row reductions: edge dot products and the backward's Delta, read once in the input
# dtype and accumulated in fp32 (no fp32 copies of q, k, o, dO).
# ---------------------------------------------------------------------------------------


@triton.jit
def _row_index(rows, num_heads, length, tokens, VARLEN: tl.constexpr):
    """(head, per-row-vector index) of data rows: [Z, H, L] rows, or [T, H] rows stored [H, T]."""
    if VARLEN:
        head = rows % num_heads
        return head, head.to(tl.int64) * tokens + rows // num_heads
    return (rows // length) % num_heads, rows.to(tl.int64)


@triton.jit(do_not_specialize=["total_rows", "length", "tokens"])
def _edge_dots_kernel(
    X, TABLE, EDGE, total_rows, num_heads, length, tokens,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, VARLEN: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < total_rows
    offs_d = tl.arange(0, HEAD_DIM)
    x = tl.load(X + rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    head, out = _row_index(rows, num_heads, length, tokens, VARLEN)
    table = TABLE + head.to(tl.int64)[:, None] * (ROWS * HEAD_DIM) + offs_d[None, :]
    first = tl.load(table, mask=ok[:, None], other=0.0).to(tl.float32)
    last = tl.load(table + (ROWS - 1) * HEAD_DIM, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(EDGE + out * 2, tl.sum(x * first, 1), mask=ok)
    tl.store(EDGE + out * 2 + 1, tl.sum(x * last, 1), mask=ok)


@triton.jit(do_not_specialize=["total_rows", "length", "tokens"])
def _delta_kernel(
    OUT, DO, DELTA, total_rows, num_heads, length, tokens,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, VARLEN: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < total_rows
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(OUT + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    _, out = _row_index(rows, num_heads, length, tokens, VARLEN)
    tl.store(DELTA + out, tl.sum(o * do, 1), mask=ok)


_ROW_BLOCK = 64


# ---------------------------------------------------------------------------------------
# Host side: layouts, launches, autograd
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """Where sequence ``z``, head ``h``, token ``i`` lives, for padded or packed input.

    Padded: tensors ``[Z, H, L, D]`` and per-row vectors ``[Z, H, L]``. Packed: tensors
    ``[T, H, D]``, per-row vectors ``[H, T]``, sequence ``z`` = tokens ``cu[z]:cu[z+1]``.
    """

    varlen: bool
    sequences: int
    heads: int
    max_len: int
    head_dim: int

    def strides(self, tokens: int) -> tuple[int, int, int, int, int]:
        """(stride_z, stride_h, stride_l) of the data and (row_stride_z, row_stride_h) of per-row vectors."""
        h, d, length = self.heads, self.head_dim, self.max_len
        if self.varlen:
            return 0, d, h * d, 0, tokens
        return h * length * d, length * d, d, h * length, length


def _poisoned() -> bool:
    # Tests set DV3_KERNEL_POISON=1 so that any output element a kernel fails to write is NaN.
    return os.environ.get("DV3_KERNEL_POISON", "0") == "1"


def _output_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan")) if _poisoned() else torch.empty_like(x)


def _output(shape, device) -> torch.Tensor:
    fill = float("nan") if _poisoned() else None
    if fill is None:
        return torch.empty(shape, device=device, dtype=torch.float32)
    return torch.full(shape, fill, device=device, dtype=torch.float32)


def _row_vector(layout: _Layout, tokens: int, device, trailing: tuple[int, ...] = ()) -> torch.Tensor:
    shape = (layout.heads, tokens) if layout.varlen else (layout.sequences, layout.heads, layout.max_len)
    return _output(shape + trailing, device)


def _edge_dots(x: torch.Tensor, table: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """``x . table[0]`` and ``x . table[-1]`` per row, fp32, in the per-row layout with a trailing 2."""
    tokens = x.shape[0] if layout.varlen else 0
    edges = _row_vector(layout, tokens, x.device, (2,))
    total = x.numel() // layout.head_dim
    _edge_dots_kernel[(triton.cdiv(total, _ROW_BLOCK),)](
        x, table, edges, total, layout.heads, layout.max_len, tokens,
        ROWS=table.shape[1], HEAD_DIM=layout.head_dim, BLOCK_R=_ROW_BLOCK, VARLEN=layout.varlen,
    )
    return edges


def _delta(o: torch.Tensor, do: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """``rowsum(O * dO)`` in fp32, per-row layout."""
    tokens = o.shape[0] if layout.varlen else 0
    delta = _row_vector(layout, tokens, o.device)
    total = o.numel() // layout.head_dim
    _delta_kernel[(triton.cdiv(total, _ROW_BLOCK),)](
        o, do, delta, total, layout.heads, layout.max_len, tokens,
        HEAD_DIM=layout.head_dim, BLOCK_R=_ROW_BLOCK, VARLEN=layout.varlen,
    )
    return delta


def _common_args(layout: _Layout, geometry: SlotGeometry, tokens: int, scale: float, dropout_p: float, seed: int) -> list:
    return [
        *layout.strides(tokens),
        layout.max_len, layout.heads, scale, float(dropout_p), seed, layout.max_len,
        geometry.max_distance, geometry.exact_lo, geometry.exact_hi, geometry.far_lo, geometry.far_hi,
    ]


def _band(geometry: SlotGeometry, block_m: int, block_n: int) -> int:
    return max(16, triton.next_power_of_2(geometry.band_width(block_m, block_n)))


def backward_programs(items: int, heads: int, device: torch.device) -> int:
    """Programs per head of a backward pass: about 8 per multiprocessor in all.

    Each program owns one ``[2k, D]`` fp32 partial slice, so this also bounds their memory
    (about 1000 slices of 128 KiB for v3 at D=64 on an H100, whatever the batch). On the CPU
    (interpreter) a deliberately small number makes programs walk several items, unevenly.
    """
    if device.type == "cuda":
        target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = int(os.environ.get("DV3_KERNEL_CPU_PROGRAMS", "3"))
    return max(1, min(items, triton.cdiv(target, heads)))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32: the fp32 path is the exact one.
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward(q, k, v, rel_key, rel_query, mask, cu, layout, geometry, scale, dropout_p, seed, tuner):
    tokens = q.shape[0] if layout.varlen else 0
    o = _output_like(q)
    lse_shape = (layout.heads, tokens) if layout.varlen else (layout.sequences, layout.heads, layout.max_len)
    lse = _output(lse_shape, q.device)
    edge_q = _edge_dots(q, rel_key, layout)
    edge_k = _edge_dots(k, rel_query, layout)
    slot, _, _ = geometry.to(q.device)
    dummy = slot
    mask_arg = mask if mask is not None else dummy
    cu_arg = cu if cu is not None else dummy

    def launch(config, o=o, lse=lse):
        band = _band(geometry, config.block_m, config.block_n)
        grid = (triton.cdiv(layout.max_len, config.block_m), layout.sequences * layout.heads)
        _fwd_kernel[grid](
            q, k, v, rel_key, rel_query, edge_q, edge_k, mask_arg, cu_arg, slot, o, lse,
            *_common_args(layout, geometry, tokens, scale, dropout_p, seed),
            ROWS=geometry.rows, HEAD_DIM=layout.head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BAND=band, VARLEN=layout.varlen, HAS_MASK=mask is not None, DROPOUT=dropout_p > 0.0,
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
        )

    config = tuner("forward", q, layout, mask is not None, dropout_p > 0.0, geometry, launch)
    launch(config)
    return o, lse


def _backward(q, k, v, rel_key, rel_query, mask, cu, o, lse, do, layout, geometry, scale, dropout_p, seed, tuner):
    tokens = q.shape[0] if layout.varlen else 0
    delta = _delta(o, do, layout)
    edge_q = _edge_dots(q, rel_key, layout)
    edge_k = _edge_dots(k, rel_query, layout)
    slot, first, last = geometry.to(q.device)
    dummy = slot
    mask_arg = mask if mask is not None else dummy
    cu_arg = cu if cu is not None else dummy
    rows, head_dim = geometry.rows, layout.head_dim
    common = _common_args(layout, geometry, tokens, scale, dropout_p, seed)
    flags = dict(
        ROWS=rows, HEAD_DIM=head_dim, VARLEN=layout.varlen, HAS_MASK=mask is not None,
        DROPOUT=dropout_p > 0.0, DOT_PRECISION=_dot_precision(q.dtype),
    )
    dq = _output_like(q)
    dk = _output_like(k)
    dv = _output_like(v)
    results: dict[str, torch.Tensor] = {}

    heads = layout.heads

    def launch_dq(config, dq=dq, keep: bool = False):
        blocks = triton.cdiv(layout.max_len, config.block_m)
        items = layout.sequences * blocks
        programs = backward_programs(items, heads, q.device)
        part = torch.zeros(heads * programs, rows, head_dim, device=q.device, dtype=torch.float32)
        _bwd_dq_kernel[(programs, heads)](
            q, k, v, rel_key, rel_query, edge_q, edge_k, mask_arg, cu_arg, slot, first, last, do, lse, delta, dq, part,
            *common, items, blocks,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BAND=_band(geometry, config.block_m, config.block_n),
            num_warps=config.num_warps, num_stages=config.num_stages, **flags,
        )
        if keep:
            results["d_rel_key"] = part.view(heads, programs, rows, head_dim).sum(1)

    def launch_dkv(config, dk=dk, dv=dv, keep: bool = False):
        blocks = triton.cdiv(layout.max_len, config.block_n)
        items = layout.sequences * blocks
        programs = backward_programs(items, heads, q.device)
        part = torch.zeros(heads * programs, rows, head_dim, device=q.device, dtype=torch.float32)
        _bwd_dkv_kernel[(programs, heads)](
            q, k, v, rel_key, rel_query, edge_q, edge_k, mask_arg, cu_arg, slot, first, last, do, lse, delta, dk, dv, part,
            *common, items, blocks,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BAND=_band(geometry, config.block_m, config.block_n),
            num_warps=config.num_warps, num_stages=config.num_stages, **flags,
        )
        if keep:
            results["d_rel_query"] = part.view(heads, programs, rows, head_dim).sum(1)

    has_mask, dropout = mask is not None, dropout_p > 0.0
    launch_dq(tuner("backward_dq", q, layout, has_mask, dropout, geometry, launch_dq), keep=True)
    launch_dkv(tuner("backward_dkv", q, layout, has_mask, dropout, geometry, launch_dkv), keep=True)
    return dq, dk, dv, results["d_rel_key"].to(rel_key.dtype), results["d_rel_query"].to(rel_query.dtype)


def _on_device(x: torch.Tensor):
    # Triton launches on the current CUDA device: make it the tensors' one.
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_key, rel_query, mask, cu, layout, geometry, scale, dropout_p, seed, tuner):
        with _on_device(q):
            o, lse = _forward(q, k, v, rel_key, rel_query, mask, cu, layout, geometry, scale, dropout_p, seed, tuner)
        ctx.save_for_backward(q, k, v, rel_key, rel_query, o, lse)
        ctx.mask, ctx.cu = mask, cu
        ctx.settings = (layout, geometry, scale, dropout_p, seed, tuner)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, rel_key, rel_query, o, lse = ctx.saved_tensors
        layout, geometry, scale, dropout_p, seed, tuner = ctx.settings
        with _on_device(q):
            grads = _backward(
                q, k, v, rel_key, rel_query, ctx.mask, ctx.cu, o, lse, do.contiguous(), layout, geometry, scale, dropout_p, seed, tuner
            )
        return (*grads, None, None, None, None, None, None, None, None)


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the fused kernels cannot take ``q`` (None when they can)."""
    if q.device.type != "cuda" and not (q.device.type == "cpu" and interpreter_active()):
        return f"tensors are on {q.device.type} (fused kernels need CUDA, or the CPU with TRITON_INTERPRET=1)"
    if q.dtype not in FUSED_DTYPES:
        return f"dtype {q.dtype} is not one of float16, bfloat16, float32"
    if q.shape[-1] not in FUSED_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} is not one of {FUSED_HEAD_DIMS}"
    return None


def _same_dtype_contiguous(q, k, v, rel_key, rel_query) -> list[torch.Tensor]:
    # The kernels' dots need one operand dtype; under autocast the relative projections can
    # come out in another. The cast happens outside the autograd function, so it is differentiated.
    return [t.to(q.dtype).contiguous() for t in (q, k, v, rel_key, rel_query)]


def _draw_seed(dropout_p: float) -> int:
    # Drawn from torch's CPU generator: reproducible under torch.manual_seed, restored by
    # activation checkpointing, and it costs no device synchronisation.
    return int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0.0 else 0


def _check_dropout(dropout_p: float, length: int) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and length * length >= 2**31:
        # The Philox counter i * L + j is 32 bits wide.
        raise ValueError(f"attention dropout supports sequences up to 46340 tokens, got length {length}")


def fused_disentangled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_key: torch.Tensor,
    rel_query: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    position_buckets: int = 256,
    max_relative_positions: int = 512,
    dropout_p: float = 0.0,
    scale: float | None = None,
    seed: int | None = None,
    config=None,
) -> torch.Tensor:
    """The fused path for padded ``[B, H, L, D]`` input (shapes checked by the dispatcher).

    ``seed`` fixes the dropout mask (see :func:`dropout_keep_mask`); ``config`` (a
    ``kernels.tuning.KernelConfig``) forces one tile shape for every pass.
    """
    from kernels.tuning import tuner_for

    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"fused disentangled attention unavailable: {reason}")
    batch, heads, length, head_dim = q.shape
    _check_dropout(dropout_p, length)
    geometry = slot_geometry(position_buckets, max_relative_positions)
    layout = _Layout(varlen=False, sequences=batch, heads=heads, max_len=length, head_dim=head_dim)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.to(device=q.device, dtype=torch.int8).contiguous()
    seed = _draw_seed(dropout_p) if seed is None else int(seed)
    return _FusedAttention.apply(
        *_same_dtype_contiguous(q, k, v, rel_key, rel_query),
        mask, None, layout, geometry, float(scale if scale is not None else (3 * head_dim) ** -0.5),
        float(dropout_p), seed, tuner_for(config),
    )


def fused_disentangled_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_key: torch.Tensor,
    rel_query: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    position_buckets: int = 256,
    max_relative_positions: int = 512,
    dropout_p: float = 0.0,
    scale: float | None = None,
    seed: int | None = None,
    config=None,
) -> torch.Tensor:
    """The fused path for packed ``[T, H, D]`` input; relative positions restart at each ``cu_seqlens`` boundary."""
    from kernels.tuning import tuner_for

    reason = unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"fused disentangled attention unavailable: {reason}")
    tokens, heads, head_dim = q.shape
    _check_dropout(dropout_p, int(max_seqlen))
    geometry = slot_geometry(position_buckets, max_relative_positions)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    layout = _Layout(varlen=True, sequences=cu.numel() - 1, heads=heads, max_len=int(max_seqlen), head_dim=head_dim)
    seed = _draw_seed(dropout_p) if seed is None else int(seed)
    return _FusedAttention.apply(
        *_same_dtype_contiguous(q, k, v, rel_key, rel_query),
        None, cu, layout, geometry, float(scale if scale is not None else (3 * head_dim) ** -0.5),
        float(dropout_p), seed, tuner_for(config),
    )
