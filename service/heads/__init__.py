"""Task heads: tokenization in, task results out. Registry from the repository's task name."""

from __future__ import annotations

from service.heads.base import Encoded, TextEncoder
from service.heads.classification import ClassificationHead
from service.heads.generation import GenerationHead
from service.heads.matching import MatchingHead

HEADS: dict[str, type[TextEncoder] | type[GenerationHead]] = {
    "classification": ClassificationHead,
    "matching": MatchingHead,
    "generation": GenerationHead,
}
"""Encoder heads (TextEncoder: batched through an InstancePool) and the generation head (an engine)."""

__all__ = ["HEADS", "ClassificationHead", "Encoded", "GenerationHead", "MatchingHead", "TextEncoder"]
