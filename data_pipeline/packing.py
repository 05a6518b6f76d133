"""Packing token streams into fixed-length rows ``[CLS] ... [SEP] [PAD]*``.

- ``stream`` (the official DeBERTa recipe): documents are concatenated into one token stream,
  cut into ``seq_len - 2`` pieces, each wrapped in ``[CLS] ... [SEP]``. Only the very last row of a
  stream is padded.
- ``document``: rows never cross a document boundary; each document is cut into ``seq_len - 2``
  pieces and its last row is padded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipeline.errors import ConfigError
from data_pipeline.tokenizer import CLS_ID, PAD_ID, SEP_ID

PACKINGS = ("stream", "document")


def wrap_rows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Rows ``[CLS] piece [SEP] [PAD]*`` from consecutive ``seq_len - 2`` pieces of ``tokens``."""
    body = seq_len - 2
    count = -(-len(tokens) // body)
    rows = np.full((count, seq_len), PAD_ID, dtype=np.int32)
    if count == 0:
        return rows
    full = len(tokens) // body
    rows[:, 0] = CLS_ID
    if full:
        rows[:full, 1 : body + 1] = tokens[: full * body].reshape(full, body)
        rows[:full, body + 1] = SEP_ID
    tail = tokens[full * body :]
    if len(tail):
        rows[full, 1 : 1 + len(tail)] = tail
        rows[full, 1 + len(tail)] = SEP_ID
    return rows


class Packer:
    """Turns one stream of documents (one language and split) into rows."""

    def __init__(self, seq_len: int, mode: str = "stream") -> None:
        if seq_len < 8:
            raise ConfigError(f"seq_len must be at least 8, got {seq_len}")
        if mode not in PACKINGS:
            raise ConfigError(f"packing must be one of {list(PACKINGS)}, got {mode!r}")
        self.seq_len = seq_len
        self.mode = mode
        self._body = seq_len - 2
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Add one document's tokens; returns the rows it completed (possibly none)."""
        tokens = np.asarray(ids, dtype=np.int32)
        if self.mode == "document":
            return wrap_rows(tokens, self.seq_len)
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        if self._pending_tokens < self._body:
            return np.empty((0, self.seq_len), dtype=np.int32)
        stream = np.concatenate(self._pending)
        cut = (len(stream) // self._body) * self._body
        rest = stream[cut:]
        self._pending = [rest] if len(rest) else []
        self._pending_tokens = len(rest)
        return wrap_rows(stream[:cut], self.seq_len)

    def finish(self) -> np.ndarray:
        """The padded last row of the stream, if any tokens are left."""
        if not self._pending_tokens:
            return np.empty((0, self.seq_len), dtype=np.int32)
        stream = np.concatenate(self._pending)
        self._pending, self._pending_tokens = [], 0
        return wrap_rows(stream, self.seq_len)
