"""The served models: versions loaded from the repository, hot-swapped, each behind its batcher.

A new version is loaded beside the old one (manifest checked, runtime built, warmed up) and only
then becomes the one served; a version that fails any step is recorded and never replaces a good
one. Versions the policy no longer selects are drained and unloaded.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from dataclasses import dataclass, field

import numpy as np

from service.batching import Batcher, BatchPolicy, run_in_thread
from service.errors import ModelNotFound, NotReady
from service.heads import HEADS, Encoded, TextEncoder
from service.metrics import Metrics
from service.repository import (
    MODEL_CONFIG_FILE,
    ONNX_FILE,
    RepoModelConfig,
    list_versions,
    load_model_config,
    verify,
)
from service.runtimes import RUNTIMES, Runtime
from service.settings import Settings

log = logging.getLogger("sampserve")


@dataclass
class LoadedVersion:
    name: str
    version: int
    config: RepoModelConfig
    head: TextEncoder
    runtimes: list[Runtime]
    batcher: Batcher[Encoded, np.ndarray]

    async def run(self, items: list[Encoded], timeout_s: float | None) -> np.ndarray:
        """The request admitted whole; each input batched on its own (grouped by length); rows in order."""
        rows = await self.batcher.submit_many([(item, item.length) for item in items], timeout_s)
        return np.stack(rows)


@dataclass
class ModelState:
    config: RepoModelConfig
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def latest(self) -> LoadedVersion | None:
        return self.versions[max(self.versions)] if self.versions else None


class ModelManager:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ModelState] = {}
        self.config_errors: dict[str, str] = {}
        self._poller: asyncio.Task[None] | None = None

    # -- lookup -----------------------------------------------------------------------------

    def get(self, name: str, version: str | int | None = None) -> LoadedVersion:
        state = self.models.get(name)
        if state is None:
            raise ModelNotFound(f"model {name!r} is not in the repository; models: {sorted(self.models)}")
        if version in (None, ""):
            if state.latest is None:
                raise NotReady(f"model {name!r} has no ready version yet")
            return state.latest
        try:
            number = int(version)  # type: ignore[arg-type]
        except ValueError:
            raise ModelNotFound(f"version {version!r} of model {name!r} is not a number") from None
        if number not in state.versions:
            raise ModelNotFound(f"version {number} of model {name!r} is not loaded; loaded: {sorted(state.versions)}")
        return state.versions[number]

    def ready(self) -> bool:
        """Every configured model has a ready version."""
        return bool(self.models) and all(s.versions for s in self.models.values()) and not self.config_errors

    # -- loading ----------------------------------------------------------------------------

    def _build(self, name: str, config: RepoModelConfig, version: int) -> LoadedVersion:
        path = self.settings.repo / name / str(version)
        verify(path)
        head_class = HEADS.get(config.task)
        if head_class is None:
            raise ValueError(f"task {config.task!r} is not served yet")
        head = head_class(path)
        count = config.batching.instances or self.settings.instances
        runtimes = [RUNTIMES["onnxruntime"](path / ONNX_FILE, self.settings.threads, count == 1) for _ in range(count)]
        idle: queue.SimpleQueue[Runtime] = queue.SimpleQueue()
        warm_up = head.collate(head.encode(["warm up"], truncate=True))
        for runtime in runtimes:
            runtime.run(warm_up)  # one real forward pass each before the version may take traffic
            idle.put(runtime)
        policy = BatchPolicy(max_batch_size=config.batching.max_batch_size,
                             max_batch_tokens=config.batching.max_batch_tokens,
                             max_queue_size=config.batching.max_queue_size)
        compute = self.metrics.compute_time.labels(name, str(version))

        def run_batch(items: list[Encoded]) -> list[np.ndarray]:
            runtime = idle.get_nowait()  # the batcher runs at most `count` batches at once
            try:
                start = time.perf_counter()
                out = runtime.run(head.collate(items))
                compute.observe(time.perf_counter() - start)
            finally:
                idle.put(runtime)
            return list(out)

        batcher: Batcher[Encoded, np.ndarray] = Batcher(run_in_thread(run_batch), policy,
                                                       self.metrics.observer(name, version), concurrency=count)
        return LoadedVersion(name, version, config, head, runtimes, batcher)

    async def refresh(self) -> None:
        """Bring the served set in line with the repository: load new versions, drop removed ones."""
        repo = self.settings.repo
        names = sorted(p.name for p in repo.iterdir() if (p / MODEL_CONFIG_FILE).exists()) if repo.exists() else []
        for name in names:
            try:
                config = load_model_config(repo / name)
            except ValueError as exc:
                if name not in self.models:
                    self.config_errors[name] = str(exc)
                log.error("model %s: %s", name, exc)
                continue
            self.config_errors.pop(name, None)
            state = self.models.setdefault(name, ModelState(config))
            available = list_versions(repo / name)
            while True:  # until every wanted version is loaded; failures drop out of the choice
                wanted = config.version_policy.select([v for v in available if v not in state.failed])
                missing = [v for v in wanted if v not in state.versions]
                if not missing:
                    break
                for version in missing:
                    await self._load(name, config, version, state)
            for version in [v for v in state.versions if v not in wanted]:
                old = state.versions.pop(version)
                self.metrics.loaded.labels(name, str(version)).set(0)
                await old.batcher.close(drain=True)
                log.info("model %s version %d unloaded", name, version)
            self.metrics.ready.labels(name).set(1 if state.versions else 0)
        for name in self.config_errors:
            if name not in self.models:
                self.metrics.ready.labels(name).set(0)

    async def _load(self, name: str, config: RepoModelConfig, version: int, state: ModelState) -> None:
        try:
            loaded = await asyncio.to_thread(self._build, name, config, version)
        except Exception as exc:  # a bad version never replaces a good one
            state.failed[version] = f"{type(exc).__name__}: {exc}"
            self.metrics.load_failures.labels(name, str(version)).inc()
            log.error("model %s version %d failed to load: %s", name, version, exc)
            return
        state.versions[version] = loaded
        self.metrics.loaded.labels(name, str(version)).set(1)
        self.metrics.queue_capacity.labels(name, str(version)).set(loaded.batcher.policy.max_queue_size)
        log.info("model %s version %d loaded", name, version)

    async def start_polling(self) -> None:
        async def poll() -> None:
            while True:
                await asyncio.sleep(self.settings.poll_interval_s)
                try:
                    await self.refresh()
                except Exception:  # keep polling; the error is in the log
                    log.exception("repository refresh failed")

        self._poller = asyncio.get_running_loop().create_task(poll())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for state in self.models.values():
            for loaded in state.versions.values():
                await loaded.batcher.close(drain=True)

