"""Component registries: config name -> class. CLI choices and config validation read these dicts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from training.components.activations import ACTIVATIONS
from training.components.decoders import DECODERS
from training.components.embeddings import EMBEDDINGS
from training.components.encoders import ENCODERS
from training.components.pooling import POOLING
from training.components.targets import TARGETS

if TYPE_CHECKING:
    from training.config import ModelConfig

# The decoder's target embedding is built from the same parts as the source embedding.
TARGET_EMBEDDINGS = EMBEDDINGS

REGISTRIES = {
    "embeddings": EMBEDDINGS,
    "encoders": ENCODERS,
    "target_embeddings": TARGET_EMBEDDINGS,
    "decoders": DECODERS,
    "targets": TARGETS,
    "pooling": POOLING,
    "activations": ACTIVATIONS,
}


def _require(kind: str, name: str) -> None:
    registry = REGISTRIES[kind]
    if name not in registry:
        raise ValueError(f"unknown {kind[:-1]} {name!r}; choose from {sorted(registry)}")


def registry_check(config: ModelConfig) -> None:
    """Fail at load time on any component name that no registry holds."""
    for part in config.embedding.parts:
        _require("embeddings", part)
    _require("encoders", config.encoder.name)
    _require("activations", config.encoder.activation)
    if config.target_embedding is not None:
        for part in config.target_embedding.parts:
            _require("target_embeddings", part)
    if config.decoder is not None:
        _require("decoders", config.decoder.name)
        _require("activations", config.decoder.activation)
    _require("targets", config.target.name)
    _require("pooling", config.target.pooling)
