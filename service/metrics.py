"""Prometheus metrics, labelled by model and version. Names are stable once published.

Label values never come from a client: a request naming a model or version that is not served is
counted under the one fixed label ``UNKNOWN`` (a client sending random names would otherwise add a
series per name, for good), and a version's series are removed when it is unloaded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Time to first token and between tokens: a decode step is milliseconds, a queued prefill seconds."""
UNKNOWN = "_unknown"
"""The label of every model or version the server does not serve."""


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # RSS, CPU seconds, open file descriptors: what an attack grows
        labels = ("model", "version")
        self.requests = Counter("sampserve_requests_total", "Requests by endpoint and outcome.",
                                ("model", "version", "endpoint", "outcome"), registry=r)
        self.latency = Histogram("sampserve_request_duration_seconds", "End-to-end request latency.",
                                 ("model", "version", "endpoint"), buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("sampserve_queue_duration_seconds", "Time an input waited for its batch.",
                                    labels, buckets=LATENCY_BUCKETS, registry=r)
        self.compute_time = Histogram("sampserve_compute_duration_seconds", "Runtime time of one batch.",
                                      labels, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("sampserve_batch_size", "Inputs per executed batch.", labels,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("sampserve_queue_depth", "Inputs waiting for a batch.", labels, registry=r)
        self.queue_capacity = Gauge("sampserve_queue_capacity", "Inputs the queue holds before answering 429.",
                                    labels, registry=r)
        self.tokens = Counter("sampserve_tokens_total", "Tokens processed (real, excluding padding).", labels,
                              registry=r)
        self.padded_tokens = Counter("sampserve_padded_tokens_total", "Tokens computed, padding included.",
                                     labels, registry=r)
        self.dropped = Counter("sampserve_dropped_total", "Inputs dropped before running, by reason.",
                               ("model", "version", "reason"), registry=r)
        self.loaded = Gauge("sampserve_model_version_loaded", "1 for each loaded (served) version.", labels,
                            registry=r)
        self.runtime_info = Gauge("sampserve_model_runtime_info", "1 per loaded version, labelled with the runtime "
                                  "and device that run it.", (*labels, "runtime", "device"), registry=r)
        self.ready = Gauge("sampserve_model_ready", "1 when the model has a ready version, else 0.", ("model",),
                           registry=r)
        self.load_failures = Counter("sampserve_model_load_failures_total", "Versions that failed to load.",
                                     labels, registry=r)
        self.hung_calls = Gauge("sampserve_runtime_hung_calls", "Runtime calls stuck past runtime_timeout_s.",
                                labels, registry=r)
        self.client_gone = Counter("sampserve_client_gone_total", "Requests whose client left before the answer.",
                                   ("transport", "reason"), registry=r)
        self.connections_refused = Counter("sampserve_connections_refused_total",
                                           "Connections closed by a limit.", ("port", "reason"), registry=r)
        # generation (service.generation): streaming latency, tokens, the scheduler's occupancy
        self.time_to_first_token = Histogram(
            "sampserve_time_to_first_token_seconds", "From a generation request's arrival to its first token.",
            labels, buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "sampserve_inter_token_latency_seconds", "Between consecutive tokens of one sequence.", labels,
            buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("sampserve_prompt_tokens_total", "Prompt tokens prefilled (once per request).",
                                     labels, registry=r)
        self.generation_tokens = Counter("sampserve_generation_tokens_total", "Tokens generated.", labels,
                                         registry=r)
        self.sequences_running = Gauge("sampserve_sequences_running", "Sequences in the running batch.", labels,
                                       registry=r)
        self.sequences_waiting = Gauge("sampserve_sequences_waiting", "Generation requests waiting for a slot.",
                                       labels, registry=r)
        self.kv_cache_tokens = Gauge("sampserve_kv_cache_tokens",
                                     "Key/value cache slots held (batch x padded length).", labels, registry=r)
        self.kv_cache_capacity = Gauge("sampserve_kv_cache_capacity_tokens", "Key/value cache slots at most.",
                                       labels, registry=r)
        self.preemptions = Counter("sampserve_preemptions_total",
                                   "Sequences preempted for cache room (recomputed later).", labels, registry=r)
        self._served: dict[str, set[str]] = {}

    # -- which labels exist ------------------------------------------------------------------

    def model_known(self, model: str) -> None:
        """A model configured in the repository (served or not): its name may be a label."""
        self._served.setdefault(model, set())

    def version_loaded(self, model: str, version: int, runtime: str = "onnxruntime", device: str = "cpu") -> None:
        self._served.setdefault(model, set()).add(str(version))
        self.loaded.labels(model, str(version)).set(1)
        self.runtime_info.labels(model, str(version), runtime, device).set(1)

    def version_unloaded(self, model: str, version: int) -> None:
        """Drop every series of an unloaded version, so a long-lived server does not keep them all."""
        self._served.get(model, set()).discard(str(version))
        for metric in (self.requests, self.latency, self.queue_time, self.compute_time, self.batch_size,
                       self.queue_depth, self.queue_capacity, self.tokens, self.padded_tokens, self.dropped,
                       self.loaded, self.runtime_info, self.load_failures, self.hung_calls, self.time_to_first_token,
                       self.inter_token_latency, self.prompt_tokens, self.generation_tokens, self.sequences_running,
                       self.sequences_waiting, self.kv_cache_tokens, self.kv_cache_capacity, self.preemptions):
            metric.remove_by_labels({"model": model, "version": str(version)})

    def model_forgotten(self, model: str) -> None:
        """A model removed from the repository: its series go too."""
        for version in list(self._served.pop(model, set())):
            self.version_unloaded(model, int(version))
        self.ready.remove_by_labels({"model": model})

    def labels(self, model: str, version: int | str | None) -> tuple[str, str]:
        """Label values for a request: the served names, or ``UNKNOWN``; never what the client invented."""
        versions = self._served.get(model)
        if versions is None:
            return UNKNOWN, UNKNOWN if version not in (None, "") else ""
        text = "" if version is None else str(version)
        return model, text if text == "" or text in versions else UNKNOWN

    # -- observations ------------------------------------------------------------------------

    def observe_request(self, model: str, version: int | str | None, endpoint: str, outcome: str,
                        start: float) -> None:
        """One answered request: its outcome counted, its latency since ``start`` (perf_counter) observed."""
        name, number = self.labels(model, version)
        self.requests.labels(name, number, endpoint, outcome).inc()
        self.latency.labels(name, number, endpoint).observe(time.perf_counter() - start)

    def observer(self, model: str, version: int) -> BatchMetrics:
        return BatchMetrics(self, model, str(version))

    def generation(self, model: str, version: int) -> GenerationMetrics:
        return GenerationMetrics(self, model, str(version))


class BatchMetrics:
    """The batcher's observer for one model version."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self.m, self.model, self.version = metrics, model, version
        # the labelled children, looked up once: queued() runs on every request
        self._depth = metrics.queue_depth.labels(model, version)
        self._batch_size = metrics.batch_size.labels(model, version)
        self._tokens = metrics.tokens.labels(model, version)
        self._padded = metrics.padded_tokens.labels(model, version)
        self._queue_time = metrics.queue_time.labels(model, version)

    def queued(self, depth: int) -> None:
        self._depth.set(depth)

    def batch(self, size: int, tokens: int, padded_tokens: int, queue_seconds: Sequence[float]) -> None:
        self._batch_size.observe(size)
        self._tokens.inc(tokens)
        self._padded.inc(padded_tokens)
        for seconds in queue_seconds:
            self._queue_time.observe(seconds)

    def dropped(self, reason: str) -> None:
        self.m.dropped.labels(self.model, self.version, reason).inc()


class GenerationMetrics:
    """A generation engine's observer for one model version (service.generation.scheduler.EngineObserver);
    called on the engine's thread (prometheus_client is thread-safe)."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self._ttft = metrics.time_to_first_token.labels(model, version)
        self._itl = metrics.inter_token_latency.labels(model, version)
        self._prompt = metrics.prompt_tokens.labels(model, version)
        self._generated = metrics.generation_tokens.labels(model, version)
        self._running = metrics.sequences_running.labels(model, version)
        self._waiting = metrics.sequences_waiting.labels(model, version)
        self._kv = metrics.kv_cache_tokens.labels(model, version)
        self._kv_capacity = metrics.kv_cache_capacity.labels(model, version)
        self._preemptions = metrics.preemptions.labels(model, version)

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def tokens(self, prompt: int, generated: int) -> None:
        if prompt:
            self._prompt.inc(prompt)
        if generated:
            self._generated.inc(generated)

    def occupancy(self, running: int, waiting: int, kv_tokens: int, kv_capacity: int) -> None:
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv.set(kv_tokens)
        self._kv_capacity.set(kv_capacity)

    def preempted(self) -> None:
        self._preemptions.inc()
