"""Task heads: tokenization (or image and audio preparation) in, task results out. Registry from the
repository's task name; a version whose head.json describes images or audio gets that modality's head."""

from __future__ import annotations

from pathlib import Path

from service.heads.base import Encoded, TextEncoder
from service.heads.classification import ClassificationHead
from service.heads.generation import GenerationHead
from service.heads.audio import AudioClassificationHead
from service.heads.image import ImageClassificationHead
from service.heads.matching import MatchingHead
from service.heads.tensor import TensorHead, TensorItem
from service.repository import HeadError, load_head

HEADS: dict[str, type[TextEncoder] | type[GenerationHead]] = {
    "classification": ClassificationHead,
    "matching": MatchingHead,
    "generation": GenerationHead,
}
"""Encoder heads (TextEncoder: batched through an InstancePool) and the generation head (an engine)."""
TENSOR_HEADS: dict[str, dict[str, type[TensorHead]]] = {
    "image": {"classification": ImageClassificationHead},
    "audio": {"classification": AudioClassificationHead},
}
"""Heads of the tasks a tensor model serves, by modality (batched through an InstancePool like text)."""

EncoderHead = TextEncoder | TensorHead


def make_head(task: str, version_dir: Path) -> EncoderHead | GenerationHead:
    """The head of one version: its task's, for the inputs its head.json describes (text, images, audio)."""
    if task != "generation":
        meta = load_head(version_dir)
        modality = "image" if meta.image is not None else "audio" if meta.audio is not None else "text"
        if modality != "text":
            if task not in TENSOR_HEADS[modality]:
                raise HeadError(f"{version_dir}: task {task!r} has no {modality} head; {modality} models serve "
                                f"{sorted(TENSOR_HEADS[modality])}")
            return TENSOR_HEADS[modality][task](version_dir)
    return HEADS[task](version_dir)


__all__ = ["HEADS", "TENSOR_HEADS", "AudioClassificationHead", "ClassificationHead", "Encoded", "EncoderHead",
           "GenerationHead", "ImageClassificationHead", "MatchingHead", "TensorHead", "TensorItem", "TextEncoder",
           "make_head"]
