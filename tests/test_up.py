"""``sampserve up --fp32``: the fast start publishes the default embedder unquantized, a server serves it
with sentence-transformers' numbers, and the SAMP build that follows publishes over it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from sampserve.up import DEFAULT_MODEL, needs_version
from service.repository import list_versions, load_manifest, verify
from tests.servers import start_server


def test_up_fp32_publishes_the_unquantized_embedder_that_serves_sentence_transformers_numbers(tmp_path: Path):
    from sentence_transformers import SentenceTransformer

    from training.jobs import bundled_minilm_dir

    repo, workdir = tmp_path / "repo", tmp_path / "runs"
    command = [sys.executable, "-m", "sampserve.cli", "up", "--fp32", "--no-serve", "--workdir", str(workdir),
               "--repo", str(repo)]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    assert list_versions(repo / DEFAULT_MODEL) == [1]
    manifest = verify(repo / DEFAULT_MODEL / "1")
    assert manifest.metadata["quantized"] is False and "model.onnx" in manifest.files
    print(f"sampserve up --fp32 --no-serve took {took:.1f} s")

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already has version 1" in again.stdout
    console = Console(record=True, width=200)
    assert needs_version(repo / DEFAULT_MODEL, rebuild=False, console=console)  # the SAMP build publishes v2
    assert "is FP32" in console.export_text()
    assert load_manifest(repo / DEFAULT_MODEL / "1").version == 1

    texts = ["hello world", "the file could not be opened"]
    reference = SentenceTransformer(str(bundled_minilm_dir()), device="cpu").encode(texts)
    server = start_server(repo)
    try:
        reply = server.http.post("/v1/embeddings", json={"model": DEFAULT_MODEL, "input": texts})
        assert reply.status_code == 200, reply.text
        served = np.array([row["embedding"] for row in reply.json()["data"]])
    finally:
        assert server.stop() == 0
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert np.min(np.sum(served * reference, axis=1)) > 0.99999
