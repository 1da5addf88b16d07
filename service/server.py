"""The server process: load the repository, serve REST and gRPC, poll for versions, drain on SIGTERM.

SIGTERM (or Ctrl-C) flips readiness to false first, so load balancers stop sending; both servers
stop accepting (gRPC sends GOAWAY) and let in-flight requests finish within ``drain_grace_s``; then
every model's queue is drained and the process exits 0. A watchdog bounds all of it: if the
process is still there ``drain_grace_s + 5`` seconds after the signal (a runtime call stuck in a
native library, say), it exits with status 3 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import resource
import signal
import ssl
import threading
from typing import Any

import uvicorn
from prometheus_client import make_asgi_app

from service import tracing
from service.api.connections import guarded_protocol
from service.api.gate import Gate
from service.api.grpc import GrpcServer
from service.api.rest import create_app
from service.api.door import FastDoor
from service.dataplane import DataPlane
from service.logs import configure
from service.metrics import Metrics
from service.models import ModelManager
from service.net import PortInUse, bind_port
from service.settings import Settings

log = logging.getLogger("sampserve")
WATCHDOG_MARGIN_S = 5.0
LISTEN_BACKLOG = 2048
"""uvicorn's own default backlog: the sockets listen before the startup line is printed."""


def raise_file_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: each connection is a descriptor, and the soft default
    (often 1024) would make a few thousand idle clients fail accept() with EMFILE."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _uvicorn_config(app: Any, settings: Settings, metrics: Metrics, port_name: str) -> uvicorn.Config:
    def refused(reason: str) -> None:
        metrics.connections_refused.labels(port_name, reason).inc()

    tls: dict[str, Any] = {}
    if settings.tls:
        tls = {"ssl_certfile": str(settings.tls_cert_file), "ssl_keyfile": str(settings.tls_key_file)}
        if settings.tls_client_ca_file is not None:
            tls |= {"ssl_ca_certs": str(settings.tls_client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return uvicorn.Config(
        app, http=guarded_protocol(settings.header_timeout_s, settings.max_connections, refused),
        log_config=None, log_level="warning", access_log=False,  # uvicorn's loggers go through ours
        timeout_keep_alive=max(1, round(settings.idle_timeout_s)),
        # uvicorn types it int, but waits with asyncio.wait_for: a fractional grace is honoured (int() made
        # a grace under 1 s unlimited)
        timeout_graceful_shutdown=settings.drain_grace_s or None,  # type: ignore[arg-type]
        limit_concurrency=None, lifespan="off",
        server_header=False, **tls)


def _start_watchdog(bound_s: float) -> None:
    def expire() -> None:
        log.error("drain did not finish within %.0fs; exiting now", bound_s)
        logging.shutdown()
        os._exit(3)

    timer = threading.Timer(bound_s, expire)
    timer.daemon = True
    timer.start()


async def serve(settings: Settings) -> int:
    configure(settings.log_format)
    if not settings.repo.is_dir():  # a typo'd path would otherwise serve nothing, never ready, silently
        log.error("model repository %s is not a directory (build one with `sampserve up` or `sampserve "
                  "quantize`, or pass --repo / SAMPSERVE_REPO)", settings.repo)
        return 2
    try:
        api_key = settings.resolved_api_key()
    except (OSError, ValueError) as exc:
        log.error("API key: %s", exc)
        return 2
    if tracing.setup(settings.otlp_endpoint):
        log.info("tracing: spans go to %s", settings.otlp_endpoint)
    for module in settings.plugins:
        importlib.import_module(module)  # e.g. registers a runtime in service.runtimes.RUNTIMES
    raise_file_limit()
    metrics = Metrics()
    models = ModelManager(settings, metrics)
    dataplane = DataPlane(models, settings, metrics)
    # The ports are bound before the models load (minutes, for big ones), so a port in use is one line
    # at once; they accept connections only once the models are loaded (the startup probe's meaning).
    try:
        grpc_server = GrpcServer(dataplane, metrics, settings, api_key)
        sock = bind_port(settings.host, settings.http_port, "REST", "http_port")
        metrics_sock = None if settings.metrics_port is None else bind_port(
            settings.host, settings.metrics_port, "metrics", "metrics_port")
    except PortInUse as exc:
        log.error("%s", exc)
        return 2
    await models.refresh()
    await models.start_polling()
    app = create_app(dataplane, metrics, serve_metrics=settings.metrics_port is None, docs=settings.docs)
    # v2 infer goes straight to its handler, the rest through FastAPI (why: service.api.v2_infer)
    edge = Gate(FastDoor(app, dataplane), metrics, settings.max_body_bytes, settings.body_timeout_s, api_key,
                settings.access_log)
    await grpc_server.start()
    servers = [(uvicorn.Server(_uvicorn_config(edge, settings, metrics, "http")), sock)]
    if metrics_sock is not None:
        servers.append((uvicorn.Server(_uvicorn_config(make_asgi_app(metrics.registry), settings, metrics,
                                                       "metrics")), metrics_sock))
    for server, _ in servers:
        # uvicorn would take SIGTERM for itself (each server replacing the other's handler); ours,
        # below, flips readiness first and stops every server
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]

    def stop() -> None:
        if dataplane.draining:
            return
        dataplane.draining = True  # readiness goes false before anything else
        _start_watchdog(settings.drain_grace_s + WATCHDOG_MARGIN_S)
        # Streams still generating when the grace is nearly over end with an error event, not a cut
        # connection (uvicorn cancels what is left at the grace).
        loop.call_later(max(0.0, settings.drain_grace_s - min(1.0, settings.drain_grace_s / 2)),
                        models.abort_generation, "the server is shutting down")
        for server, _ in servers:
            server.should_exit = True

    async def sync_health() -> None:
        while True:
            await grpc_server.set_serving(dataplane.ready())
            await asyncio.sleep(min(settings.poll_interval_s, 1.0))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    for _, bound in servers:  # connectable from the line below on (uvicorn accepts once it runs)
        bound.listen(LISTEN_BACKLOG)
    host, port = sock.getsockname()[:2]
    health_task = loop.create_task(sync_health())
    scheme = "https" if settings.tls else "http"
    extra = f" metrics on {scheme}://{host}:{servers[1][1].getsockname()[1]}/metrics" if len(servers) > 1 else ""
    print(f"sampserve: REST on {scheme}://{host}:{port} gRPC on {host}:{grpc_server.port}{extra} "
          f"(models: {', '.join(sorted(models.models)) or 'none'})", flush=True)
    drained = loop.create_task(_drain_grpc_on_stop(dataplane, grpc_server, settings.drain_grace_s))
    await asyncio.gather(*(server.serve(sockets=[s]) for server, s in servers))
    await drained
    health_task.cancel()
    await models.close()
    dataplane.close()
    log.info("drained; bye")
    return 0


async def _drain_grpc_on_stop(dataplane: DataPlane, grpc_server: GrpcServer, grace_s: float) -> None:
    """gRPC stops accepting (GOAWAY) as soon as the signal comes, beside the REST port's shutdown."""
    while not dataplane.draining:
        await asyncio.sleep(0.05)
    await grpc_server.drain(grace_s)


def run(settings: Settings) -> int:
    """Serve until SIGTERM on uvloop where it is installed: uvloop served 11% more requests/s than
    asyncio's own loop at 64 clients and had an 8% lower p50 at 1 client (docs/benchmarks.md)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))
