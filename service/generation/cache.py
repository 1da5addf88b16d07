"""The running batch's key/value cache: batch-major, left-padded numpy arrays, as TGI's cached batch.

Each layer's key and value are (B, kv_heads, L, head_dim); ``mask`` (B, L) marks the columns that
hold a real token. Every row is left-padded (padding, then its tokens up to the last column), so
a row's padding is always a prefix, and columns that are padding in every row can be dropped from
the left. Rows join by left-padding to a common length and concatenating, and leave by index
selection; both keep this shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class KVCache:
    arrays: list[np.ndarray]
    """2 x layers arrays, in graph order (layer 0 key, layer 0 value, layer 1 key, ...)."""
    mask: np.ndarray
    """(B, L) int64: 1 where the column holds a real token of that row."""

    @classmethod
    def empty(cls, layers: int, kv_heads: int, head_dim: int) -> KVCache:
        arrays = [np.zeros((0, kv_heads, 0, head_dim), dtype=np.float32) for _ in range(2 * layers)]
        return cls(arrays, np.zeros((0, 0), dtype=np.int64))

    @property
    def batch(self) -> int:
        return int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return int(self.mask.shape[1])

    @property
    def tokens(self) -> int:
        """Cache slots held, padding included (B x L): what the memory cap counts."""
        return self.batch * self.length

    def positions(self) -> np.ndarray:
        """(B, 1) position id of each row's next token: the tokens it has cached."""
        return self.mask.sum(axis=1, keepdims=True).astype(np.int64)

    def trimmed(self) -> KVCache:
        """Without the leading columns that are padding in every row."""
        if self.batch == 0:
            return KVCache([a[:, :, :0] for a in self.arrays], self.mask[:, :0])
        real = self.mask.any(axis=0)
        start = int(np.argmax(real)) if real.any() else self.length
        if start == 0:
            return self
        return KVCache([np.ascontiguousarray(a[:, :, start:]) for a in self.arrays], self.mask[:, start:])

    def select(self, rows: Sequence[int]) -> KVCache:
        """Only these rows, in this order (finished, cancelled and preempted rows leave)."""
        index = np.asarray(rows, dtype=np.int64)
        return KVCache([a[index] for a in self.arrays], self.mask[index]).trimmed()

    def padded_to(self, length: int) -> KVCache:
        """Left-padded with masked zero columns up to ``length``."""
        extra = length - self.length
        if extra <= 0:
            return self
        arrays = [np.pad(a, ((0, 0), (0, 0), (extra, 0), (0, 0))) for a in self.arrays]
        return KVCache(arrays, np.pad(self.mask, ((0, 0), (extra, 0))))

    @staticmethod
    def concat(parts: Sequence[KVCache]) -> KVCache:
        """Rows of every part, in order, left-padded to the longest."""
        parts = [p for p in parts if p.batch]
        if not parts:
            raise ValueError("nothing to concatenate")
        if len(parts) == 1:
            return parts[0].trimmed()
        length = max(p.length for p in parts)
        padded = [p.padded_to(length) for p in parts]
        arrays = [np.concatenate(layer, axis=0) for layer in zip(*(p.arrays for p in padded), strict=True)]
        return KVCache(arrays, np.concatenate([p.mask for p in padded], axis=0)).trimmed()


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids, mask), both (B, longest) int64, padded on the left."""
    longest = max(len(r) for r in rows)
    ids = np.full((len(rows), longest), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = row
        mask[i, longest - len(row):] = 1
    return ids, mask
