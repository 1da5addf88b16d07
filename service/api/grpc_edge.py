"""The gRPC port's edge: one ``grpc.aio`` interceptor that every call of our services passes.

It checks the API key (``authorization: Bearer <key>`` metadata, constant-time compare) on the
guarded methods, answers INVALID_ARGUMENT for a message that did not parse, takes the request id
from ``x-request-id`` metadata (or makes one) and returns it in the trailers, maps ``ServiceError``
to its status by the one table, counts calls whose deadline passed or whose client cancelled, and
writes the access log line. Wrapped handlers are made once per method, not per call.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from service import tracing
from service.errors import GRPC_STATUS, ServiceError
from service.logs import log_access
from service.metrics import Metrics
from service.request_context import begin_request

log = logging.getLogger("sampserve")


class BadMessage:
    """A request that did not deserialize (the tolerant deserializer's stand-in for it)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else None
    return None


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics, api_key: bytes | None, guarded_services: set[str],
                 open_methods: frozenset[str], access_log: bool) -> None:
        self.metrics, self.api_key, self.access_log = metrics, api_key, access_log
        self.guarded_services, self.open_methods = guarded_services, open_methods
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._deadline = metrics.client_gone.labels("grpc", "deadline")
        self._cancelled = metrics.client_gone.labels("grpc", "cancelled")

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        service, _, name = method.lstrip("/").rpartition("/")
        if handler is None or service not in self.guarded_services or not (handler.unary_unary or handler.unary_stream):
            return handler  # health, reflection (streams), unknown methods: grpcio's own answers
        guarded = self.api_key is not None and name not in self.open_methods
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = self._wrap(handler, method, guarded)
        return wrapped

    def _authorized(self, context: grpc.aio.ServicerContext) -> bool:
        assert self.api_key is not None
        given = _metadata(context, "authorization") or ""
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str, guarded: bool) -> grpc.RpcMethodHandler:
        """Unary methods, and server-streaming ones written as coroutines with ``context.write``
        (their ``None`` result passes through), get the same checks, statuses and log line."""
        streaming = handler.unary_unary is None
        behavior = handler.unary_stream if streaming else handler.unary_unary

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            info = begin_request(_metadata(context, "x-request-id"))
            trailers = (("x-request-id", info.id),)
            code = grpc.StatusCode.OK
            try:
                if guarded and not self._authorized(context):
                    code = grpc.StatusCode.UNAUTHENTICATED
                    await context.abort(code, "this method needs 'authorization: Bearer <API key>' metadata "
                                              "(SAMPSERVE_API_KEY)", trailing_metadata=trailers)
                if isinstance(request, BadMessage):
                    code = grpc.StatusCode.INVALID_ARGUMENT
                    await context.abort(code, f"malformed request message: {request.reason}",
                                        trailing_metadata=trailers)
                try:
                    if tracing.enabled():
                        parent = _metadata(context, "traceparent")
                        with tracing.span(method, {"traceparent": parent} if parent else None, request_id=info.id):
                            response = await behavior(request, context)
                    else:
                        response = await behavior(request, context)
                except ServiceError as exc:
                    code = GRPC_STATUS[exc.code]
                    await context.abort(code, exc.message, trailing_metadata=trailers)
                context.set_trailing_metadata(trailers)
                return response
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                if remaining is not None and remaining <= 0:
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    self._deadline.inc()
                else:
                    code = grpc.StatusCode.CANCELLED
                    self._cancelled.inc()
                raise
            except Exception:  # a bug of ours: INTERNAL, logged, never the client's fault
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", method)
                await context.abort(code, "internal error; see the server log", trailing_metadata=trailers)
            finally:
                if self.access_log:
                    log_access(info, "gRPC", method, code.name, start)

        kind = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        return kind(call, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
