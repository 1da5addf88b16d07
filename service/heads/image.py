"""Image classification: tensors in, checked and prepared with numpy, logits out (labels as for text).

Triton's way: the model takes one shape, and the client sends it. A version's ``head.json`` holds the
shape and the arithmetic of the image processor the model was trained with (``ImageSpec``), so
``image`` (UINT8, [H, W, C] or [N, H, W, C]) is rescaled and normalized here bit-identically to
transformers, and ``pixel_values`` (FP32, [C, H, W] or [N, C, H, W]) is taken as already prepared. Every
check (name, datatype, shape, count, byte size, finiteness) runs before any work is queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.errors import InvalidInput
from service.heads.classification import Labelled
from service.repository import HeadError, HeadMeta, ImageSpec, load_head
from service.tensors import TensorInput

IMAGE_INPUTS = {"image": "UINT8", "pixel_values": "FP32"}
"""The tensors an image model takes (exactly one per request), by name, with their datatype."""


@dataclass(frozen=True)
class Image:
    """One prepared image: the unit the batcher queues (every image of a model has the same length)."""

    pixels: np.ndarray  # (C, H, W) float32
    length: int


class ImageClassificationHead(Labelled):
    task = "classification"

    def __init__(self, version_dir: Path) -> None:
        self.meta: HeadMeta = load_head(version_dir)
        if self.meta.image is None or self.meta.input_names != ["pixel_values"]:
            raise HeadError(f"{version_dir}: an image head needs head.json's image and input_names ['pixel_values']")
        self.spec: ImageSpec = self.meta.image
        self.max_length = self.meta.max_length
        self.input_names = list(self.meta.input_names)
        # Every UINT8 value of every channel, prepared once with the image processor's own arithmetic
        # (rescale in float64, then float32 (x - mean) / std): a lookup is bit-identical to transformers'
        # output. Computed otherwise (x * (factor / std) - mean / std) the values differ in the last bit,
        # and a static INT8 graph rounds such values onto different quantization steps.
        values = (np.arange(256, dtype=np.float64) * self.spec.rescale_factor).astype(np.float32)
        mean = np.asarray(self.spec.mean, dtype=np.float32)[:, None]
        self._table = (values[None, :] - mean) / np.asarray(self.spec.std, dtype=np.float32)[:, None]  # (C, 256)
        self._channels = np.arange(self.spec.channels)

    def shapes(self) -> dict[str, list[int]]:
        """Each input's shape with the batch axis first (-1), as model metadata lists it."""
        s = self.spec
        return {"image": [-1, s.height, s.width, s.channels], "pixel_values": [-1, s.channels, s.height, s.width]}

    def images(self, inputs: list[TensorInput], max_images: int) -> list[Image]:
        """The request's one image tensor, checked against the model's shape and limits, then prepared."""
        if len(inputs) != 1 or inputs[0].name not in IMAGE_INPUTS:
            given = [t.name[:64] for t in inputs]
            raise InvalidInput(f"inputs: give exactly one tensor, 'image' (UINT8 [N, H, W, C]) or 'pixel_values' "
                               f"(FP32 [N, C, H, W]); got {given}")
        tensor = inputs[0]
        where = f"inputs.{tensor.name}"
        if tensor.datatype != IMAGE_INPUTS[tensor.name]:
            other = "; FP32 values already prepared go in 'pixel_values'" if tensor.name == "image" else ""
            raise InvalidInput(f"{where}: datatype must be {IMAGE_INPUTS[tensor.name]}, got {tensor.datatype[:32]}"
                               f"{other}")
        one = self.shapes()[tensor.name][1:]
        shape = list(tensor.shape)
        if shape == one:
            shape = [1, *one]
        if len(shape) != 4 or shape[1:] != one or shape[0] < 1:
            raise InvalidInput(f"{where}: shape {list(tensor.shape)[:8]}; this model takes {one} or [N, "
                               f"{', '.join(map(str, one))}] (N >= 1): resize images to {self.spec.height}x"
                               f"{self.spec.width} with {self.spec.channels} channels before sending")
        if shape[0] > max_images:
            raise InvalidInput(f"{where}: {shape[0]} images; at most {max_images} per request")
        flat = tensor.array(where)
        if tensor.name == "pixel_values":
            if not np.isfinite(flat).all():
                raise InvalidInput(f"{where}: holds NaN or infinity")
            batch = flat.reshape(shape)
        else:
            batch = self._table[self._channels, flat.reshape(shape)].transpose(0, 3, 1, 2)  # (N, C, H, W)
        return [Image(np.ascontiguousarray(row, dtype=np.float32), self.max_length) for row in batch]

    def warm_up_items(self) -> list[Image]:
        s = self.spec
        return [Image(np.zeros((s.channels, s.height, s.width), dtype=np.float32), self.max_length)]

    def collate(self, items: list[Image]) -> dict[str, np.ndarray]:
        return {"pixel_values": np.stack([item.pixels for item in items])}
