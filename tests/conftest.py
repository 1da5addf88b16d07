"""Shared fixtures: the bundled MiniLM, its import into our format, the gettext topic data, a repository
published through SAMP and the real server serving it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Server, start_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from training.jobs import bundled_minilm_dir

    return bundled_minilm_dir()


@pytest.fixture(scope="session")
def minilm_checkpoint(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.jobs import import_checkpoint

    out = tmp_path_factory.mktemp("minilm") / "minilm-l6"
    import_checkpoint(minilm_dir, out)
    return out


@pytest.fixture(scope="session")
def topics_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real labelled text: English gettext messages labelled by topic (train/dev/test .jsonl)."""
    from training.data.gettext_topics import load_gettext_topics, split, write_jsonl

    out = tmp_path_factory.mktemp("topics")
    records = load_gettext_topics(max_per_topic=300, seed=0)
    for name, part in zip(("train", "dev", "test"), split(records, seed=0)):
        write_jsonl(part, out / f"{name}.jsonl")
    return out


def _tiny(target: dict):
    from training.config import ModelConfig, load_config

    raw = json.loads(load_config("tiny-bert").to_json())
    raw["target"] = target
    return ModelConfig.model_validate(raw)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory, topics_data: Path) -> Path:
    """tiny-bert fine-tuned for 30 steps on the gettext topics (well above chance, far from perfect)."""
    from training.jobs import TrainJob, run_training
    from training.trainer import TrainSettings

    out = tmp_path_factory.mktemp("tinycls") / "ckpt"
    settings = TrainSettings(batch_size=16, max_steps=30, lr=2e-3, max_length=32, progress=False)
    run_training(TrainJob(data=topics_data / "train.jsonl", out_dir=out, config="tiny-bert"), settings)
    return out


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A tiny matching model (random weights: a real, deterministic function of the text)."""
    import torch
    from tokenizers import Tokenizer

    from training.checkpoint import HeadInfo, save_checkpoint
    from training.model import build_model

    torch.manual_seed(0)
    model = build_model(_tiny({"name": "contrastive", "pooling": "mean", "normalize": True}))
    out = tmp_path_factory.mktemp("tinyemb") / "ckpt"
    tokenizer = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    save_checkpoint(out, model, HeadInfo(task="matching", max_length=128), tokenizer)
    return out


@pytest.fixture(scope="session")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's handwritten digits as PNG files and train/dev/test records (training.data.digits)."""
    from training.data.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out)
    return out


def read_splits(folder: Path) -> dict[str, list[dict]]:
    """A data set's train/dev/test records as written (paths not resolved)."""
    return {name: [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "dev", "test")}


def train_from_scratch(out: Path, config: str, data: Path, steps: int, lr: float = 1e-3) -> Path:
    """A named config trained from scratch on ``data``'s train/dev records (batch 32); its checkpoint folder."""
    from training.jobs import TrainJob, run_training
    from training.trainer import TrainSettings

    run_training(TrainJob(data=data / "train.jsonl", dev=data / "dev.jsonl", out_dir=out, config=config),
                 TrainSettings(batch_size=32, max_steps=steps, lr=lr, progress=False))
    return out


@pytest.fixture(scope="session")
def digits_vit(tmp_path_factory: pytest.TempPathFactory, digits_data: Path) -> Path:
    """vit-digits trained from scratch for 1,200 steps (~20 s on 2 cores; 0.978 held-out accuracy measured)."""
    return train_from_scratch(tmp_path_factory.mktemp("vitdigits") / "ckpt", "vit-digits", digits_data, 1200)


@pytest.fixture(scope="session")
def spoken_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 words (10 digits, 10 commands) by 150 espeak-ng voices, split by voice variant (~60 s)."""
    from tests.system_tools import system_tool
    from training.data.spoken import write_spoken

    system_tool("espeak-ng", "espeak-ng")
    out = tmp_path_factory.mktemp("spoken")
    write_spoken(out)
    return out


@pytest.fixture(scope="session")
def words_w2v(tmp_path_factory: pytest.TempPathFactory, spoken_data: Path) -> Path:
    """wav2vec2-words trained from scratch for 600 steps (~70 s on 2 cores; 0.645 on unheard voices measured)."""
    return train_from_scratch(tmp_path_factory.mktemp("w2vwords") / "ckpt", "wav2vec2-words", spoken_data, 600)


QUICK_TIMING = {"rounds": 2, "max_rounds": 2, "per_round": 1, "retries": 0, "warmup_ms": 20, "min_sample_ms": 10}
"""Timing for tests: enough to exercise the interleaved measurement, not to publish a careful ratio."""

FAST = {"latency_batches": (1,), "timing": QUICK_TIMING, "sequence_length": 32,
        "max_examples": 48,
        "calibration_batches": 2, "threads": 1, "max_candidates": 2, "mode": "blockwise"}


def samp_publish(checkpoint: Path, records: Path, root: Path, name: str, workdir: Path, **settings: object) -> Path:
    """``checkpoint`` through SAMP (FAST settings, overridden by ``settings``) on ``records``, published as
    ``root/name``; returns ``root``."""
    from quantizer.publish import publish_result
    from quantizer.samp import Samp
    from quantizer.schemas import SampSettings
    from training.checkpoint import load_checkpoint
    from training.data.tasks import read_records

    samp = Samp(load_checkpoint(checkpoint), read_records(records), SampSettings(**{**FAST, **settings}),
                workdir=workdir)
    publish_result(samp, samp.run(), root, name)
    return root


@pytest.fixture(scope="session")
def repo(tmp_path_factory, tiny_embedder, tiny_classifier, topics_data) -> Path:
    """A repository with a matching and a classification model, each published through SAMP."""
    root = tmp_path_factory.mktemp("repo")
    for name, checkpoint in (("emb", tiny_embedder), ("topics", tiny_classifier)):
        samp_publish(checkpoint, topics_data / "dev.jsonl", root, name, tmp_path_factory.mktemp(f"samp-{name}"),
                     max_drop=0.05)
    return root


@pytest.fixture(scope="session")
def server(repo: Path) -> Iterator[Server]:
    running = start_server(repo)
    yield running
    assert running.stop() == 0
