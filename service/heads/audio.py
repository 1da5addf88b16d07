"""Audio classification: ``waveform`` (FP32 samples at the model's rate, [S] or [N, S], S up to the
model's clip length) is padded with silence to that length and normalized to zero mean and unit
variance exactly as transformers' wav2vec2 feature extractor does (head.json's ``AudioSpec``);
``input_values`` (FP32 [N, clip length]) is taken as already prepared. The server does not resample:
the rate is in model metadata, and the client converts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from service.errors import InvalidInput
from service.heads.tensor import TensorHead, TensorItem
from service.repository import AudioSpec, HeadError


class AudioClassificationHead(TensorHead):
    inputs: ClassVar[dict[str, str]] = {"waveform": "FP32", "input_values": "FP32"}

    def __init__(self, version_dir: Path) -> None:
        super().__init__(version_dir)
        if self.meta.audio is None or self.input_names != ["input_values"]:
            raise HeadError(f"{version_dir}: an audio head needs head.json's audio and input_names ['input_values']")
        self.spec: AudioSpec = self.meta.audio

    def shapes(self) -> dict[str, list[int]]:
        return {"waveform": [-1, -1], "input_values": [-1, self.spec.max_samples]}

    def parameters(self) -> dict[str, Any]:
        return {"sampling_rate": self.spec.sampling_rate, "max_samples": self.spec.max_samples}

    def batch_shape(self, name: str, shape: list[int], where: str) -> list[int]:
        limit = self.spec.max_samples
        if name == "input_values":
            if shape == [limit]:
                return [1, limit]
            if len(shape) != 2 or shape[1] != limit:
                raise InvalidInput(f"{where}: shape {shape}; prepared input_values are [N, {limit}]")
            return shape
        if len(shape) == 1:
            shape = [1, *shape]
        if len(shape) != 2 or not 1 <= shape[1] <= limit:
            raise InvalidInput(f"{where}: shape {shape}; this model takes [S] or [N, S] samples at "
                               f"{self.spec.sampling_rate} Hz with 1 <= S <= {limit} "
                               f"({limit / self.spec.sampling_rate:g} s): resample and cut before sending")
        return shape

    def prepare(self, name: str, batch: np.ndarray) -> np.ndarray:
        if name == "input_values":
            return batch
        padded = np.zeros((batch.shape[0], self.spec.max_samples), dtype=np.float32)
        padded[:, : batch.shape[1]] = batch
        if not self.spec.normalize:
            return padded
        # transformers' zero_mean_unit_var_norm, clip by clip, in float32 as it computes it
        return np.stack([(x - x.mean()) / np.sqrt(x.var() + 1e-7) for x in padded])

    def warm_up_items(self) -> list[TensorItem]:
        return [TensorItem(np.zeros(self.spec.max_samples, dtype=np.float32), self.max_length)]
