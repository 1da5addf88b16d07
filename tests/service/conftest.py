"""Service fixtures: references for what the server returns (the repository and the running server
are shared fixtures in tests/conftest.py and tests/servers.py)."""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from service.repository import MODEL_CONFIG_FILE
from tests.servers import Server, start_server


@pytest.fixture
def private_repo(repo: Path, tmp_path: Path) -> Path:
    """A copy of the shared repository that a test may change (configs, new versions)."""
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    return copy


def set_queue_size(repo: Path, model: str, size: int) -> None:
    """Shrink a model's batch queue so that a few clients overload it."""
    path = repo / model / MODEL_CONFIG_FILE
    config = json.loads(path.read_text())
    config["batching"]["max_queue_size"] = size
    path.write_text(json.dumps(config))


class ClosedLoop:
    """``clients`` threads, each with its own client (``connect``), calling ``call`` until stopped
    and counting what each call returned (a status code, or an exception's name)."""

    def __init__(self, clients: int) -> None:
        self.codes: Counter[Any] = Counter()
        self.versions: Counter[str] = Counter()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def connect(self) -> Any:
        raise NotImplementedError

    def call(self, client: Any) -> tuple[Any, str]:
        """One call: (its outcome, the model version that answered or "")."""
        raise NotImplementedError

    def _run(self) -> None:
        client = self.connect()
        try:
            while not self.stopping.is_set():
                code, version = self.call(client)
                with self.lock:
                    self.codes[code] += 1
                    if version:
                        self.versions[version] += 1
        finally:
            client.close()

    def __enter__(self) -> ClosedLoop:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)


def assert_same_rows(served: np.ndarray, direct: np.ndarray) -> None:
    """Dynamic INT8 quantizes activations with one scale per batch, so a row's value moves slightly
    with its batch-mates: equal to the direct run up to that (cosine), not bit for bit."""
    cosine = (served * direct).sum(-1) / (np.linalg.norm(served, axis=-1) * np.linalg.norm(direct, axis=-1))
    assert served.shape == direct.shape and cosine.min() > 0.999


def _direct(repo: Path, model: str, texts: list[str]) -> np.ndarray:
    """The published graph run directly, one text at a time, as a reference for the server."""
    version = repo / model / "1"
    head = json.loads((version / "head.json").read_text())
    tokenizer = Tokenizer.from_file(str(version / "tokenizer.json"))
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    rows = []
    for text in texts:
        enc = tokenizer.encode(text)
        feed = {"input_ids": np.array([enc.ids]), "attention_mask": np.ones((1, len(enc.ids)), dtype=np.int64),
                "token_type_ids": np.array([enc.type_ids])}
        rows.append(session.run(None, {n: feed[n] for n in head["input_names"]})[0][0])
    return np.stack(rows)




# ---------------------------------------------------------------- generation (tests/service/generation_repo.py)


@pytest.fixture(scope="session")
def generation_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with the tiny random Llama (tests/tiny_llama.py), served as tiny-llm, tiny-llm-narrow and
    tiny-llm-short, beside tiny-llm-unpublished (tests/service/generation_repo.py)."""
    from .generation_repo import publish_tiny_generator

    return publish_tiny_generator(tmp_path_factory.mktemp("genrepo"), tmp_path_factory.mktemp("genwork"))


@pytest.fixture(scope="session")
def generation_server(generation_repo: Path) -> Iterator[Server]:
    running = start_server(generation_repo)
    yield running
    assert running.stop() == 0


@pytest.fixture(scope="session")
def generation_model() -> str:
    from .generation_repo import GENERATION_MODEL

    return GENERATION_MODEL


@pytest.fixture(scope="session")
def narrow_model() -> str:
    from .generation_repo import NARROW_MODEL

    return NARROW_MODEL
