"""The server process: load the repository, serve REST, poll for versions, drain on SIGTERM.

SIGTERM (or Ctrl-C) flips readiness to false first, so load balancers stop sending; the HTTP
server stops accepting and lets in-flight requests finish within ``drain_grace_s``; then every
model's queue is drained and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from service.api.grpc import INFERENCE_SERVICE, TASKS_SERVICE, GrpcServer
from service.api.grpc_front import GrpcFront, unary_methods
from service.api.rest import create_app
from service.api.v2_infer import InferDoor
from service.dataplane import DataPlane
from service.metrics import Metrics
from service.models import ModelManager
from service.net import bind
from service.settings import Settings

log = logging.getLogger("sampserve")
GRPC_IDLE_S = 300  # gRPC channels keep their connection; close it only after this long idle


async def serve(settings: Settings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.repo.is_dir():  # a typo'd path would otherwise serve nothing, never ready, silently
        log.error("model repository %s is not a directory (build one with `sampserve up` or `sampserve "
                  "quantize`, or pass --repo / SAMPSERVE_REPO)", settings.repo)
        return 2
    metrics = Metrics()
    models = ModelManager(settings, metrics)
    await models.refresh()
    for name, error in models.config_errors.items():
        log.error("model %s not served: %s", name, error)
    await models.start_polling()
    dataplane = DataPlane(models, settings)
    app = create_app(models, dataplane, metrics)
    # grpc.aio on a private loopback port; the public gRPC port is the front (why: service.api.grpc_front)
    grpc_server = GrpcServer(models, dataplane, metrics, "127.0.0.1", 0, settings.max_body_bytes)
    await grpc_server.start()
    front = GrpcFront({**unary_methods(grpc_server.inference, INFERENCE_SERVICE),
                       **unary_methods(grpc_server.tasks, TASKS_SERVICE)},
                      f"127.0.0.1:{grpc_server.port}", settings.max_body_bytes)
    sock = bind(settings.host, settings.http_port)
    grpc_sock = bind(settings.host, settings.grpc_port)
    grace = int(settings.drain_grace_s) or None
    # v2 infer goes straight to its handler, the rest through FastAPI (why: service.api.v2_infer)
    server = uvicorn.Server(uvicorn.Config(InferDoor(app, dataplane, metrics), log_level="warning",
                                           timeout_graceful_shutdown=grace, limit_concurrency=None, access_log=False))
    grpc_front = uvicorn.Server(uvicorn.Config(
        front, http=front.protocol(), lifespan="off", log_level="warning", access_log=False, proxy_headers=False,
        timeout_graceful_shutdown=grace, timeout_keep_alive=GRPC_IDLE_S, server_header=False, date_header=False))
    for each in (server, grpc_front):
        each.install_signal_handlers = lambda: None  # type: ignore[method-assign]  # ours, below

    def stop() -> None:
        app.state.draining = True  # readiness goes false before anything else
        grpc_server.inference.draining = True
        server.should_exit = True
        grpc_front.should_exit = True

    async def sync_health() -> None:
        while True:
            await grpc_server.set_serving(models.ready() and not app.state.draining)
            await asyncio.sleep(min(settings.poll_interval_s, 1.0))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    host, port = sock.getsockname()[:2]
    health_task = loop.create_task(sync_health())
    print(f"sampserve: REST on http://{host}:{port} gRPC on {host}:{grpc_sock.getsockname()[1]} "
          f"(models: {', '.join(sorted(models.models)) or 'none'})", flush=True)
    await asyncio.gather(server.serve(sockets=[sock]), grpc_front.serve(sockets=[grpc_sock]))
    health_task.cancel()
    await front.close()
    await grpc_server.drain(settings.drain_grace_s)
    await models.close()
    log.info("drained; bye")
    return 0


def run(settings: Settings) -> int:
    """Serve until SIGTERM on uvloop where it is installed: uvloop served 11% more requests/s than
    asyncio's own loop at 64 clients and had an 8% lower p50 at 1 client (docs/benchmarks.md)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(settings))
    return uvloop.run(serve(settings))
