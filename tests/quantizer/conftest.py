"""Small real models for quantizer tests: a tiny classifier the test trains, a tiny embedder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from training.checkpoint import HeadInfo, save_checkpoint
from training.config import ModelConfig, load_config
from training.jobs import TrainJob, run_training
from training.model import build_model
from training.trainer import TrainSettings


def _tiny(target: dict) -> ModelConfig:
    raw = json.loads(load_config("tiny-bert").to_json())
    raw["target"] = target
    return ModelConfig.model_validate(raw)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory, topics_data: Path) -> Path:
    """tiny-bert fine-tuned for 30 steps on the gettext topics (well above chance, far from perfect)."""
    out = tmp_path_factory.mktemp("tinycls") / "ckpt"
    settings = TrainSettings(batch_size=16, max_steps=30, lr=2e-3, max_length=32, progress=False)
    run_training(TrainJob(data=topics_data / "train.jsonl", out_dir=out, config="tiny-bert"), settings)
    return out


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny matching model (random weights: a real, deterministic function of the text)."""
    torch.manual_seed(0)
    model = build_model(_tiny({"name": "contrastive", "pooling": "mean", "normalize": True}))
    out = tmp_path_factory.mktemp("tinyemb") / "ckpt"
    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    save_checkpoint(out, model, HeadInfo(task="matching", max_length=128), tokenizer)
    return out
