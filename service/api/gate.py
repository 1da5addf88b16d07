"""The REST port's edge, in front of every route: request id, access, body limits, client gone.

For each HTTP request, before any route sees it:
- a request id is taken from ``X-Request-Id`` (a short token) or made, and echoed back;
- with an API key set, inference and metadata routes need ``Authorization: Bearer <key>``
  (compared in constant time; health, readiness and metrics stay open, as probes need);
- the body is read here, refused with 413 as soon as it passes ``max_body_bytes`` (from its
  Content-Length before a byte of it is read, else while reading) and with 408 if it has not
  arrived within ``body_timeout_s``; the connection is then closed, so the upload stops;
- while the route works, the connection is watched: when the client goes, the route is cancelled,
  so its inputs leave the batch queue before they reach a batch;
- one access log line: id, method, path, status, latency, model, version.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from typing import Any

from service import tracing
from service.api.http_errors import error_body
from service.logs import log_access
from service.errors import BodyTimeout, PayloadTooLarge, ServiceError, Unauthenticated
from service.metrics import Metrics
from service.request_context import begin_request

OPEN_PATHS = ("/v2/health/", "/metrics", "/docs", "/openapi.json", "/redoc")


def protected(path: str) -> bool:
    """Routes an API key guards: inference and model metadata; not health, readiness or metrics."""
    if path == "/v2" or path.startswith(OPEN_PATHS):
        return False
    return not (path.startswith("/v2/models/") and path.endswith("/ready"))


class Gate:
    def __init__(self, app: Any, metrics: Metrics, max_body_bytes: int, body_timeout_s: float,
                 api_key: bytes | None, access_log: bool) -> None:
        self.app, self.metrics = app, metrics
        self.max_body_bytes, self.body_timeout_s = max_body_bytes, body_timeout_s
        self.api_key, self.access_log = api_key, access_log
        self._gone = metrics.client_gone.labels("rest", "disconnect")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        info = begin_request(headers.get(b"x-request-id", b"").decode("latin-1"))
        status = 0

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", info.id.encode())]
            await send(message)

        try:
            refusal = self._refusal(scope["path"], headers)
            if refusal is None:
                try:
                    body = await self._read_body(headers, receive)
                except ServiceError as exc:
                    refusal = exc
                else:
                    carrier = {"traceparent": headers[b"traceparent"].decode("latin-1")} \
                        if b"traceparent" in headers else None
                    with tracing.span(f"{scope['method']} {scope['path'][:100]}", carrier, request_id=info.id):
                        status = await self._run(scope, body, receive, send_with_id) or status
            if refusal is not None:
                code, payload = error_body(refusal, scope["path"])
                await send_with_id({"type": "http.response.start", "status": code, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                    *([(b"connection", b"close")] if code in (408, 413) else []),
                    *([(b"www-authenticate", b"Bearer")] if code == 401 else [])]})
                await send_with_id({"type": "http.response.body", "body": payload})
        finally:
            if self.access_log:
                log_access(info, scope["method"], scope["path"], status, start)

    def _refusal(self, path: str, headers: dict[bytes, bytes]) -> ServiceError | None:
        if self.api_key is not None and protected(path):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return Unauthenticated("this route needs 'Authorization: Bearer <API key>' (SAMPSERVE_API_KEY)")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds the {self.max_body_bytes}-byte limit (SAMPSERVE_MAX_BODY_BYTES)")

    async def _read_body(self, headers: dict[bytes, bytes], receive: Any) -> bytes | None:
        """The whole body, bounded in size and time; None when the client went away meanwhile."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise self._too_large()
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks) if len(chunks) != 1 else chunks[0]
        except TimeoutError:
            raise BodyTimeout(f"request body not received within {self.body_timeout_s:g}s "
                              "(SAMPSERVE_BODY_TIMEOUT_S)") from None

    async def _run(self, scope: dict, body: bytes | None, receive: Any, send: Any) -> int | None:
        """The route, with the body replayed; cancelled if the client disconnects first."""
        if body is None:
            self._gone.inc()
            return 499
        replayed = False
        disconnected = asyncio.Event()

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        if scope["method"] in ("GET", "HEAD"):  # cheap routes: no watcher needed
            await self.app(scope, replay, send)
            return None
        answered = False

        async def send_tracked(message: dict) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True  # the watcher's receive() now returns too: that is no disconnect
            await send(message)

        route = asyncio.ensure_future(self.app(scope, replay, send_tracked))
        watcher = asyncio.ensure_future(receive())
        try:
            await asyncio.wait((route, watcher), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            route.cancel()
            watcher.cancel()
            raise
        if route.done() or answered:
            watcher.cancel()
            await route
            return None
        disconnected.set()
        route.cancel()  # the client has gone: its inputs are dropped before they reach a batch
        self._gone.inc()
        with contextlib.suppress(asyncio.CancelledError):
            await route
        return 499
