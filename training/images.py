"""Images -> ``pixel_values``, with transformers' image processor as the one implementation.

A checkpoint of an image model keeps the processor's settings (``preprocessor_config.json``: size,
resampling, rescale factor, mean and std); training, evaluation and SAMP rebuild the processor from
them, so the model always sees inputs prepared exactly as a transformers user's would be.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.config import ModelConfig


def _processor_class(name: str) -> Any:
    import transformers

    # Without torchvision transformers 5 falls back to the PIL flavour with a warning; ask for it directly.
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def default_preprocessor(config: ModelConfig) -> dict:
    """ViT's processor for a model trained from scratch: resize to the model's size, scale to [-1, 1]."""
    side = config.embedding.image_size
    processor = _processor_class("ViTImageProcessor")(size={"height": side, "width": side})
    return json.loads(processor.to_json_string())


def image_processor(preprocessor: dict) -> Any:
    """The transformers image processor that ``preprocessor`` (a preprocessor_config.json) describes."""
    settings = dict(preprocessor)
    name = settings.pop("image_processor_type", "ViTImageProcessor").removesuffix("Pil")
    settings.pop("processor_class", None)
    return _processor_class(name)(**settings)


def load_image(path: Path, channels: int) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB" if channels == 3 else "L")


def pixel_values(processor: Any, images: list[Any]) -> torch.Tensor:
    """(B, C, H, W) float32 from PIL images (or HWC uint8 arrays)."""
    out = processor(images=images, return_tensors="np")["pixel_values"]
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
