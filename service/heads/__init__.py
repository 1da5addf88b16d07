"""Task heads: tokenization (or image preparation) in, task results out. Registry from the repository's
task name; a version whose head.json describes images gets the image head of its task."""

from __future__ import annotations

from pathlib import Path

from service.heads.base import Encoded, TextEncoder
from service.heads.classification import ClassificationHead
from service.heads.generation import GenerationHead
from service.heads.image import Image, ImageClassificationHead
from service.heads.matching import MatchingHead
from service.repository import HeadError, load_head

HEADS: dict[str, type[TextEncoder] | type[GenerationHead]] = {
    "classification": ClassificationHead,
    "matching": MatchingHead,
    "generation": GenerationHead,
}
"""Encoder heads (TextEncoder: batched through an InstancePool) and the generation head (an engine)."""
IMAGE_HEADS: dict[str, type[ImageClassificationHead]] = {"classification": ImageClassificationHead}
"""Heads of the tasks an image model serves (batched through an InstancePool like text encoders)."""

EncoderHead = TextEncoder | ImageClassificationHead


def make_head(task: str, version_dir: Path) -> EncoderHead | GenerationHead:
    """The head of one version: its task's, for the inputs its head.json describes (text or images)."""
    if task != "generation" and load_head(version_dir).image is not None:
        if task not in IMAGE_HEADS:
            raise HeadError(f"{version_dir}: task {task!r} has no image head; image models serve "
                            f"{sorted(IMAGE_HEADS)}")
        return IMAGE_HEADS[task](version_dir)
    return HEADS[task](version_dir)


__all__ = ["HEADS", "IMAGE_HEADS", "ClassificationHead", "Encoded", "EncoderHead", "GenerationHead", "Image",
           "ImageClassificationHead", "MatchingHead", "TextEncoder", "make_head"]
