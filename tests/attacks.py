"""Hostile clients for attack tests against the real server (loopback only; no pytest in here).

Every loop is bounded in count and in time: a protection that is missing makes a test fail, never hang.

* ``rss_bytes``, ``RssSampler``: the server's resident memory, once or its peak over an attack.
* ``Periodic``, ``LivenessPoller``: a probe every 50 ms on its own thread, recording latencies and failures.
* ``RawH2``: one HTTP/2 connection driven frame by frame (``h2`` on a plain or TLS socket): gRPC streams
  that announce big messages and never finish them, PING floods, and one complete unary call to prove
  the client speaks gRPC.
* ``ConnectionHerd``: many raw TCP connections that stay idle or drip request headers (slowloris),
  and when the peer closed each of them.
* ``raise_nofile_limit``: room for thousands of sockets (the server subprocess inherits the limit).
* ``record``: one row of docs/reliability.md (what a test sent, expected and measured), written when
  ``bench/reliability.py`` runs the attack tests.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx

# ---------------------------------------------------------------- the reliability table

RELIABILITY_OUT = "SAMPSERVE_RELIABILITY_OUT"


def record(test: str, attack: str, expected: str, measured: str) -> None:
    """Append one row (a JSON line) to the file named by $SAMPSERVE_RELIABILITY_OUT; nothing when it is
    unset. ``node`` is the running pytest item (from PYTEST_CURRENT_TEST), which the row's outcome is
    looked up by. Call it before the assertions, so that a failing run still shows what it measured."""
    out = os.environ.get(RELIABILITY_OUT)
    if not out:
        return
    node = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    row = {"node": node, "test": test, "attack": attack, "expected": expected, "measured": measured}
    with open(out, "a", encoding="utf-8") as rows:
        rows.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------- process resources


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS of /proc/<pid>/status) in bytes; children not included."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    raise ValueError(f"no VmRSS for pid {pid} (a zombie or a kernel thread?)")


def raise_nofile_limit(wanted: int | None = None) -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (or to ``wanted`` if lower), so that
    thousands of sockets fit; processes started afterwards inherit it. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = hard if hard != resource.RLIM_INFINITY else 1 << 20
    target = min(ceiling, wanted) if wanted is not None else ceiling
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------- periodic probes


class Periodic:
    """A daemon thread calling ``probe()`` every ``period_s`` on a fixed schedule (never two at once: a
    late probe starts the next at once) until stopped or ``max_duration_s`` has passed. A context manager."""

    def __init__(self, period_s: float, max_duration_s: float) -> None:
        self.period_s, self.max_duration_s = period_s, max_duration_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=type(self).__name__)
        self.started_at = 0.0
        self.error: BaseException | None = None  # an exception that escaped probe(), ending the thread

    def setup(self) -> None:
        """Runs on the thread before the first probe."""

    def probe(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        """Runs on the thread after the last probe."""

    def _loop(self) -> None:
        try:
            self.setup()
            try:
                beat = 0
                while not self._stopping.is_set() and time.monotonic() - self.started_at < self.max_duration_s:
                    self.probe()
                    beat += 1
                    delay = self.started_at + beat * self.period_s - time.monotonic()
                    if delay < 0:  # late: start again from now instead of firing a burst
                        beat = int((time.monotonic() - self.started_at) / self.period_s)
                    elif self._stopping.wait(delay):
                        break
            finally:
                self.teardown()
        except BaseException as exc:  # reported by stop(), not lost on a thread
            self.error = exc

    def start(self) -> Periodic:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30) -> None:
        self._stopping.set()
        self._thread.join(timeout_s)
        if self.error is not None:
            raise RuntimeError(f"{type(self).__name__} failed") from self.error

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


class LivenessPoller(Periodic):
    """GET ``base_url + path`` every ``period_s``, timing each answer. Anything but ``expect`` (another
    status, a timeout, a refused or dropped connection) is a failure, kept as ``(seconds in, what)``.
    ``keep_client``: one keep-alive connection throughout (what a kubelet's probe is not, but what
    shows the event loop's own delay); otherwise a new connection per probe."""

    def __init__(self, base_url: str, path: str = "/v2/health/live", *, period_s: float = 0.05,
                 max_duration_s: float = 120.0, keep_client: bool = True, timeout_s: float = 5.0,
                 expect: int = 200, verify: ssl.SSLContext | str | bool = True) -> None:
        super().__init__(period_s, max_duration_s)
        self.base_url, self.path, self.keep_client = base_url, path, keep_client
        self.timeout_s, self.expect, self.verify = timeout_s, expect, verify
        self.latencies: list[float] = []
        self.statuses: Counter[int | str] = Counter()
        self.failures: list[tuple[float, str]] = []
        self._client: httpx.Client | None = None

    def _new_client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=self.timeout_s, verify=self.verify)

    def setup(self) -> None:
        if self.keep_client:
            self._client = self._new_client()

    def teardown(self) -> None:
        if self._client is not None:
            self._client.close()

    def probe(self) -> None:
        client = self._client or self._new_client()
        start = time.monotonic()
        try:
            outcome: int | str = client.get(self.path).status_code
        except httpx.HTTPError as exc:
            outcome = type(exc).__name__
            if self._client is not None:  # a dropped keep-alive connection: the next probe reconnects
                self._client.close()
                self._client = self._new_client()
        finally:
            if self._client is None:
                client.close()
        elapsed = time.monotonic() - start
        self.latencies.append(elapsed)
        self.statuses[outcome] += 1
        if outcome != self.expect:
            self.failures.append((round(start - self.started_at, 3), str(outcome)))

    @property
    def max_latency(self) -> float:
        return max(self.latencies, default=0.0)

    def summary(self) -> str:
        ordered = sorted(self.latencies)
        p99 = ordered[int(len(ordered) * 0.99)] if ordered else 0.0
        return (f"{len(self.latencies)} probes, max {self.max_latency * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
                f"statuses {dict(self.statuses)}, first failures {self.failures[:5]}")


class RssSampler(Periodic):
    """The peak resident memory of ``pid``, sampled every ``period_s``."""

    def __init__(self, pid: int, period_s: float = 0.02, max_duration_s: float = 300.0) -> None:
        super().__init__(period_s, max_duration_s)
        self.pid = pid
        self.baseline = rss_bytes(pid)
        self.peak = self.baseline

    def probe(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # the process may have exited
            self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


# ---------------------------------------------------------------- raw HTTP/2 (gRPC)

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def grpc_prefix(length: int, compressed: bool = False) -> bytes:
    """The 5-byte prefix of a gRPC message: compressed flag, then the length (big-endian uint32)."""
    return struct.pack(">BI", int(compressed), length)


def grpc_frame(payload: bytes) -> bytes:
    return grpc_prefix(len(payload)) + payload


def grpc_messages(body: bytes) -> list[bytes]:
    """The messages of a gRPC body (uncompressed ones)."""
    out, at = [], 0
    while at + 5 <= len(body):
        (length,) = struct.unpack(">I", body[at + 1: at + 5])
        out.append(body[at + 5: at + 5 + length])
        at += 5 + length
    return out


@dataclass
class UnaryResult:
    """What one raw unary call got back; ``status`` is None when no grpc-status arrived."""

    status: int | None
    message: str = ""
    replies: list[bytes] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    reset: int | None = None  # RST_STREAM error code, if the stream was reset


class RawH2:
    """One client HTTP/2 connection driven by hand with ``h2``: nothing a real gRPC library would
    refuse to send is refused here (except opening more streams than the server's
    SETTINGS_MAX_CONCURRENT_STREAMS, which h2 enforces; such attempts are counted in ``refused_locally``).

    What the server did is recorded: ``goaway`` (its error code, once a GOAWAY arrived), ``closed``
    (EOF or reset of the TCP connection), ``resets`` (RST_STREAM codes by stream), ``stalled`` (a send
    that could not complete in ``timeout_s``: the server stopped reading)."""

    def __init__(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 timeout_s: float = 5.0) -> None:
        self.authority = f"{host}:{port}"
        self.scheme = "https" if ssl_context else "http"
        self.timeout_s = timeout_s
        raw = socket.create_connection((host, port), timeout=timeout_s)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock: socket.socket = ssl_context.wrap_socket(raw, server_hostname=host) if ssl_context else raw
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.goaway: int | None = None
        self.goaway_at: float | None = None
        self.closed = False
        self.closed_at: float | None = None
        self.stalled = False
        self.settings_received = False
        self.refused_locally = 0
        self.pings_sent = 0
        self.pings_acked = 0
        self.resets: dict[int, int] = {}
        self.headers: dict[int, dict[str, str]] = {}
        self.trailers: dict[int, dict[str, str]] = {}
        self.bodies: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.sent: dict[int, int] = {}  # DATA bytes sent per stream
        self.opened_at = time.monotonic()
        self.conn.initiate_connection()
        self.flush()

    # -- plumbing

    @property
    def terminated(self) -> bool:
        """The server sent GOAWAY or closed the connection."""
        return self.goaway is not None or self.closed

    def _mark_closed(self) -> None:
        if not self.closed:
            self.closed, self.closed_at = True, time.monotonic()

    def flush(self) -> None:
        """Send what h2 has queued; a dead connection is recorded, not raised."""
        data = self.conn.data_to_send()
        if not data or self.closed:
            return
        try:
            self.sock.settimeout(self.timeout_s)
            self.sock.sendall(data)
        except TimeoutError:
            self.stalled = True
        except (OSError, ssl.SSLError):
            self._mark_closed()

    def receive(self, timeout_s: float) -> int:
        """Read what the server sent within ``timeout_s`` (0: only what is already here) and handle it;
        returns the number of bytes read."""
        if self.closed:
            return 0
        total = 0
        deadline = time.monotonic() + timeout_s
        while not self.closed:
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0
            wait = max(0.0, deadline - time.monotonic()) if total == 0 else 0.0
            if not pending:
                with selectors.DefaultSelector() as sel:
                    sel.register(self.sock, selectors.EVENT_READ)
                    if not sel.select(wait):
                        break
            try:
                self.sock.settimeout(self.timeout_s)
                data = self.sock.recv(1 << 16)
            except (TimeoutError, ssl.SSLWantReadError):
                break
            except (OSError, ssl.SSLError):
                self._mark_closed()
                break
            if not data:
                self._mark_closed()
                break
            total += len(data)
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:  # e.g. a frame after our side closed; the server misbehaved
                self._mark_closed()
                break
            self._handle(events)
            self.flush()  # SETTINGS/PING acks, WINDOW_UPDATEs
        return total

    def _handle(self, events: Iterable[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, h2.events.RemoteSettingsChanged):
                self.settings_received = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                if self.goaway is None:
                    self.goaway, self.goaway_at = int(event.error_code or 0), time.monotonic()
            elif isinstance(event, h2.events.StreamReset):
                self.resets[event.stream_id] = int(event.error_code or 0)
            elif isinstance(event, h2.events.ResponseReceived):
                self.headers[event.stream_id] = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.TrailersReceived):
                self.trailers[event.stream_id] = dict(event.headers)  # type: ignore[arg-type]
            elif isinstance(event, h2.events.DataReceived):
                self.bodies.setdefault(event.stream_id, bytearray()).extend(event.data or b"")
                if event.flow_controlled_length:
                    with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                        self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.PingAckReceived):
                self.pings_acked += 1

    def pump(self, duration_s: float) -> None:
        """Keep reading (and acknowledging) for ``duration_s`` or until the connection is closed."""
        deadline = time.monotonic() + duration_s
        while not self.closed and time.monotonic() < deadline:
            self.receive(min(0.1, max(0.0, deadline - time.monotonic())))

    def wait_settings(self, timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.settings_received and not self.terminated and time.monotonic() < deadline:
            self.receive(0.05)
        return self.settings_received

    def wait_terminated(self, timeout_s: float) -> bool:
        """Read until the server sends GOAWAY or closes, at most ``timeout_s``; whether it did."""
        deadline = time.monotonic() + timeout_s
        while not self.terminated and time.monotonic() < deadline:
            self.receive(min(0.1, max(0.0, deadline - time.monotonic())))
        return self.terminated

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- gRPC requests

    def grpc_headers(self, path: str, metadata: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
        return [(":method", "POST"), (":scheme", self.scheme), (":path", path), (":authority", self.authority),
                ("content-type", "application/grpc"), ("te", "trailers"), ("user-agent", "sampserve-attacks/1"),
                *metadata]

    def open_stream(self, path: str = MODEL_INFER, metadata: Sequence[tuple[str, str]] = ()) -> int | None:
        """HEADERS for a new gRPC call (no END_STREAM); its stream id, or None when it could not be opened."""
        if self.terminated:
            return None
        try:
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(stream_id, self.grpc_headers(path, metadata))
        except h2.exceptions.TooManyStreamsError:
            self.refused_locally += 1
            return None
        except h2.exceptions.ProtocolError:
            return None
        self.sent[stream_id] = 0
        return stream_id

    def _send_some(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """As much of ``data`` as flow control allows right now (one frame at most); bytes sent."""
        try:
            room = min(len(data), self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if room <= 0 and not (end_stream and not data):
                return 0
            self.conn.send_data(stream_id, bytes(data[:room]), end_stream=end_stream and room == len(data))
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, h2.exceptions.FlowControlError):
            return 0
        self.sent[stream_id] = self.sent.get(stream_id, 0) + room
        return room

    def send_partial_messages(self, streams: int, announce: int = 4 * 1024 * 1024, path: str = MODEL_INFER,
                              max_bytes_per_stream: int | None = None, max_seconds: float = 10.0) -> list[int]:
        """Open ``streams`` calls, each announcing an ``announce``-byte message and then sending as much
        of it as flow control allows (never all of it, never END_STREAM), granting the server
        ``max_seconds`` to open its windows. Returns the stream ids opened."""
        self.wait_settings(self.timeout_s)
        opened: list[int] = []
        for _ in range(streams):
            stream_id = self.open_stream(path)
            if stream_id is None:
                if self.terminated:
                    break
                continue
            opened.append(stream_id)
            self._send_some(stream_id, grpc_prefix(announce))
            self.flush()
        limit = announce - 1 + 5  # the prefix plus all but the message's last byte
        if max_bytes_per_stream is not None:
            limit = min(limit, max_bytes_per_stream)
        chunk = memoryview(bytes(self.conn.max_outbound_frame_size))
        deadline = time.monotonic() + max_seconds
        idle_rounds = 0
        while not self.terminated and not self.stalled and time.monotonic() < deadline:
            progress = 0
            for stream_id in opened:
                left = limit - self.sent.get(stream_id, 0)
                if left > 0 and stream_id not in self.resets:
                    progress += self._send_some(stream_id, chunk[: min(left, len(chunk))])
                    self.flush()
                if self.terminated or self.stalled:
                    break
            if progress:
                idle_rounds = 0
                self.receive(0)
                continue
            idle_rounds += 1  # windows exhausted: wait for WINDOW_UPDATEs, give up after 3 quiet waits
            if self.receive(0.2) == 0 and idle_rounds >= 3:
                break
        return opened

    def ping_flood(self, count: int, max_seconds: float = 5.0) -> int:
        """Up to ``count`` PING frames as fast as the socket takes them (stopping early if the server
        sends GOAWAY or closes, or after ``max_seconds``); how many were sent."""
        deadline = time.monotonic() + max_seconds
        sent = 0
        while sent < count and not self.terminated and not self.stalled and time.monotonic() < deadline:
            for _ in range(min(16, count - sent)):
                try:
                    self.conn.ping(struct.pack(">Q", self.pings_sent))
                except h2.exceptions.ProtocolError:
                    return sent
                self.pings_sent += 1
                sent += 1
            self.flush()
            self.receive(0)
        return sent

    def unary(self, path: str, message: bytes, metadata: Sequence[tuple[str, str]] = (),
              timeout_s: float = 10.0) -> UnaryResult:
        """One complete unary gRPC call: HEADERS, the framed message (as windows allow), END_STREAM;
        then read until the call ends (trailers, or a Trailers-Only answer) or ``timeout_s``."""
        self.wait_settings(self.timeout_s)
        stream_id = self.open_stream(path, metadata)
        if stream_id is None:
            return UnaryResult(None, "stream not opened")
        body = memoryview(grpc_frame(message))
        deadline = time.monotonic() + timeout_s
        while not self.terminated and time.monotonic() < deadline and stream_id not in self.resets:
            sent = self._send_some(stream_id, body, end_stream=True)
            body = body[sent:]
            self.flush()
            if not body:
                break
            self.receive(0 if sent else 0.05)
        while (stream_id not in self.ended and stream_id not in self.resets and not self.closed
               and time.monotonic() < deadline):
            self.receive(min(0.1, max(0.0, deadline - time.monotonic())))
        final = {**self.headers.get(stream_id, {}), **self.trailers.get(stream_id, {})}
        status = final.get("grpc-status")
        return UnaryResult(int(status) if status is not None else None, final.get("grpc-message", ""),
                           grpc_messages(bytes(self.bodies.get(stream_id, b""))), final, self.resets.get(stream_id))


def raw_grpc_call(host: str, port: int, path: str, message: bytes, *, metadata: Sequence[tuple[str, str]] = (),
                  ssl_context: ssl.SSLContext | None = None, timeout_s: float = 10.0) -> UnaryResult:
    """One unary call on a fresh raw HTTP/2 connection."""
    with RawH2(host, port, ssl_context=ssl_context, timeout_s=timeout_s) as conn:
        return conn.unary(path, message, metadata, timeout_s)


def raw_model_infer_status(host: str, port: int, request: bytes, **kwargs: Any) -> int | None:
    """The grpc-status of one raw-HTTP/2 ModelInfer with a serialized ``ModelInferRequest``."""
    return raw_grpc_call(host, port, MODEL_INFER, request, **kwargs).status


# ---------------------------------------------------------------- many TCP connections

SLOW_HTTP_START = b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
SLOW_HTTP_DRIP = b"X-Slow: " + b"a" * 4096  # never the blank line that ends the headers
SLOW_H2_START = H2_PREFACE[:10]
SLOW_H2_DRIP = H2_PREFACE[10:] + b"\x00\x01\x00\x04\x00\x00\x00\x00\x00" + bytes(256)  # then a 256-byte SETTINGS


class ConnectionHerd:
    """``n`` TCP connections to one address, connected concurrently (non-blocking), each sending
    ``start`` once connected and then, while ``drip()`` runs, one more byte of ``drip_bytes`` every
    ``drip_period_s``. ``closed_at[i]`` is when the peer closed connection i (EOF, reset, or a failed
    send), in seconds since the herd finished connecting; ``failed`` counts connects that did not
    succeed (refused, or not accepted within the connect timeout), which are closed from the start."""

    def __init__(self, host: str, port: int, n: int, *, start: bytes = b"", drip_bytes: bytes = b"",
                 drip_period_s: float = 1.0, connect_timeout_s: float = 10.0) -> None:
        self.start, self.drip_bytes, self.drip_period_s = start, drip_bytes, drip_period_s
        self.socks: list[socket.socket] = []
        self.closed_at: list[float | None] = [None] * n
        self.received = 0  # bytes the server sent (e.g. a 408 answer, HTTP/2 SETTINGS or GOAWAY)
        self.failed = 0
        self._dripped = [0] * n
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        connecting = selectors.DefaultSelector()
        for i in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((host, port))
            self.socks.append(sock)
            if code in (0, errno.EINPROGRESS):
                connecting.register(sock, selectors.EVENT_WRITE, i)
            else:
                self._fail(i)
        deadline = time.monotonic() + connect_timeout_s
        while connecting.get_map() and time.monotonic() < deadline:
            for key, _ in connecting.select(min(0.5, max(0.0, deadline - time.monotonic()))):
                connecting.unregister(key.fileobj)
                i, sock = key.data, self.socks[key.data]
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                    self._fail(i)
                    continue
                if start and not self._send(i, start):
                    continue
                self._sel.register(sock, selectors.EVENT_READ, i)
        for key in list(connecting.get_map().values()):  # never connected
            connecting.unregister(key.fileobj)
            self._fail(key.data)
        connecting.close()
        self.connected_at = time.monotonic()
        for i in range(n):  # connect failures count from the start
            if self.closed_at[i] == -1.0:
                self.closed_at[i] = 0.0

    def _fail(self, i: int) -> None:
        self.failed += 1
        self.closed_at[i] = -1.0
        self.socks[i].close()

    def _closed(self, i: int) -> None:
        if self.closed_at[i] is None:
            self.closed_at[i] = time.monotonic() - getattr(self, "connected_at", time.monotonic())
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self.socks[i])
            self.socks[i].close()

    def _send(self, i: int, data: bytes) -> bool:
        try:
            self.socks[i].send(data)
        except BlockingIOError:
            return True  # buffers full: still open
        except OSError:
            self._closed(i)
            return False
        return True

    def poll(self, timeout_s: float = 0.0) -> int:
        """Notice connections the peer closed (waiting up to ``timeout_s`` for the first); how many are open."""
        with self._lock:
            for key, _ in self._sel.select(timeout_s) if self._sel.get_map() else ():
                i = key.data
                try:
                    data = self.socks[i].recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    self._closed(i)
                    continue
                if data:
                    self.received += len(data)
                else:
                    self._closed(i)
            return self.open_count

    @property
    def open_count(self) -> int:
        return sum(t is None for t in self.closed_at)

    @property
    def closed_count(self) -> int:
        return len(self.closed_at) - self.open_count

    def wait_all_closed(self, timeout_s: float) -> int:
        """Poll until every connection is closed or ``timeout_s`` passes; how many are still open."""
        deadline = time.monotonic() + timeout_s
        while self.poll(min(0.2, max(0.0, deadline - time.monotonic()))) and time.monotonic() < deadline:
            pass
        return self.open_count

    def drip_once(self) -> None:
        """One more byte of ``drip_bytes`` on every open connection (until they run out)."""
        with self._lock:
            for i in range(len(self.socks)):
                if self.closed_at[i] is None and self._dripped[i] < len(self.drip_bytes):
                    at = self._dripped[i]
                    if self._send(i, self.drip_bytes[at: at + 1]):
                        self._dripped[i] += 1

    def drip(self, max_seconds: float = 30.0) -> ConnectionHerd:
        """Start dripping on a daemon thread (and noticing closes), for at most ``max_seconds``."""
        def run() -> None:
            deadline = time.monotonic() + max_seconds
            next_drip = time.monotonic() + self.drip_period_s
            while not self._stop.is_set() and time.monotonic() < deadline and self.open_count:
                if time.monotonic() >= next_drip:
                    self.drip_once()
                    next_drip += self.drip_period_s
                self.poll(min(0.1, max(0.0, next_drip - time.monotonic())))
        self._thread = threading.Thread(target=run, daemon=True, name="drip")
        self._thread.start()
        return self

    def summary(self) -> str:
        times = sorted(t for t in self.closed_at if t is not None)
        span = f"closed between {times[0]:.2f} s and {times[-1]:.2f} s" if times else "none closed"
        return (f"{len(self.socks)} connections: {self.failed} failed to connect, {self.closed_count} closed "
                f"({span}), {self.open_count} still open, {self.received} bytes received")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for sock in self.socks:
            sock.close()
        self._sel.close()

    def __enter__(self) -> ConnectionHerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_idle_connections(host: str, port: int, n: int, connect_timeout_s: float = 10.0) -> ConnectionHerd:
    """``n`` TCP connections that connect and send nothing."""
    return ConnectionHerd(host, port, n, connect_timeout_s=connect_timeout_s)


def slow_header_clients(host: str, port: int, n: int, *, http2: bool = False, period_s: float = 1.0,
                        max_seconds: float = 30.0, connect_timeout_s: float = 10.0) -> ConnectionHerd:
    """``n`` slowloris connections, dripping one byte every ``period_s`` (for at most ``max_seconds``):
    HTTP/1.1 a request line and headers that never end; ``http2`` the client preface, never finished."""
    start, drip = (SLOW_H2_START, SLOW_H2_DRIP) if http2 else (SLOW_HTTP_START, SLOW_HTTP_DRIP)
    herd = ConnectionHerd(host, port, n, start=start, drip_bytes=drip, drip_period_s=period_s,
                          connect_timeout_s=connect_timeout_s)
    return herd.drip(max_seconds)


def split_target(target: str) -> tuple[str, int]:
    """'127.0.0.1:8001' or 'http://127.0.0.1:8000' -> ('127.0.0.1', port)."""
    hostport = target.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)
