"""Component registries: config name -> class. CLI choices read these dicts; config validation reads
their torch-free copy of the names (``training.config.COMPONENT_NAMES``)."""

from __future__ import annotations

from training.components.activations import ACTIVATIONS
from training.components.decoders import DECODERS
from training.components.embeddings import EMBEDDINGS
from training.components.encoders import ENCODERS
from training.components.pooling import POOLING
from training.components.targets import TARGETS

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

