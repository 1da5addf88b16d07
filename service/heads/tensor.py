"""Heads of models that take tensors (images, audio): v2 input tensors in, checked and prepared with
numpy, logits out (labels as for text classification).

Triton's way: a model states the tensors it takes (name, datatype, shape) and the client sends one of
them. Every check (name, datatype, shape, count, byte size, finiteness) runs before any work is queued;
each modality's head says which shapes it takes and how raw values become the graph's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from service.errors import InvalidInput
from service.heads.classification import Labelled
from service.repository import HeadMeta, load_head
from service.tensors import TensorInput


@dataclass(frozen=True)
class TensorItem:
    """One prepared input: the unit the batcher queues (all of a version's items have one length)."""

    values: np.ndarray  # the graph input's row: (C, H, W) pixels, (samples,) audio; float32
    length: int


class TensorHead(Labelled):
    task = "classification"
    inputs: ClassVar[dict[str, str]]
    """The tensors the model takes (exactly one per request): name -> datatype."""
    spec: Any
    """What the version takes (ImageSpec, AudioSpec): a request checked against one version runs on its
    successor only if the successor takes the same."""

    def __init__(self, version_dir: Path) -> None:
        self.meta: HeadMeta = load_head(version_dir)
        self.max_length = self.meta.max_length
        self.input_names = list(self.meta.input_names)

    def shapes(self) -> dict[str, list[int]]:
        """Each input's shape with the batch axis first (-1: any; a -1 inside: up to a stated limit)."""
        raise NotImplementedError

    def parameters(self) -> dict[str, Any]:
        """What model metadata tells clients beside the shapes (a sampling rate)."""
        return {}

    def batch_shape(self, name: str, shape: list[int], where: str) -> list[int]:
        """The request's shape as [N, ...] (a single input without its batch axis gets one), or a 400."""
        raise NotImplementedError

    def prepare(self, name: str, batch: np.ndarray) -> np.ndarray:
        """Checked values of shape ``batch_shape`` -> the graph's float32 input rows."""
        raise NotImplementedError

    def usage(self) -> str:
        return ", ".join(f"'{n}' ({t} {self.shapes()[n]})" for n, t in self.inputs.items())

    def items(self, inputs: list[TensorInput], max_items: int) -> list[TensorItem]:
        """The request's one tensor, checked against the model and the limits, then prepared."""
        if len(inputs) != 1 or inputs[0].name not in self.inputs:
            raise InvalidInput(f"inputs: give exactly one tensor, {' or '.join(self.usage().split(', '))}; got "
                               f"{[t.name[:64] for t in inputs]}")
        tensor = inputs[0]
        where = f"inputs.{tensor.name}"
        if tensor.datatype != self.inputs[tensor.name]:
            raise InvalidInput(f"{where}: datatype must be {self.inputs[tensor.name]}, got {tensor.datatype[:32]}; "
                               f"this model takes {self.usage()}")
        shape = self.batch_shape(tensor.name, list(tensor.shape)[:9], where)
        if shape[0] < 1:
            raise InvalidInput(f"{where}: shape {list(tensor.shape)[:9]}: give at least one input (N >= 1)")
        if shape[0] > max_items:
            raise InvalidInput(f"{where}: {shape[0]} inputs; at most {max_items} per request")
        flat = tensor.array(where)
        if flat.dtype.kind == "f" and not np.isfinite(flat).all():
            raise InvalidInput(f"{where}: holds NaN or infinity")
        rows = self.prepare(tensor.name, flat.reshape(shape))
        return [TensorItem(np.ascontiguousarray(row, dtype=np.float32), self.max_length) for row in rows]

    def warm_up_items(self) -> list[TensorItem]:
        raise NotImplementedError

    def collate(self, items: list[TensorItem]) -> dict[str, np.ndarray]:
        return {self.input_names[0]: np.stack([item.values for item in items])}
