"""Shared fixtures: the bundled MiniLM, its import into our format, and the gettext topic data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
