"""Small Triton kernels over rows: edge dot products, the backward's ``Delta``, the dropout mask.

The per-row reductions read their input once in its own dtype and accumulate in fp32 (no
fp32 copies of q, k, o, dO). ``keep_mask_kernel`` materialises the dropout mask the
attention kernels draw, for tests and debugging only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.tiles import keep_mask

ROW_BLOCK = 64


@triton.jit
def keep_mask_kernel(OUT, seed, dropout_p, rng_len, BLOCK: tl.constexpr):
    # (sequence x head) on the first grid axis: the only one not limited to 65,535.
    zh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j0 = tl.program_id(2) * BLOCK
    cols = j0 + tl.arange(0, BLOCK)
    keep = keep_mask(seed, zh, rows, j0, rng_len, dropout_p, BLOCK, BLOCK)
    ok = (rows < rng_len)[:, None] & (cols < rng_len)[None, :]
    offsets = zh.to(tl.int64) * rng_len * rng_len + rows.to(tl.int64)[:, None] * rng_len + cols[None, :]
    tl.store(OUT + offsets, keep.to(tl.int8), mask=ok)


@triton.jit
def row_index(rows, num_heads, length, tokens, VARLEN: tl.constexpr):
    """(head, per-row-vector index) of data rows: [Z, H, L] rows, or [T, H] rows stored [H, T]."""
    if VARLEN:
        head = rows % num_heads
        return head, head.to(tl.int64) * tokens + rows // num_heads
    return (rows // length) % num_heads, rows.to(tl.int64)


@triton.jit(do_not_specialize=["total_rows", "length", "tokens"])
def edge_dots_kernel(
    X, TABLE, EDGE, total_rows, num_heads, length, tokens,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, VARLEN: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < total_rows
    offs_d = tl.arange(0, HEAD_DIM)
    x = tl.load(X + rows.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    head, out = row_index(rows, num_heads, length, tokens, VARLEN)
    table = TABLE + head.to(tl.int64)[:, None] * (ROWS * HEAD_DIM) + offs_d[None, :]
    first = tl.load(table, mask=ok[:, None], other=0.0).to(tl.float32)
    last = tl.load(table + (ROWS - 1) * HEAD_DIM, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(EDGE + out * 2, tl.sum(x * first, 1), mask=ok)
    tl.store(EDGE + out * 2 + 1, tl.sum(x * last, 1), mask=ok)


@triton.jit(do_not_specialize=["total_rows", "length", "tokens"])
def delta_kernel(
    OUT, DO, DELTA, total_rows, num_heads, length, tokens,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, VARLEN: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < total_rows
    offs = rows.to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(OUT + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    _, out = row_index(rows, num_heads, length, tokens, VARLEN)
    tl.store(DELTA + out, tl.sum(o * do, 1), mask=ok)
