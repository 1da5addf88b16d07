"""Classification: logits to label names and probabilities (top-k)."""

from __future__ import annotations

import numpy as np

from service.errors import InvalidInput
from service.heads.base import TextEncoder
from service.repository import HeadMeta


class Labelled:
    """Logits -> label names and probabilities: shared by the text and image classification heads."""

    meta: HeadMeta

    @property
    def labels(self) -> list[str]:
        return list(self.meta.labels or [])

    def top_k(self, logits: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        if k < 1:
            raise InvalidInput(f"top_k must be >= 1, got {k}")
        shifted = logits - logits.max(-1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
        k = min(k, probs.shape[-1])
        out = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[:k]
            out.append([(self.labels[i] if i < len(self.labels) else str(i), float(row[i])) for i in order])
        return out


class ClassificationHead(Labelled, TextEncoder):
    task = "classification"
