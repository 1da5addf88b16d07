"""A repository with a generation model, published as the quantizer publishes (FP32, no SAMP): the
tiny random Llama of tests/quantizer/tiny_llama.py with a ChatML chat template, served twice, as
``tiny-llm`` (the default scheduling) and as ``tiny-llm-narrow`` (one running sequence, one waiting:
a third concurrent request is refused with 429)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from service.repository import MODEL_CONFIG_FILE
from tests.servers import Server

GENERATION_MODEL = "tiny-llm"
NARROW_MODEL = "tiny-llm-narrow"
CONTEXT = 2048
"""Tokens a sequence holds: long enough that a stream of several hundred tokens is still running
when a test has disconnected from it or queued behind it."""


def publish_tiny_generator(root: Path, workdir: Path) -> Path:
    from quantizer.publish import publish_fp32
    from tests.quantizer.tiny_llama import CHAT_TEMPLATE, tiny_llama

    checkpoint = tiny_llama(workdir / "tiny-llama")
    im_end = checkpoint.tokenizer.token_to_id("<|im_end|>")
    end_of_text = checkpoint.tokenizer.token_to_id("<|endoftext|>")
    checkpoint.head = checkpoint.head.model_copy(update={
        "max_length": CONTEXT, "chat_template": CHAT_TEMPLATE, "stop_token_ids": [im_end, end_of_text],
        "eos_token": "<|im_end|>"})
    publish_fp32(checkpoint, root, GENERATION_MODEL, workdir)
    narrow = root / NARROW_MODEL
    shutil.copytree(root / GENERATION_MODEL, narrow)
    config = json.loads((narrow / MODEL_CONFIG_FILE).read_text())
    config.update(name=NARROW_MODEL, generation={"max_num_seqs": 1, "max_waiting": 1})
    (narrow / MODEL_CONFIG_FILE).write_text(json.dumps(config))
    return root


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when the series does not exist yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(server.http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_for_metric(server: Server, name: str, value: float, timeout: float = 10, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, name, **labels) != value:
        assert time.monotonic() < deadline, f"{name}{labels} never became {value}"
        time.sleep(0.01)
