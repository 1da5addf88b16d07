"""Image classification: ``image`` (UINT8, [H, W, C] or [N, H, W, C]) is rescaled and normalized here
bit-identically to transformers' image processor, with the settings the model was trained with
(head.json's ``ImageSpec``); ``pixel_values`` (FP32, [C, H, W] or [N, C, H, W]) is taken as already
prepared. As in Triton the model takes one size, and the client resizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from service.errors import InvalidInput
from service.heads.tensor import TensorHead, TensorItem
from service.repository import HeadError, ImageSpec


class ImageClassificationHead(TensorHead):
    inputs: ClassVar[dict[str, str]] = {"image": "UINT8", "pixel_values": "FP32"}

    def __init__(self, version_dir: Path) -> None:
        super().__init__(version_dir)
        if self.meta.image is None or self.input_names != ["pixel_values"]:
            raise HeadError(f"{version_dir}: an image head needs head.json's image and input_names ['pixel_values']")
        self.spec: ImageSpec = self.meta.image
        # Every UINT8 value of every channel, prepared once with the image processor's own arithmetic
        # (rescale in float64, then float32 (x - mean) / std): a lookup is bit-identical to transformers'
        # output. Computed otherwise (x * (factor / std) - mean / std) the values differ in the last bit,
        # and a static INT8 graph rounds such values onto different quantization steps.
        values = (np.arange(256, dtype=np.float64) * self.spec.rescale_factor).astype(np.float32)
        mean = np.asarray(self.spec.mean, dtype=np.float32)[:, None]
        self._table = (values[None, :] - mean) / np.asarray(self.spec.std, dtype=np.float32)[:, None]  # (C, 256)
        self._channels = np.arange(self.spec.channels)

    def shapes(self) -> dict[str, list[int]]:
        s = self.spec
        return {"image": [-1, s.height, s.width, s.channels], "pixel_values": [-1, s.channels, s.height, s.width]}

    def batch_shape(self, name: str, shape: list[int], where: str) -> list[int]:
        one = self.shapes()[name][1:]
        if shape == one:
            shape = [1, *one]
        if len(shape) != 4 or shape[1:] != one:
            raise InvalidInput(f"{where}: shape {shape}; this model takes {one} or [N, {', '.join(map(str, one))}]: "
                               f"resize images to {self.spec.height}x{self.spec.width} with {self.spec.channels} "
                               "channels before sending")
        return shape

    def prepare(self, name: str, batch: np.ndarray) -> np.ndarray:
        if name == "pixel_values":
            return batch
        return self._table[self._channels, batch].transpose(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)

    def warm_up_items(self) -> list[TensorItem]:
        s = self.spec
        return [TensorItem(np.zeros((s.channels, s.height, s.width), dtype=np.float32), self.max_length)]
