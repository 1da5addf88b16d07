"""Service fixtures: references for what the server returns (the repository and the running server
are shared fixtures in tests/conftest.py and tests/servers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


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


