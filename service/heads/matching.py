"""Matching: sentence embeddings, pair similarity and reranking (cosine of normalized vectors)."""

from __future__ import annotations

import numpy as np

from service.heads.base import TextEncoder


class MatchingHead(TextEncoder):
    task = "matching"

    def normalize(self, vectors: np.ndarray) -> np.ndarray:
        if self.meta.normalized:
            return vectors
        return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True).clip(1e-12)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Row-wise cosine of two (n, d) arrays."""
        return (self.normalize(a) * self.normalize(b)).sum(-1)

    def rerank(self, query: np.ndarray, documents: np.ndarray) -> list[tuple[int, float]]:
        """Document indices with scores, best first."""
        scores = self.normalize(documents) @ self.normalize(query[None, :])[0]
        order = np.argsort(-scores, kind="stable")
        return [(int(i), float(scores[i])) for i in order]
