"""Audio -> ``input_values``, with transformers' wav2vec2 feature extractor as the one implementation.

A checkpoint of an audio model keeps the extractor's settings (``preprocessor_config.json``: sampling
rate, normalization); every clip is padded with silence (or cut) to the model's ``max_samples`` and
then normalized to zero mean and unit variance as the extractor does, so training, SAMP and the
server see the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import ModelConfig


def default_preprocessor(config: ModelConfig) -> dict:
    """wav2vec2's extractor at the model's rate: per-clip normalization, no attention mask (the base layout
    is trained on zero-padded clips)."""
    from transformers import Wav2Vec2FeatureExtractor

    extractor = Wav2Vec2FeatureExtractor(sampling_rate=config.embedding.sampling_rate, do_normalize=True,
                                         return_attention_mask=False)
    return json.loads(extractor.to_json_string())


def feature_extractor(preprocessor: dict) -> Any:
    from transformers import Wav2Vec2FeatureExtractor

    settings = {k: v for k, v in preprocessor.items() if k not in ("feature_extractor_type", "processor_class")}
    return Wav2Vec2FeatureExtractor(**settings)


def load_audio(path: Path, sampling_rate: int) -> np.ndarray:
    """A WAV file's samples as float32 in [-1, 1]; its rate must be the model's (no resampling here)."""
    from scipy.io import wavfile

    rate, samples = wavfile.read(path)
    if rate != sampling_rate:
        raise ValueError(f"{path}: {rate} Hz, but the model takes {sampling_rate} Hz audio")
    if samples.ndim != 1:
        raise ValueError(f"{path}: {samples.shape[1]} channels; the model takes mono audio")
    if samples.dtype == np.int16:
        return samples.astype(np.float32) / 32768.0
    return samples.astype(np.float32)


def input_values(extractor: Any, clips: list[np.ndarray], max_samples: int) -> torch.Tensor:
    """(B, max_samples) float32: each clip padded with silence or cut to ``max_samples``, then normalized."""
    out = extractor(clips, sampling_rate=extractor.sampling_rate, padding="max_length", max_length=max_samples,
                    truncation=True, return_tensors="np")["input_values"]
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
