"""OpenTelemetry tracing: off unless ``otlp_endpoint`` is set, then spans for each request (REST
gate, gRPC interceptor), its tokenization, its wait in the batch queue and its batch's compute.

Off, every call here is a no-op that imports nothing (the packages are the ``tracing`` extra). On,
spans go to an OTLP/HTTP collector through the SDK's batching exporter, off the request path, and
a caller's ``traceparent`` (W3C trace context, as HTTP header or gRPC metadata) becomes the parent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

_tracer: Any = None
_propagator: Any = None


def setup(endpoint: str | None, service_name: str = "sampserve") -> bool:
    """Start exporting spans to ``endpoint``; False (and nothing imported) when it is unset."""
    global _tracer, _propagator
    if not endpoint:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), schedule_delay_millis=500))
    _tracer = provider.get_tracer("sampserve")
    _propagator = TraceContextTextMapPropagator()
    return True


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def span(name: str, carrier: Mapping[str, str] | None = None, **attributes: Any) -> Iterator[Any]:
    """A span around the block (the current one's child, or ``carrier``'s remote parent's)."""
    if _tracer is None:
        yield None
        return
    parent = _propagator.extract(carrier) if carrier else None
    with _tracer.start_as_current_span(name, context=parent, attributes=attributes) as current:
        yield current


def record(name: str, start_monotonic: float, end_monotonic: float, **attributes: Any) -> None:
    """A finished span of the current request, from two ``time.monotonic()`` readings (the queue wait
    and the compute of a batch happen on the batcher's task, and are reported after the fact)."""
    if _tracer is None:
        return
    offset = time.time_ns() - time.monotonic_ns()
    current = _tracer.start_span(name, start_time=int(start_monotonic * 1e9) + offset, attributes=attributes)
    current.end(end_time=int(end_monotonic * 1e9) + offset)
