"""An in-process server (the real gate, app and gRPC server, on loopback ports) over a data plane whose
one generation model has a scripted engine: it streams one delta, then fails or waits until released,
and records when its generator is closed. What the real engine cannot make deterministic (a client
leaving mid-stream, an error after the first token) is tested with it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import uvicorn

from service.api.gate import Gate
from service.api.grpc import GrpcServer
from service.api.rest import create_app
from service.api.v2_infer import InferDoor
from service.dataplane import DataPlane
from service.errors import ModelNotFound, ServiceError
from service.generation import Delta, SamplingParams
from service.metrics import Metrics
from service.settings import Settings

MODEL, VERSION = "scripted", 3


class ScriptedEngine:
    """Streams "Hello" at once; then raises ``fail`` if set, else waits for ``release`` and finishes."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.release = asyncio.Event()
        self.fail: ServiceError | None = None
        self.refuse: ServiceError | None = None
        self.calls: list[tuple[list[int], SamplingParams]] = []
        self.limits = SimpleNamespace(max_model_len=ScriptedHead.max_length)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       timeout_s: float | None = None) -> AsyncIterator[Delta]:
        self.calls.append((prompt_ids, params))
        try:
            if self.refuse is not None:
                raise self.refuse
            yield Delta("Hello", [7], prompt_tokens=len(prompt_ids), completion_tokens=1)
            if self.fail is not None:
                raise self.fail
            await self.release.wait()
            yield Delta(" world", [8], "length", prompt_tokens=len(prompt_ids), completion_tokens=2)
        finally:
            self.closed.set()


class ScriptedHead:
    max_length = 64

    def encode_prompt(self, text: str, field: str = "prompt") -> list[int]:
        return [1 + ord(c) % 50 for c in text] or [1]

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class ScriptedModels:
    """What of ModelManager the generation path and the health routes call."""

    def __init__(self, engine: ScriptedEngine) -> None:
        self.loaded = SimpleNamespace(name=MODEL, version=VERSION, config=SimpleNamespace(task="generation"),
                                      head=ScriptedHead(), engine=engine)

    def generator(self, name: str, version: str | int | None = None) -> Any:
        if name != MODEL:
            raise ModelNotFound(f"model {name!r} is not in the repository")
        return self.loaded

    def ready(self) -> bool:
        return True

    def wedged(self) -> list[str]:
        return []


@dataclass
class Scripted:
    engine: ScriptedEngine
    metrics: Metrics
    url: str
    grpc_target: str
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def count(self, endpoint: str, outcome: str) -> float:
        return self.metrics.requests.labels(MODEL, str(VERSION), endpoint, outcome)._value.get()


@contextlib.asynccontextmanager
async def scripted_server(tmp_path: Path) -> AsyncGenerator[Scripted, None]:
    settings = Settings(repo=tmp_path, host="127.0.0.1", grpc_port=0, threads=1, access_log=False)
    metrics = Metrics()
    metrics.version_loaded(MODEL, VERSION)
    engine = ScriptedEngine()
    dataplane = DataPlane(ScriptedModels(engine), settings, metrics)  # type: ignore[arg-type]
    app = create_app(dataplane, metrics)
    gate = Gate(InferDoor(app, dataplane), metrics, settings.max_body_bytes, settings.body_timeout_s, None, False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(gate, log_config=None, log_level="warning", access_log=False,
                                           lifespan="off"))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    grpc_server = GrpcServer(dataplane, metrics, settings, None)
    try:
        await grpc_server.start()
        while not server.started:
            await asyncio.sleep(0.01)
        yield Scripted(engine, metrics, f"http://127.0.0.1:{sock.getsockname()[1]}",
                       f"127.0.0.1:{grpc_server.port}")
    finally:
        engine.release.set()
        await grpc_server.server.stop(None)
        server.should_exit = True
        await serving
        dataplane.close()
