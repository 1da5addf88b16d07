"""The public gRPC port: gRPC's wire protocol spoken over uvicorn's HTTP/2 (zttp, a compiled HTTP/2
engine), in front of the ``grpc.aio`` server.

Why: grpc.aio spends 0.35-0.45 ms of CPU per unary call on this machine's cores (its completion
queue hands every event across three threads), four to five times what uvicorn's HTTP/1.1 costs
per request; on 2 cores that CPU is taken from the model and gRPC served fewer requests/s than
REST. Through this front an echo call costs 0.07 ms (``python bench/transport_cost.py``).

How: the unary methods of the v2 ``GRPCInferenceService`` and of our ``Tasks`` service are answered
here, in-process, by the very servicer methods grpc.aio registers (one implementation of each
call). Every other call (health, reflection, anything unknown) is relayed message by message to
the grpc.aio server, which listens on a private loopback port: its status, details and streaming
behaviour reach the client unchanged. The wire format (gRPC over HTTP/2, PROTOCOL-HTTP2.md):
length-prefixed messages, ``grpc-timeout``, ``grpc-status``/``grpc-message`` trailers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import quote

import grpc
import zttp
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.zttp_h2_impl import ZttpH2Protocol

log = logging.getLogger("sampserve")

_CONTENT_TYPE = (b"content-type", b"application/grpc")
# request headers that belong to the transport, not to the call's metadata
_NOT_METADATA = {"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding", "user-agent",
                 "host", "content-length"}
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
Handler = Callable[[Message, Any], Awaitable[Message]]
Metadata = tuple[tuple[str, str | bytes], ...]


class CallError(Exception):
    """Ends a call with a gRPC status; raised by ``FrontContext.abort`` like grpc.aio's abort."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class FrontContext:
    """What our servicers use of ``grpc.aio.ServicerContext``, for calls answered by the front."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise CallError(code, details)

    def invocation_metadata(self) -> Metadata:
        return self._metadata


def unary_methods(servicer: Any, service: Any) -> dict[str, tuple[Handler, type[Message]]]:
    """``/package.Service/Method`` -> (the servicer's bound method, its request class), for each
    method of ``service`` (a protobuf ServiceDescriptor) that streams neither way."""
    return {f"/{service.full_name}/{method.name}": (getattr(servicer, method.name),
                                                    message_factory.GetMessageClass(method.input_type))
            for method in service.methods if not method.client_streaming and not method.server_streaming}


def parse_timeout(value: str) -> float:
    """``grpc-timeout`` (e.g. ``250m``, ``10S``) in seconds; PROTOCOL-HTTP2.md allows 8 digits and a unit."""
    match = _TIMEOUT.match(value)
    if match is None:
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed grpc-timeout {value!r}")
    return int(match[1]) * _TIMEOUT_UNITS[match[2]]


def header_fields(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lower-case header names and values as text (HTTP/2 header names are lower-case)."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}


def call_metadata(headers: dict[str, str]) -> Metadata:
    """The call's custom metadata from its HTTP/2 headers; ``-bin`` values arrive base64-encoded."""
    out: list[tuple[str, str | bytes]] = []
    for key, value in headers.items():
        if key in _NOT_METADATA or key.startswith((":", "grpc-")):
            continue
        if key.endswith("-bin"):
            try:
                out.append((key, base64.b64decode(value + "=" * (-len(value) % 4))))
            except binascii.Error:
                raise CallError(grpc.StatusCode.INVALID_ARGUMENT, f"metadata {key}: not base64") from None
        else:
            out.append((key, value))
    return tuple(out)


def frame(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def message_length(prefix: bytes | bytearray, max_bytes: int) -> int:
    """The length a 5-byte message prefix announces; compressed or oversized messages are refused."""
    if prefix[0]:
        raise CallError(grpc.StatusCode.UNIMPLEMENTED, "compressed messages are not accepted; send identity")
    length: int = struct.unpack(">I", prefix[1:5])[0]
    if length > max_bytes:
        raise CallError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"request message of {length} bytes exceeds the {max_bytes}-byte limit")
    return length


def one_message(body: bytes | bytearray, max_bytes: int) -> bytes:
    """The single message of a unary call's request body."""
    if len(body) < 5 or len(body) != 5 + message_length(body, max_bytes):
        raise CallError(grpc.StatusCode.INTERNAL, "a unary call takes exactly one request message")
    return bytes(body[5:])


class MessageReader:
    """Splits the request body (ASGI chunks) into gRPC messages, refusing compressed or oversized ones."""

    def __init__(self, receive: Any, max_bytes: int) -> None:
        self.receive, self.max_bytes = receive, max_bytes
        self.buffer = bytearray()
        self.ended = False
        self.disconnected = False

    async def _fill(self, size: int) -> bool:
        while len(self.buffer) < size and not self.ended:
            event = await self.receive()
            if event["type"] == "http.disconnect":
                self.ended = self.disconnected = True
                break
            self.buffer += event.get("body", b"")
            self.ended = not event.get("more_body", False)
        return len(self.buffer) >= size

    async def next(self) -> bytes | None:
        """The next message, or None at the end of the request stream."""
        if not await self._fill(5):
            if self.buffer:
                raise CallError(grpc.StatusCode.INTERNAL, "request ends inside a message prefix")
            return None
        length = message_length(self.buffer, self.max_bytes)
        if not await self._fill(5 + length):
            raise CallError(grpc.StatusCode.INTERNAL, "request ends inside a message")
        payload = bytes(self.buffer[5:5 + length])
        del self.buffer[:5 + length]
        return payload


class GrpcFront:
    """The public gRPC port's calls: ``answer`` runs the unary ``methods`` that GrpcH2Protocol
    takes; as an ASGI app it relays every other call to ``relay_target`` (the grpc.aio server)
    and answers non-gRPC requests with 415."""

    def __init__(self, methods: dict[str, tuple[Handler, type[Message]]], relay_target: str,
                 max_message_bytes: int) -> None:
        self.relay_target, self.max_message_bytes = relay_target, max_message_bytes
        self.by_path = {path.encode(): method for path, method in methods.items()}  # as HTTP/2 delivers paths
        self._channel: grpc.aio.Channel | None = None

    def protocol(self) -> type[GrpcH2Protocol]:
        """The HTTP/2 protocol class uvicorn should run for this front."""
        return type("BoundGrpcH2Protocol", (GrpcH2Protocol,), {"front": self})

    async def answer(self, protocol: GrpcH2Protocol, stream_id: int, call: UnaryCall) -> None:
        """Run one unary call and write its answer; a cancellation (stream reset) ends it silently."""
        try:
            request = call.request_class.FromString(one_message(call.body, self.max_message_bytes))
            if call.timeout is None:
                reply = await call.handler(request, FrontContext(call.metadata))
            else:
                async with asyncio.timeout(call.timeout):
                    reply = await call.handler(request, FrontContext(call.metadata))
        except CallError as exc:
            protocol.respond(stream_id, None, exc.code, exc.details)
        except DecodeError:
            protocol.respond(stream_id, None, grpc.StatusCode.INTERNAL, "request message does not parse")
        except TimeoutError:
            protocol.respond(stream_id, None, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except asyncio.CancelledError:
            protocol.call_closed(stream_id)
            raise
        except Exception:  # a bug must cost one call an INTERNAL status, never the connection
            log.exception("gRPC call on stream %d failed", stream_id)
            protocol.respond(stream_id, None, grpc.StatusCode.INTERNAL, "internal error; see the server log")
        else:
            protocol.respond(stream_id, reply.SerializeToString(), grpc.StatusCode.OK)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = header_fields(scope["headers"])
        if scope["method"] != "POST" or not headers.get("content-type", "").startswith("application/grpc"):
            # PROTOCOL-HTTP2.md: a request that is not gRPC gets HTTP 415
            await send({"type": "http.response.start", "status": 415, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"this port speaks gRPC (application/grpc)\n"})
            return
        started = [False]
        try:
            timeout = parse_timeout(headers["grpc-timeout"]) if "grpc-timeout" in headers else None
            metadata = call_metadata(headers)
            reader = MessageReader(receive, self.max_message_bytes)
            await self._relay(scope["path"], reader, metadata, timeout, send, started)
        except CallError as exc:
            await self._end(send, started, exc.code, exc.details)
        except Exception:  # a bug must cost one call an INTERNAL status, never the connection
            log.exception("gRPC call %s failed", scope["path"])
            await self._end(send, started, grpc.StatusCode.INTERNAL, "internal error; see the server log")

    async def _relay(self, path: str, reader: MessageReader, metadata: Metadata,
                     timeout: float | None, send: Any, started: list[bool]) -> None:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.relay_target)

        sent_all = asyncio.Event()

        async def requests() -> AsyncIterator[bytes]:
            while (payload := await reader.next()) is not None:
                yield payload
            sent_all.set()

        async def cancel_when_gone() -> None:  # e.g. a health Watch the client stopped
            await sent_all.wait()
            if not reader.disconnected:
                await reader.receive()  # returns once the client resets the stream (or we answered)
            call.cancel()

        call = self._channel.stream_stream(path)(requests(), metadata=metadata or None, timeout=timeout)
        watcher = asyncio.ensure_future(cancel_when_gone())
        try:
            async for reply in call:
                await self._start(send, started)
                await send({"type": "http.response.body", "body": frame(reply), "more_body": True})
        except grpc.aio.AioRpcError:
            pass  # its status is read below
        except asyncio.CancelledError:
            if not call.cancelled():
                raise  # our own task is cancelled, not the relayed call
        finally:
            watcher.cancel()
        if call.cancelled() and reader.disconnected:
            return
        await self._end(send, started, await call.code(), await call.details() or "")

    @staticmethod
    async def _start(send: Any, started: list[bool]) -> None:
        if not started[0]:
            started[0] = True
            await send({"type": "http.response.start", "status": 200, "headers": [_CONTENT_TYPE], "trailers": True})

    async def _end(self, send: Any, started: list[bool], code: grpc.StatusCode, details: str) -> None:
        await self._start(send, started)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        await send({"type": "http.response.trailers", "headers": trailers(code, details)})


def trailers(code: grpc.StatusCode, details: str) -> list[tuple[bytes, bytes]]:
    out = [(b"grpc-status", str(code.value[0]).encode())]
    if details:  # percent-encoded, as PROTOCOL-HTTP2.md asks
        out.append((b"grpc-message", quote(details, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()))
    return out


class UnaryCall:
    """One unary call the protocol answers itself: its handler, and its request body as it arrives."""

    __slots__ = ("body", "handler", "metadata", "request_class", "task", "timeout")

    def __init__(self, method: tuple[Handler, type[Message]], metadata: Metadata, timeout: float | None) -> None:
        self.handler, self.request_class = method
        self.metadata, self.timeout = metadata, timeout
        self.body = bytearray()
        self.task: asyncio.Task | None = None


class GrpcH2Protocol(ZttpH2Protocol):
    """uvicorn's HTTP/2 connection with two additions for gRPC.

    Unary calls to the front's methods are answered by the protocol itself, without ASGI: no scope,
    no request/response cycle, headers + message + trailers in one write, and a stream reset
    cancels its call directly (its inputs leave the batch queue, as with grpc.aio). Everything
    else (relayed calls, non-gRPC requests) goes through uvicorn's ASGI path to ``front``.

    Retirement: zttp closes a connection (GOAWAY ENHANCE_YOUR_CALM) once 4096 streams have been
    opened on it or its peer has reset 256, guards against rapid-reset floods, and the calls then in
    flight fail. gRPC channels keep one connection for their lifetime (and a client whose deadlines
    expire resets a stream each time), so after ``max_streams`` streams or ``max_resets`` resets this
    protocol sends a graceful GOAWAY (NO_ERROR, every stream so far accepted) and keeps serving: the
    client finishes its calls, opens a new connection for the next ones, and closes this one.
    nginx does the same for HTTP/2 (``keepalive_requests``, 1000 by default).
    """

    max_streams = 2000
    max_resets = 128
    front: GrpcFront  # bound by GrpcFront.protocol()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.opened = self.resets = 0
        self.retired = False
        self.calls: dict[int, UnaryCall] = {}
        self.close_when_idle = False

    def handle_events(self) -> None:
        for event in self.events():
            if isinstance(event, zttp.Request):
                self.opened += 1
                if self.opened >= self.max_streams:
                    self.retire()
            elif isinstance(event, zttp.RstStream):
                self.resets += 1
                if self.resets >= self.max_resets:
                    self.retire()
            call = self.calls.get(getattr(event, "stream_id", 0))
            if call is not None:
                self.call_event(call, event)
            elif not (isinstance(event, zttp.Request) and self.start_call(event)):
                self.asgi_event(event)

    def retire(self) -> None:
        """Graceful GOAWAY: no stream refused, the client opens its next ones elsewhere."""
        if not self.retired:
            self.retired = True
            self.conn.close(0, 2**31 - 1)
            self.flush()

    def start_call(self, event: Any) -> bool:
        """Take the request if it is a unary call the front answers itself."""
        method = self.front.by_path.get(event.path)
        if method is None or event.method != b"POST" or self.shutdown_requested:
            return False
        headers = event.headers.to_list(lowercase_names=True) if isinstance(event.headers, zttp.HeaderBlock) \
            else [(name.lower(), value) for name, value in event.headers]
        fields = header_fields(headers)
        if not fields.get("content-type", "").startswith("application/grpc"):
            return False  # the ASGI path answers 415
        try:
            timeout = parse_timeout(fields["grpc-timeout"]) if "grpc-timeout" in fields else None
            self.calls[event.stream_id] = UnaryCall(method, call_metadata(fields), timeout)
        except CallError as exc:
            self.respond(event.stream_id, None, exc.code, exc.details)
        return True

    def call_event(self, call: UnaryCall, event: Any) -> None:
        if isinstance(event, zttp.Data):
            call.body += event.data
            if len(call.body) > self.front.max_message_bytes + 5:
                self.respond(event.stream_id, None, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"request exceeds the {self.front.max_message_bytes}-byte limit")
        elif isinstance(event, zttp.EndOfMessage) and call.task is None:
            call.task = self.loop.create_task(self.front.answer(self, event.stream_id, call))
            call.task.add_done_callback(self.tasks.discard)
            self.tasks.add(call.task)  # uvicorn's graceful shutdown waits for these
        elif isinstance(event, zttp.RstStream):  # the client cancelled, or its deadline passed
            if call.task is not None:
                call.task.cancel()
            self.call_closed(event.stream_id)

    def respond(self, stream_id: int, payload: bytes | None, code: grpc.StatusCode, details: str = "") -> None:
        if not self.transport.is_closing():
            try:
                stream = self.conn.stream(stream_id)
                stream.send_response(200, [_CONTENT_TYPE])
                if payload is not None:
                    stream.send_data(frame(payload))
                stream.end_message(trailers(code, details))
                self.transport.write(self.conn.data_to_send())
            except zttp.ProtocolError:  # the stream is gone (reset, connection failing): nobody to answer
                pass
        self.call_closed(stream_id)

    def call_closed(self, stream_id: int) -> None:
        if self.calls.pop(stream_id, None) is None:
            return
        self.server_state.total_requests += 1
        self.close_if_done()

    def close_if_done(self) -> None:
        """Close once neither our calls nor uvicorn's streams are open and every answer has left:
        zttp parks bytes beyond the client's flow-control window until it grants more."""
        if self.calls or self.transport.is_closing() or self.conn.has_pending_send():
            return
        if self.close_when_idle or (self.shutdown_requested and not self.cycles):
            self.close_when_idle = False
            super()._close_connection()

    def _close_connection(self) -> None:
        if self.calls or self.conn.has_pending_send():  # uvicorn only knows its ASGI streams
            self.close_when_idle = True
            return
        super()._close_connection()

    def flush(self) -> None:
        super().flush()
        if self.close_when_idle:  # a window update may have let the last parked bytes out
            self.close_if_done()

    def connection_lost(self, exc: Exception | None) -> None:
        for call in self.calls.values():
            if call.task is not None:
                call.task.cancel()
        self.calls.clear()
        super().connection_lost(exc)

    def asgi_event(self, event: Any) -> None:
        """uvicorn's own handling of one event (ZttpH2Protocol.handle_events, per event)."""
        if isinstance(event, zttp.Request):
            self.handle_request(event)
        elif isinstance(event, zttp.Data):
            cycle = self.cycles.get(event.stream_id)
            if cycle is not None and not cycle.response_complete:
                cycle.body += event.data
                if len(cycle.body) > HIGH_WATER_LIMIT:
                    self.flow.pause_reading()
                cycle.message_event.set()
        elif isinstance(event, zttp.EndOfMessage):
            cycle = self.cycles.get(event.stream_id)
            if cycle is not None and not cycle.response_complete:
                cycle.more_body = False
                cycle.message_event.set()
        elif isinstance(event, zttp.RstStream):
            self.handle_rst_stream(event)
        elif isinstance(event, zttp.GoAway):
            self.shutdown_requested = True
            if not self.cycles:
                self._close_connection()
