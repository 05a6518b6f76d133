"""Plain PyTorch disentangled attention: the definition every fused kernel is tested against.

It computes exactly what Hugging Face ``DisentangledSelfAttention`` computes for a
DeBERTa-v3 config (``share_att_key``, ``pos_att_type = [p2c, c2p]``), given the projected
relative embeddings, and materialises the ``[B, H, L, L]`` scores to do it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.relative_position import relative_slots, used_slots


def disentangled_attention_reference(
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
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax((Q K^T + c2p + p2c) * scale + mask) V`` with HF's slot mapping.

    ``c2p[i, j] = Q_i . rel_key[slot(i - j)]`` and ``p2c[i, j] = K_j . rel_query[slot(i - j)]``.
    A fully masked (padding) query row gets HF's uniform softmax. ``dropout_mask``, if
    given, is the boolean keep-mask ``[B, H, L, L]`` to apply (kept values scaled by
    ``1 / (1 - dropout_p)``); this lets a test reproduce a fused kernel's dropout.
    """
    batch, heads, length, head_dim = q.shape
    if scale is None:
        scale = (head_dim * 3) ** -0.5
    # Score against the rows slot(i - j) reaches only (a window of the 2k rows; all of them
    # once the sequence is long enough), then index the window.
    first, last = used_slots(length, position_buckets, max_relative_positions)
    slots = relative_slots(length, length, position_buckets, max_relative_positions) - first

    content = torch.matmul(q, k.transpose(-1, -2))
    c2p_table = torch.matmul(q, rel_key[:, first:last + 1].transpose(-1, -2))  # [B, H, L, window]
    p2c_table = torch.matmul(k, rel_query[:, first:last + 1].transpose(-1, -2))  # [B, H, L, window]
    index = slots.to(q.device).expand(batch, heads, length, length)
    c2p = torch.gather(c2p_table, -1, index)
    # p2c[i, j] = K_j . Qr[slot(i - j)]: gather row j at slot(i - j), i.e. index slots^T, then transpose.
    p2c = torch.gather(p2c_table, -1, index.transpose(-1, -2)).transpose(-1, -2)
    scores = (content + c2p + p2c) * scale

    if attention_mask is not None:
        token = attention_mask.to(torch.bool)
        pair = token[:, None, :, None] & token[:, None, None, :]
        scores = scores.masked_fill(~pair, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if dropout_mask is not None:
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v)
