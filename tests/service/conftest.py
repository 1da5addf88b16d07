"""Service fixtures: a repository published through SAMP, and the real server as a subprocess on free
loopback ports (REST and gRPC), stopped with SIGTERM and required to exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from quantizer.publish import publish_result
from quantizer.samp import Samp, SampSettings
from training.checkpoint import load_checkpoint
from training.data.tasks import read_records

FAST = {"latency_batches": (1,), "repeats": 1, "sequence_length": 32, "max_examples": 48,
        "calibration_batches": 2, "threads": 1, "max_candidates": 2, "mode": "dynamic"}


@pytest.fixture(scope="session")
def repo(tmp_path_factory, tiny_embedder, tiny_classifier, topics_data) -> Path:
    """A repository with a matching and a classification model, each published through SAMP."""
    root = tmp_path_factory.mktemp("repo")
    records = read_records(topics_data / "dev.jsonl")
    for name, checkpoint in (("emb", tiny_embedder), ("topics", tiny_classifier)):
        samp = Samp(load_checkpoint(checkpoint), records, SampSettings(max_drop=0.05, **FAST),
                    workdir=tmp_path_factory.mktemp(f"samp-{name}"))
        publish_result(samp, samp.run(), root, name)
    return root


class Server:
    def __init__(self, process: subprocess.Popen, url: str, grpc_target: str) -> None:
        self.process, self.url, self.grpc_target = process, url, grpc_target
        self.http = httpx.Client(base_url=url, timeout=30)


def start_server(repo: Path, *extra: str) -> Server:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "sampserve.cli", "serve", "--repo", str(repo), "--http-port", "0", "--grpc-port", "0",
         "--threads", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 60
    url = None
    lines = []
    while time.monotonic() < deadline and process.poll() is None:
        line = process.stdout.readline()  # type: ignore[union-attr]
        lines.append(line)
        if "REST on " in line:
            url = line.split("REST on ", 1)[1].split()[0]
            grpc_target = line.split("gRPC on ", 1)[1].split()[0]
            break
    if url is None:
        process.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines))
    server = Server(process, url, grpc_target)
    while time.monotonic() < deadline:
        if server.http.get("/v2/health/ready").status_code == 200:
            return server
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("server never became ready")


@pytest.fixture(scope="session")
def server(repo) -> Iterator[Server]:
    running = start_server(repo)
    yield running
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(timeout=30) == 0


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


