"""The served models: versions loaded from the repository, hot-swapped, each behind its batcher
(encoder tasks) or its generation engine (task "generation").

A new version is loaded beside the old one (manifest checked, runtime built, warmed up) and only
then becomes the one served; a version that fails any step is recorded, never replaces a good one,
and is tried again with back-off. Versions the policy no longer selects are drained and unloaded.

Every model folder is reported on its own: one whose config is invalid, whose task this server has
no head for, or that has no loadable version yet is "not ready, because ..." (per-model readiness
and metadata carry the reason) without taking the other models, or the server, out of rotation.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service import tracing
from service.batching import Batcher, BatchPolicy
from service.errors import Forbidden, InvalidInput, LoadFailed, ModelNotFound, NotReady, shorten
from service.generation.engine import GenerationEngine, warm_up
from service.generation.graph import DecoderGraph
from service.generation.scheduler import EngineLimits
from service.heads import HEADS, Encoded, EncoderHead, GenerationHead, TensorItem, make_head
from service.instances import InstancePool, call_in_thread
from service.metrics import Metrics
from service.provenance import HostInfo, host_info, mismatch
from service.repository import (
    MODEL_CONFIG_FILE,
    ONNX_FILE,
    GenerationConfig,
    RepoModelConfig,
    list_versions,
    load_model_config,
    verify,
)
from service.runtimes import RUNTIMES, RuntimeInfo, RuntimeSpec
from service.settings import Settings

log = logging.getLogger("sampserve")
MAX_RETRY_S = 3600.0
HELD_REASON = ("not loaded (model control mode explicit: POST /v2/repository/models/<model>/load, or tritonclient's "
               "load_model, loads it)")
READY, UNAVAILABLE = "READY", "UNAVAILABLE"


@dataclass(frozen=True)
class IndexEntry:
    """One row of the v2 repository index (Triton's and MLServer's shape): a version, or a model without one."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class Tuning:
    """What the publisher recorded about a version's plan: the machine it was measured on (and why this
    host may not match it) and whether its outputs depend on batch-mates."""

    tuned_on: HostInfo | None
    warning: str
    """Non-empty when the host's INT8 instruction class differs from the recorded one."""
    batch_invariance: dict | None = None
    """{"invariant", "batch_cosine", "required"} as SAMP measured them; None when not recorded."""

    @classmethod
    def of(cls, metadata: dict, host: HostInfo) -> Tuning:
        recorded = metadata.get("provenance")
        tuned_on = HostInfo.model_validate(recorded) if isinstance(recorded, dict) else None
        invariance = metadata.get("batch_invariance")
        return cls(tuned_on, mismatch(tuned_on, host), invariance if isinstance(invariance, dict) else None)

    def parameters(self) -> dict:
        """The metadata parameters clients see: where the plan was tuned, any warning, batch invariance."""
        recorded = self.tuned_on
        return {"tuned_on": None if recorded is None else f"{recorded.cpu} ({recorded.int8_class}, onnxruntime "
                f"{recorded.onnxruntime}, {recorded.threads} threads)", "tuning_warning": self.warning,
                "batch_invariance": self.batch_invariance}


@dataclass
class LoadedVersion:
    name: str
    version: int
    config: RepoModelConfig
    head: EncoderHead
    pool: InstancePool
    batcher: Batcher[Encoded | TensorItem, np.ndarray]
    max_texts: int
    """Most inputs one request may queue: below the queue size, so one request cannot fill it."""
    width: int
    """Length of one output row (embedding size or number of classes), measured by the warm-up pass."""
    runtime: RuntimeInfo
    """What runs the version (engine, device, providers or plan)."""
    tuning: Tuning = field(default_factory=lambda: Tuning(None, ""))

    async def run(self, items: list[Encoded] | list[TensorItem], timeout_s: float | None) -> np.ndarray:
        """The request admitted whole; each input batched on its own (grouped by length); rows in order."""
        timings: list[tuple[float, float, float]] | None = [] if tracing.enabled() else None
        rows = await self.batcher.submit_many([(item, item.length) for item in items], timeout_s, timings)
        for queued, started, finished in timings or ():
            tracing.record("queue", queued, started, model=self.name, version=self.version)
            tracing.record("compute", started, finished, model=self.name, version=self.version)
        return np.stack(rows)

    def wedged(self, max_hung_calls: int) -> bool:
        return self.pool.hung >= max_hung_calls

    @property
    def queue_capacity(self) -> int:
        return self.batcher.policy.max_queue_size

    async def close(self, drain: bool = True) -> None:
        await self.batcher.close(drain=drain)
        self.pool.close()


@dataclass
class GenerationVersion:
    """A loaded generation version: its head (tokenizer, chat template) and its engine."""

    name: str
    version: int
    config: RepoModelConfig
    head: GenerationHead
    engine: GenerationEngine
    tuning: Tuning = field(default_factory=lambda: Tuning(None, ""))

    @property
    def runtime(self) -> RuntimeInfo:
        """Generation runs its decoder graph on onnxruntime (the KV-cache step loop)."""
        from service.runtimes.onnxruntime import session_info

        return session_info(self.engine.graph.session)

    def wedged(self, max_hung_calls: int) -> bool:
        """The engine's step loop stopped on a bug while the version is served."""
        return not self.engine.alive

    @property
    def queue_capacity(self) -> int:
        return self.engine.limits.max_waiting

    async def close(self, drain: bool = True) -> None:
        await self.engine.close(drain=drain)


ServedVersion = LoadedVersion | GenerationVersion


@dataclass
class Failure:
    """A version that failed to load, and when it is tried again."""

    reason: str
    attempts: int
    retry_at: float


@dataclass
class ModelState:
    config: RepoModelConfig | None
    versions: dict[int, ServedVersion] = field(default_factory=dict)
    failed: dict[int, Failure] = field(default_factory=dict)
    problem: str | None = None
    """Why the model cannot be served at all (invalid config, a task without a head)."""
    available: list[int] = field(default_factory=list)
    held: bool = False
    """Not loaded on purpose: explicit model control, and no load call (or an unload) for it."""
    told_empty: bool = False
    """The log has said this model has no version (said again only after it had one)."""

    @property
    def latest(self) -> ServedVersion | None:
        return self.versions[max(self.versions)] if self.versions else None

    def reason(self) -> str:
        """Why the model has no ready version (empty when it has one)."""
        if self.versions:
            return ""
        if self.problem:
            return self.problem
        if self.held:
            return HELD_REASON
        if not self.available:
            return "no version published yet"
        if self.failed:
            return "; ".join(f"version {v} failed to load: {f.reason}" for v, f in sorted(self.failed.items()))
        return "loading"


class ModelManager:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ModelState] = {}
        self._poller: asyncio.Task[None] | None = None
        self._refreshing = asyncio.Lock()
        self.host = host_info(settings.threads)
        explicit = settings.model_control_mode == "explicit"
        self.wanted: set[str] | None = {n for n in settings.load_models if n != "*"} if explicit else None
        """The models to serve under explicit control (None: every model folder)."""
        self._load_all_at_start = explicit and "*" in settings.load_models

    # -- lookup -----------------------------------------------------------------------------

    def state(self, name: str) -> ModelState:
        state = self.models.get(name)
        if state is None:
            raise ModelNotFound(f"model {shorten(name)} is not in the repository; models: {sorted(self.models)}")
        return state

    def get(self, name: str, version: str | int | None = None) -> LoadedVersion:
        """The encoder version to run: the newest loaded one, or the one asked for."""
        loaded = self.served(name, version)
        if isinstance(loaded, GenerationVersion):
            raise InvalidInput(f"model {name!r} generates text; use the completions or generate endpoints")
        return loaded

    def generator(self, name: str, version: str | int | None = None) -> GenerationVersion:
        """The generation version to run: the newest loaded one, or the one asked for."""
        loaded = self.served(name, version)
        if not isinstance(loaded, GenerationVersion):
            raise InvalidInput(f"model {name!r} does not generate text (task {loaded.config.task!r})")
        return loaded

    def served(self, name: str, version: str | int | None = None) -> ServedVersion:
        """The version, whatever its task (metadata): the newest loaded one, or the one asked for."""
        state = self.state(name)
        if version is None or version == "":
            if state.latest is None:
                raise NotReady(f"model {name!r} is not ready: {state.reason()}")
            return state.latest
        number = _version_number(name, version)
        if number not in state.versions:
            raise ModelNotFound(f"version {number} of model {name!r} is not loaded; loaded: {sorted(state.versions)}")
        return state.versions[number]

    def readiness(self, name: str, version: str | int | None = None) -> tuple[bool, str]:
        """(ready, reason) of a model or one of its versions. Unknown models and versions raise
        ModelNotFound (404): a version that was never published is not "not ready", it does not exist."""
        state = self.state(name)
        if version is None or version == "":
            return bool(state.versions), state.reason()
        number = _version_number(name, version)
        if number in state.versions:
            return True, ""
        if number in state.failed:
            return False, f"version {number} failed to load: {state.failed[number].reason}"
        if number in state.available:
            return False, f"version {number} is published but not selected by the version policy, or loading"
        raise ModelNotFound(f"version {number} of model {name!r} does not exist; published: {state.available}")

    def ready(self) -> bool:
        """Server readiness. Strict: every model folder has a ready version. Otherwise one is enough,
        so a broken or not-yet-published model does not take every replica out of rotation. Under
        explicit control only the models asked for count, and none asked for is ready (as Triton)."""
        if self.wanted is not None:
            states = [self.models[n] for n in self.wanted if n in self.models]
            if not states:
                return True
        else:
            states = list(self.models.values())
            if not states:
                return False
        return (all if self.settings.strict_readiness else any)(s.versions for s in states)

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model folder of the repository (read now) with its versions' states."""
        entries: list[IndexEntry] = []
        for name in sorted(set(repository_names(self.settings.repo)) | set(self.models)):
            state = self.models.get(name)
            if state is None:
                rows = [IndexEntry(name, "", UNAVAILABLE, "not loaded yet (new in the repository)")]
            else:
                rows = [IndexEntry(name, str(v), READY, "") for v in sorted(state.versions)]
                rows += [IndexEntry(name, str(v), UNAVAILABLE, f.reason) for v, f in sorted(state.failed.items())
                         if v not in state.versions]
                rows = rows or [IndexEntry(name, "", UNAVAILABLE, state.reason())]
            entries += [row for row in rows if row.state == READY or not ready_only]
        return entries

    def _check_explicit(self, action: str) -> set[str]:
        if self.wanted is None:
            raise Forbidden(f"{action} needs model control mode explicit (SAMPSERVE_MODEL_CONTROL_MODE); this server "
                            f"runs in {self.settings.model_control_mode!r} mode")
        return self.wanted

    async def load(self, name: str) -> None:
        """Load (or reload: new versions in, withdrawn ones out) a model; versions that failed before are
        tried again now. Refused outside explicit control; LoadFailed when no version loads."""
        wanted = self._check_explicit("loading a model")
        if name not in repository_names(self.settings.repo):
            raise ModelNotFound(f"model {shorten(name)} is not in the repository (no {MODEL_CONFIG_FILE})")
        async with self._refreshing:
            wanted.add(name)
            if name in self.models:
                self.models[name].failed.clear()
            await self._refresh_model(name)
            state = self.models[name]
            if not state.versions:
                reason = state.reason()
                wanted.discard(name)
                await self._refresh_model(name)
                raise LoadFailed(f"model {name!r} did not load: {reason}")

    async def unload(self, name: str) -> None:
        """Stop serving a model: its queued requests finish, new ones get 503 with the reason."""
        wanted = self._check_explicit("unloading a model")
        if name not in self.models and name not in repository_names(self.settings.repo):
            raise ModelNotFound(f"model {shorten(name)} is not in the repository")
        async with self._refreshing:
            wanted.discard(name)
            if name in self.models:
                await self._refresh_model(name)

    def wedged(self) -> list[str]:
        """Versions with at least ``max_hung_calls`` runtime calls stuck, or whose generation loop
        stopped: liveness turns false, so the orchestrator restarts the process (a stuck thread
        cannot be killed from inside)."""
        return [f"{loaded.name}/{loaded.version}" for state in self.models.values()
                for loaded in state.versions.values() if loaded.wedged(self.settings.max_hung_calls)]

    # -- loading ----------------------------------------------------------------------------

    def _build(self, name: str, config: RepoModelConfig, version: int) -> ServedVersion:
        """Load, check and warm up one version (blocking: runs on a thread of its own)."""
        path = self.settings.repo / name / str(version)
        manifest = verify(path)
        head = make_head(config.task, path)
        if isinstance(head, GenerationHead):
            loaded: ServedVersion = self._build_generator(name, config, version, head)
        else:
            loaded = self._build_encoder(name, config, version, head)
        loaded.tuning = Tuning.of(manifest.metadata, self.host)
        if loaded.tuning.warning:
            log.warning("%s/%s: %s", name, version, loaded.tuning.warning)
        return loaded

    def _build_generator(self, name: str, config: RepoModelConfig, version: int,
                         head: GenerationHead) -> GenerationVersion:
        """The decoder graph checked against head.json, warmed up (one prefill and one decode step),
        and its engine's step loop started."""
        path = self.settings.repo / name / str(version)
        limits = engine_limits(config.generation or GenerationConfig(), head.max_length,
                               self.settings.repo / name / MODEL_CONFIG_FILE)
        if config.runtime != "onnxruntime":
            raise ValueError(f"runtime {config.runtime!r}: generation runs on onnxruntime only")
        graph = DecoderGraph.load(path / ONNX_FILE, head.generation, self.settings.threads)
        if graph.fixed_batch is not None and graph.fixed_batch < limits.max_num_seqs:
            raise ValueError(f"the decoder graph takes batches of exactly {graph.fixed_batch} rows, but "
                             f"generation.max_num_seqs={limits.max_num_seqs}: re-export it with a dynamic batch "
                             f"axis (sampserve quantize does), or set max_num_seqs to {graph.fixed_batch} in "
                             f"{self.settings.repo / name / MODEL_CONFIG_FILE}")
        warm_up(graph, head.pad_id)
        engine = GenerationEngine(graph, head.tokenizer, limits, head.stop_token_ids, head.pad_id,
                                  self.metrics.generation(name, version), name=f"{name}/{version}")
        engine.start()
        return GenerationVersion(name, version, config, head, engine)

    def _build_encoder(self, name: str, config: RepoModelConfig, version: int, head: EncoderHead) -> LoadedVersion:
        path = self.settings.repo / name / str(version)
        if head.max_length > config.batching.max_batch_tokens:
            raise ValueError(f"batching.max_batch_tokens={config.batching.max_batch_tokens} is below the model's "
                             f"max_length={head.max_length}: one long input could never run; raise "
                             f"max_batch_tokens in {self.settings.repo / name / MODEL_CONFIG_FILE}")
        factory = RUNTIMES.get(config.runtime)
        if factory is None:
            raise ValueError(f"runtime {config.runtime!r} is not registered; runtimes: {sorted(RUNTIMES)}")
        count = config.batching.instances or self.settings.instances
        hung = self.metrics.hung_calls.labels(name, str(version))
        spec = RuntimeSpec(
            version_dir=path, input_names=tuple(head.meta.input_names), threads=self.settings.threads,
            spinning=count == 1, disabled_optimizers=tuple(head.meta.disabled_optimizers or ()), ort=config.onnxruntime,
            ort_providers=tuple(self.settings.ort_providers), engine_cache=self.settings.engine_cache.expanduser(),
            torch=config.pytorch, max_batch_size=config.batching.max_batch_size, max_length=head.max_length)
        pool = InstancePool(lambda: factory(spec), count, self.settings.runtime_timeout_s, f"{name}/{version}",
                            on_hung=hung.set)
        warm_up = head.collate(head.warm_up_items())  # type: ignore[arg-type]
        pool.start(warm_up)  # one real forward pass each before the version may take traffic
        width = int(pool.runtimes[0].run(warm_up).shape[-1])
        policy = BatchPolicy(max_batch_size=config.batching.max_batch_size,
                             max_batch_tokens=config.batching.max_batch_tokens,
                             max_queue_size=config.batching.max_queue_size)
        compute = self.metrics.compute_time.labels(name, str(version))

        async def run_batch(items: list[Encoded | TensorItem]) -> list[np.ndarray]:
            start = time.perf_counter()
            out = await pool.run(head.collate(items), warm_up)  # type: ignore[arg-type]  # its own head's items
            compute.observe(time.perf_counter() - start)
            return list(out)

        batcher: Batcher[Encoded | TensorItem, np.ndarray] = Batcher(
            run_batch, policy, self.metrics.observer(name, version), concurrency=count)
        max_texts = max(1, min(self.settings.max_texts_per_request, policy.max_queue_size // 2))
        return LoadedVersion(name, version, config, head, pool, batcher, max_texts, width, pool.runtimes[0].info)

    def _read_config(self, name: str) -> RepoModelConfig:
        config = load_model_config(self.settings.repo / name)
        if config.task not in HEADS:
            raise ValueError(f"task {config.task!r} is not served by this server (tasks: {sorted(HEADS)})")
        return config

    async def refresh(self) -> None:
        """Bring the served set in line with the repository: load new versions, drop removed ones."""
        async with self._refreshing:
            await self._refresh()

    async def _refresh(self) -> None:
        names = repository_names(self.settings.repo)
        if self._load_all_at_start and self.wanted is not None:
            self.wanted |= set(names)
            self._load_all_at_start = False
        for gone in [n for n in self.models if n not in names]:
            await self._forget(gone)
        for name in names:
            await self._refresh_model(name)

    async def _refresh_model(self, name: str) -> None:
        """One model in line with its folder (and, under explicit control, with whether it was asked for)."""
        repo = self.settings.repo
        if not (repo / name / MODEL_CONFIG_FILE).exists():
            if name in self.models:
                await self._forget(name)
            return
        state = self.models.get(name)
        try:
            config = self._read_config(name)
        except ValueError as exc:
            if state is None or state.problem != str(exc):
                log.error("model %s not served: %s", name, exc)
            if state is None:
                state = self.models[name] = ModelState(None)
                self.metrics.model_known(name)
            state.problem = str(exc)  # a model already serving keeps its loaded versions
            self.metrics.ready.labels(name).set(1 if state.versions else 0)
            return
        if state is None:
            state = self.models[name] = ModelState(config)
            self.metrics.model_known(name)
        state.config, state.problem = config, None
        state.held = self.wanted is not None and name not in self.wanted
        state.available = list_versions(repo / name)
        now = time.monotonic()
        for version in [v for v in state.failed if v not in state.available]:
            del state.failed[version]
        while True:  # until every wanted version is loaded; failures drop out of the choice
            blocked = [v for v, f in state.failed.items() if f.retry_at > now]
            wanted = [] if state.held else config.version_policy.select(
                [v for v in state.available if v not in blocked])
            missing = [v for v in wanted if v not in state.versions and v not in blocked]
            if not missing:
                break
            for version in missing:
                await self._load(name, config, version, state)
            now = time.monotonic()
        for version in [v for v in state.versions if v not in wanted]:
            await self._unload(state, version)
        empty = not state.versions and not state.available and not state.held
        if empty and not state.told_empty:  # once, not at every poll
            log.warning("model %s not ready: no version published yet in %s (publish one with `sampserve up` "
                        "or `sampserve quantize`)", name, repo / name)
        state.told_empty = empty
        self.metrics.ready.labels(name).set(1 if state.versions else 0)

    async def _load(self, name: str, config: RepoModelConfig, version: int, state: ModelState) -> None:
        try:
            loaded = await asyncio.wrap_future(call_in_thread(self._build, name, config, version))
        except Exception as exc:  # a bad version never replaces a good one; tried again later
            previous = state.failed.get(version)
            attempts = previous.attempts + 1 if previous else 1
            wait = min(MAX_RETRY_S, self.settings.retry_failed_s * 2 ** (attempts - 1))
            state.failed[version] = Failure(f"{type(exc).__name__}: {exc}", attempts, time.monotonic() + wait)
            self.metrics.load_failures.labels(name, str(version)).inc()
            log.error("model %s version %d failed to load (attempt %d, next in %.0fs): %s", name, version,
                      attempts, wait, exc)
            return
        state.failed.pop(version, None)
        state.versions[version] = loaded
        self.metrics.version_loaded(name, version, loaded.runtime.runtime, loaded.runtime.device)
        self.metrics.queue_capacity.labels(name, str(version)).set(loaded.queue_capacity)
        if isinstance(loaded, GenerationVersion):
            log.info("model %s version %d loaded (generation: %s; %s)", name, version, loaded.engine.limits,
                     loaded.runtime.describe())
        else:
            log.info("model %s version %d loaded (%d instances, %s)", name, version, loaded.pool.instances,
                     loaded.runtime.describe())

    async def _unload(self, state: ModelState, version: int) -> None:
        old = state.versions.pop(version)
        await old.close(drain=True)
        self.metrics.version_unloaded(old.name, version)
        log.info("model %s version %d unloaded", old.name, version)

    async def _forget(self, name: str) -> None:
        state = self.models.pop(name)
        for version in list(state.versions):
            await self._unload(state, version)
        self.metrics.model_forgotten(name)
        log.info("model %s removed from the repository", name)

    async def start_polling(self) -> None:
        """Poll the repository (model control mode poll); the other modes change only by API or not at all."""
        if self.settings.model_control_mode != "poll":
            return

        async def poll() -> None:
            while True:
                await asyncio.sleep(self.settings.poll_interval_s)
                try:
                    await self.refresh()
                except Exception:  # keep polling; the error is in the log
                    log.exception("repository refresh failed")

        self._poller = asyncio.get_running_loop().create_task(poll())

    def abort_generation(self, reason: str) -> None:
        """End every generation stream with an error now (the drain grace is about to run out)."""
        for state in self.models.values():
            for loaded in state.versions.values():
                if isinstance(loaded, GenerationVersion):
                    loaded.engine.abort(reason)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        for state in self.models.values():
            for loaded in state.versions.values():
                await loaded.close(drain=True)


def engine_limits(config: GenerationConfig, model_max_length: int, config_path: Path) -> EngineLimits:
    """The engine's caps from config.json's generation block and head.json's max_length; a
    combination under which some request could never run fails the load, naming the setting."""
    max_model_len = config.max_model_len or model_max_length
    if max_model_len > model_max_length:
        raise ValueError(f"generation.max_model_len={max_model_len} is above the model's max_length="
                         f"{model_max_length} (head.json); lower it in {config_path}")
    max_kv_tokens = config.max_kv_tokens or config.max_num_seqs * max_model_len
    for setting, value in (("max_batch_prefill_tokens", config.max_batch_prefill_tokens),
                           ("max_kv_tokens", max_kv_tokens)):
        if value < max_model_len:
            raise ValueError(f"generation.{setting}={value} is below max_model_len={max_model_len}: a long "
                             f"sequence could never run; raise it (or lower max_model_len) in {config_path}")
    return EngineLimits(max_num_seqs=config.max_num_seqs, max_batch_prefill_tokens=config.max_batch_prefill_tokens,
                        max_kv_tokens=max_kv_tokens, max_model_len=max_model_len, max_waiting=config.max_waiting,
                        continuous=config.continuous_batching)


def _version_number(name: str, version: str | int) -> int:
    try:
        return int(version)
    except ValueError:
        raise ModelNotFound(f"version {shorten(str(version))} of model {name!r} is not a number") from None


def repository_names(repo: Path) -> list[str]:
    """The model folders of a repository (those with a config.json)."""
    return sorted(p.name for p in repo.iterdir() if (p / MODEL_CONFIG_FILE).exists()) if repo.is_dir() else []
