"""Batch invariance through the server: one text's embedding, asked again and again while 16 other
clients' texts share its batches, against the answer it gets alone. all-MiniLM-L6-v2 in the blockwise
INT8 form keeps it; the dynamic form (one activation scale per batch) is the contrast that shows the
check can fail."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from quantizer.publish import ensure_model_config, served_head
from quantizer.samp import Samp
from quantizer.schemas import SampSettings
from service.repository import HEAD_FILE, ONNX_FILE, TOKENIZER_FILE, publish
from tests.servers import start_server
from training.checkpoint import load_checkpoint, raw_tokenizer
from training.data.tasks import read_records

from .conftest import ClosedLoop

PROBE = "hello world"


class Neighbours(ClosedLoop):
    """Clients sending other short texts of different lengths to the same model."""

    def __init__(self, url: str, model: str, clients: int) -> None:
        super().__init__(clients)
        self.url, self.model = url, model

    def connect(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def call(self, client: httpx.Client) -> tuple[int, str]:
        texts = ["cannot open the file for writing", "ok", "the remote end hung up unexpectedly while pushing "
                 "a very long list of references to the server"]
        response = client.post("/v1/embeddings", json={"model": self.model, "input": texts})
        return response.status_code, ""


@pytest.fixture(scope="module")
def forms_repo(minilm_checkpoint: Path, topics_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 with every unit in INT8, once per form, published as two models."""
    checkpoint = load_checkpoint(minilm_checkpoint)
    settings = SampSettings(max_examples=24, calibration_batches=2, sequence_length=32, threads=1)
    samp = Samp(checkpoint, read_records(topics_data / "dev.jsonl"), settings,
                workdir=tmp_path_factory.mktemp("forms"))
    everything = frozenset(u.name for u in samp.units)
    root = tmp_path_factory.mktemp("forms-repo")
    for form in ("blockwise", "dynamic"):
        model_dir = root / f"minilm-{form}"
        ensure_model_config(model_dir, checkpoint, max_drop=0.01)
        publish(model_dir, {ONNX_FILE: samp.build(everything, form),
                            TOKENIZER_FILE: raw_tokenizer(checkpoint.tokenizer).to_str().encode(),
                            HEAD_FILE: served_head(checkpoint, samp.info).to_json()}, {"mode": form})
    return root


def _embed(http: httpx.Client, model: str) -> np.ndarray:
    response = http.post("/v1/embeddings", json={"model": model, "input": [PROBE]})
    assert response.status_code == 200, response.text
    return np.array(response.json()["data"][0]["embedding"], dtype=np.float64)


def _worst_cosine_under_load(server, model: str) -> float:
    alone = _embed(server.http, model)
    worst = 1.0
    with Neighbours(server.url, model, clients=16) as load:
        time.sleep(0.5)
        for _ in range(20):
            shared = _embed(server.http, model)
            worst = min(worst, float(alone @ shared / np.linalg.norm(alone) / np.linalg.norm(shared)))
    assert load.codes[200] > 100 and set(load.codes) == {200}, load.codes  # the neighbours were served
    return worst


def test_a_batch_invariant_plan_answers_the_same_whoever_else_is_calling(forms_repo: Path) -> None:
    server = start_server(forms_repo)
    try:
        invariant = _worst_cosine_under_load(server, "minilm-blockwise")
        dependent = _worst_cosine_under_load(server, "minilm-dynamic")
    finally:
        assert server.stop() == 0
    assert invariant >= 0.9999, invariant
    assert dependent < 0.9999, dependent  # the same request, different vectors at different moments
