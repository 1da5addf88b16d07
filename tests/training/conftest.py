"""Small model configs for component tests: real architectures, tiny sizes."""

from __future__ import annotations

import json

import pytest

from training.config import ModelConfig, load_config


def shrink(name: str, **updates) -> ModelConfig:
    """A named config at test size: 2 layers, hidden 32, vocab 128, no dropout."""
    raw = json.loads(load_config(name).to_json())
    raw.update(vocab_size=128, hidden_size=32, num_heads=4, intermediate_size=64, dropout=0.0,
               attention_dropout=0.0)
    if raw.get("head_dim"):
        raw["head_dim"] = 8
    for stack in ("encoder", "decoder"):
        if raw.get(stack):
            raw[stack]["num_layers"] = 2
    if raw["embedding"].get("max_position", 0) > 64:
        raw["embedding"]["max_position"] = 64
    for key, value in updates.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    return ModelConfig.model_validate(raw)


@pytest.fixture
def shrink_config():
    return shrink
