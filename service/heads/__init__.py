"""Task heads: tokenization in, task results out. Registry from the repository's task name."""

from __future__ import annotations

from service.heads.base import Encoded, TextEncoder
from service.heads.classification import ClassificationHead
from service.heads.matching import MatchingHead

HEADS: dict[str, type[TextEncoder]] = {
    "classification": ClassificationHead,
    "matching": MatchingHead,
}

__all__ = ["HEADS", "ClassificationHead", "Encoded", "MatchingHead", "TextEncoder"]
