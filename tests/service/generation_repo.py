"""A repository with a generation model, published as the quantizer publishes (FP32, no SAMP): the
tiny random Llama of tests/tiny_llama.py with a ChatML chat template, served as

- ``tiny-llm``: the default scheduling;
- ``tiny-llm-narrow``: one running sequence, one waiting (a third concurrent request is refused with 429);
- ``tiny-llm-short``: config.json's ``generation.max_model_len`` below head.json's max_length;
- ``tiny-llm-unpublished``: a config.json and no version yet (not ready: 503).

It is served by the real server in a subprocess (``generation_server`` in tests/service/conftest.py),
or in process (``serve_in_process``) where a test needs to reach the loaded engine or a setting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.repository import MODEL_CONFIG_FILE
from tests.servers import Server

GENERATION_MODEL = "tiny-llm"
NARROW_MODEL = "tiny-llm-narrow"
SHORT_MODEL = "tiny-llm-short"
UNPUBLISHED_MODEL = "tiny-llm-unpublished"
CONTEXT = 2048
"""Tokens a sequence holds: long enough that a stream of 2000 tokens is still running when a test
has disconnected from it or queued behind it (about a second on one core, and slower under load)."""
SHORT_CONTEXT = 64
LONG = 2000
"""max_tokens of a stream that holds its slot for the rest of a test."""


def publish_tiny_generator(root: Path, workdir: Path) -> Path:
    from quantizer.publish import publish_fp32
    from tests.tiny_llama import tiny_chat_llama

    publish_fp32(tiny_chat_llama(workdir / "tiny-llama", CONTEXT), root, GENERATION_MODEL, workdir)
    for name, generation in ((NARROW_MODEL, {"max_num_seqs": 1, "max_waiting": 1}),
                             (SHORT_MODEL, {"max_model_len": SHORT_CONTEXT})):
        shutil.copytree(root / GENERATION_MODEL, root / name)
        config = json.loads((root / name / MODEL_CONFIG_FILE).read_text())
        config.update(name=name, generation=generation)
        (root / name / MODEL_CONFIG_FILE).write_text(json.dumps(config))
    (root / UNPUBLISHED_MODEL).mkdir()
    config = json.loads((root / GENERATION_MODEL / MODEL_CONFIG_FILE).read_text())
    config.update(name=UNPUBLISHED_MODEL)
    (root / UNPUBLISHED_MODEL / MODEL_CONFIG_FILE).write_text(json.dumps(config))
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


# ---------------------------------------------------------------- the real server, in process


@dataclass
class InProcess:
    """The server's parts on the test's event loop: what it loaded, and where it listens."""

    models: Any  # service.models.ModelManager
    dataplane: Any  # service.dataplane.DataPlane
    metrics: Any  # service.metrics.Metrics
    url: str

    def count(self, model: str, endpoint: str, outcome: str) -> float:
        """sampserve_requests_total for version 1 of ``model``."""
        value = self.metrics.registry.get_sample_value(
            "sampserve_requests_total", {"model": model, "version": "1", "endpoint": endpoint, "outcome": outcome})
        return value or 0.0


@contextlib.asynccontextmanager
async def serve_in_process(repo: Path, **settings: Any) -> AsyncIterator[InProcess]:
    """The server ``service.server.serve`` builds (model manager, data plane, the REST gate and app
    under uvicorn) on a loopback port, on the caller's loop, with ``settings``. REST only: the v2
    gRPC protocol's generated module registers the same protobuf names as tritonclient's, which
    other tests import in this process; gRPC tests use the subprocess server."""
    import uvicorn

    from service.api.gate import Gate
    from service.api.rest import create_app
    from service.api.door import FastDoor
    from service.dataplane import DataPlane
    from service.metrics import Metrics
    from service.models import ModelManager
    from service.settings import Settings

    config = Settings(**{"repo": repo, "host": "127.0.0.1", "grpc_port": 0, "threads": 1, "instances": 1,
                         "access_log": False, **settings})
    metrics = Metrics()
    models = ModelManager(config, metrics)
    await models.refresh()
    dataplane = DataPlane(models, config, metrics)
    app = create_app(dataplane, metrics)
    gate = Gate(FastDoor(app, dataplane), metrics, config.max_body_bytes, config.body_timeout_s, None, False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(gate, log_config=None, log_level="warning", access_log=False,
                                           lifespan="off"))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:  # uvicorn has no event for it
            await asyncio.sleep(0.01)
        yield InProcess(models, dataplane, metrics, f"http://127.0.0.1:{sock.getsockname()[1]}")
    finally:
        server.should_exit = True
        await serving
        await models.close()
        dataplane.close()
