"""Attacks on the real server (a subprocess on loopback), one test per item of the hardening issue's
"Done when" list. Each test states the attack it stands for and fails if the protection it checks
were removed: the assertions are on the specific behaviour (a status, a time, a memory or label
bound), with margins wide enough for a shared 2-core machine and narrow enough to matter.

The attacks, by test:

- unknown_model_names: label and lookup blow-up with 1 MB random model names and versions (REST, gRPC);
- oversized_inputs: a 64 MB body, one 3 MB text, a million-element gRPC tensor (memory and CPU);
- grpc_stream_and_ping_floods: HTTP/2 streams holding half-sent 4 MB messages, then PING floods;
- grpc_gzip / tls / mutual_tls: the transport options a hardened deployment relies on (eavesdropping,
  callers without a certificate);
- idle_and_slow_connections: connection exhaustion, idle sockets and slowloris on both ports;
- api_key: unauthenticated use of inference, and the key leaking into logs;
- hung_runtime: a runtime call that never returns (a wedged driver), and exit with one stuck;
- unservable_model_folders / strict_readiness: a broken or empty model folder appearing under load.

The hostile clients live in tests/attacks.py; the plugin runtime that hangs in
tests/service/hanging_runtime.py. Each test also records what it sent, what it asserts and what it
measured (``tests.attacks.record``, before its assertions), which ``python bench/reliability.py``
turns into docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import selectors
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import h2.errors
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import trustme
from tritonclient.grpc import service_pb2 as pb  # the v2 protocol's messages, as stock clients build them
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.api.grpc_gen import sampserve_pb2 as tasks_pb
from service.api.grpc_gen import sampserve_pb2_grpc as tasks_grpc
from service.repository import MODEL_CONFIG_FILE, publish
from tests.attacks import (
    MODEL_INFER,
    ConnectionHerd,
    LivenessPoller,
    Periodic,
    RawH2,
    RssSampler,
    open_idle_connections,
    raise_nofile_limit,
    raw_grpc_call,
    record,
    slow_header_clients,
    split_target,
)
from tests.servers import SERVE, Server, start_server

from .conftest import ClosedLoop

ROOT = Path(__file__).resolve().parents[2]  # the server imports --plugins from here
MB = 1024 * 1024
SERVED = {"emb", "topics"}
V2_BODY = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello world"]}]}


# ---------------------------------------------------------------- servers


@dataclass
class Served:
    """A started server (tests.servers.Server, which keeps reading its output) with the addresses and
    the stop the attacks need."""

    server: Server

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def http(self) -> httpx.Client:
        return self.server.http

    @property
    def grpc_target(self) -> str:
        return self.server.grpc_target

    @property
    def process(self) -> subprocess.Popen:
        return self.server.process

    @property
    def pid(self) -> int:
        return self.server.process.pid

    @property
    def http_addr(self) -> tuple[str, int]:
        return split_target(self.server.url)

    @property
    def grpc_addr(self) -> tuple[str, int]:
        return split_target(self.server.grpc_target)

    def output(self) -> str:
        """Everything the server wrote, stderr included (all of it once it has exited)."""
        return self.server.output()

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM; the exit code, or None if it had to be killed. Idempotent."""
        if self.process.poll() is not None:
            self.server.http.close()
            return self.process.returncode
        try:
            return self.server.stop(timeout_s)
        except subprocess.TimeoutExpired:
            return None


@contextmanager
def serving(repo: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    """The real server via tests.servers.start_server, stopped at the end."""
    served = Served(start_server(repo, *flags, env=env, cwd=ROOT))
    try:
        yield served
    finally:
        served.stop()


def launch_tls(repo: Path, *flags: str, tls: ssl.SSLContext, timeout_s: float = 60) -> Served:
    """start_server for a server with --tls-cert-file: it waits for readiness over HTTPS, verifying
    the server with ``tls`` (which carries the client certificate under mutual TLS)."""
    process = subprocess.Popen(
        [*SERVE, "--repo", str(repo), "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
         "--threads", "1", *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    try:
        return _ready_over_https(process, tls, time.monotonic() + timeout_s)
    except BaseException:
        process.kill()
        process.wait(10)
        raise


def _ready_over_https(process: subprocess.Popen, tls: ssl.SSLContext, deadline: float) -> Served:
    lines: list[str] = []
    while time.monotonic() < deadline and process.poll() is None:
        lines.append(process.stdout.readline())  # type: ignore[union-attr]
        if "REST on " in lines[-1]:
            break
    else:
        raise RuntimeError("server did not start:\n" + "".join(lines))
    host, port = split_target(lines[-1].split("REST on ", 1)[1].split()[0])
    server = Server(process, f"https://{host}:{port}", lines[-1].split("gRPC on ", 1)[1].split()[0], lines)
    server.http.close()
    server.http = httpx.Client(base_url=server.url, timeout=30, verify=tls)
    while time.monotonic() < deadline and process.poll() is None:
        with suppress(httpx.TransportError):
            if server.http.get("/v2/health/ready").status_code == 200:
                return Served(server)
        time.sleep(0.1)
    raise RuntimeError("server never became ready over HTTPS:\n" + server.output())


# ---------------------------------------------------------------- requests


def junk(chars: int) -> str:
    """A random name no model has, ``chars`` long (hex: safe in JSON, URLs and gRPC strings)."""
    return secrets.token_hex(chars // 2 + 1)[:chars]


def infer_request(model: str = "emb", texts: tuple[str, ...] = ("commit your changes before merging",),
                  **fields: Any) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[len(texts)],
        contents=pb.InferTensorContents(bytes_contents=[t.encode() for t in texts]))], **fields)


def grpc_call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[str, Any]:
    """One call, ``method(*args, **kwargs)``: its status code name and its reply (None unless OK)."""
    try:
        return "OK", method(*args, **kwargs)
    except grpc.RpcError as exc:
        return str(exc.code().name), None


def grpc_code(method: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The status code name of one call: ``method(*args, **kwargs)``."""
    return grpc_call(method, *args, **kwargs)[0]


def triton_infer(target: str, timeout_s: float = 5.0) -> float:
    """One inference with a stock client on a fresh channel; its wall time (raises on failure)."""
    start = time.monotonic()
    client = triton.InferenceServerClient(url=target)
    try:
        text = triton.InferInput("text", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"hello"], dtype=object))
        result = client.infer("emb", [text], client_timeout=timeout_s)
        assert result.as_numpy("embeddings").shape[-1] > 0
    finally:
        client.close()
    return time.monotonic() - start


class TritonProbe(Periodic):
    """A fresh-channel stock-client inference every ``period_s``: latencies and failures."""

    def __init__(self, target: str, period_s: float = 0.25, max_duration_s: float = 120) -> None:
        super().__init__(period_s, max_duration_s)
        self.target = target
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def probe(self) -> None:
        start = time.monotonic()
        try:
            self.latencies.append(triton_infer(self.target))
        except Exception as exc:  # any failure of the stock client is what this records
            self.latencies.append(time.monotonic() - start)
            self.failures.append(f"{time.monotonic() - self.started_at:.2f}s: {type(exc).__name__}: {exc}"[:300])


def wait_for(predicate: Callable[[], bool], timeout_s: float, period_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period_s)
    return predicate()


def get_status(client: httpx.Client, path: str) -> int | str:
    try:
        return client.get(path).status_code
    except httpx.TransportError as exc:
        return type(exc).__name__


# ---------------------------------------------------------------- measurements, as docs/reliability.md shows them


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.1f} ms" if value < 100 else f"{value:.0f} ms"


TIMES = "\u00d7"  # the multiplication sign


def tally(counts: Mapping[Any, int]) -> str:
    """Each outcome with how often it came: '404x48, 414x2' (with the multiplication sign)."""
    return ", ".join(f"{outcome}{TIMES}{n}" for outcome, n in counts.items()) or "none"


def probes(poller: LivenessPoller) -> str:
    return (f"{len(poller.latencies)} probes, max {ms(poller.max_latency)}, "
            f"{len(poller.failures)} failed{f' (first {poller.failures[:3]})' if poller.failures else ''}")


# ---------------------------------------------------------------- a. unknown names


def test_unknown_model_names_cost_nothing(repo: Path) -> None:
    """Attack: random, huge model names and versions (1 MB in bodies and gRPC fields, ~8 KB in URLs).
    Each must be a plain 404 / NOT_FOUND that leaves nothing behind: no metric label per name (the
    /metrics page and the registry would grow without bound), no slow lookups that stall the loop."""
    codes: Counter[tuple[str, int | str]] = Counter()
    with serving(repo) as s, LivenessPoller(s.url, "/v2/health/ready", max_duration_s=120) as ready:
        with httpx.Client(base_url=s.url, timeout=30) as http, grpc.insecure_channel(s.grpc_target) as channel:
            for _ in range(50):
                reply = http.post("/v1/embeddings", json={"model": junk(MB), "input": "hello"})
                codes["/v1/embeddings", reply.status_code] += 1
            for _ in range(25):
                reply = http.post(f"/v2/models/{junk(8192)}/infer", json=V2_BODY)
                codes["v2 url", reply.status_code] += 1
            for _ in range(25):
                reply = http.post(f"/v2/models/{junk(4096)}/versions/{junk(4096)}/infer", json=V2_BODY)
                codes["v2 url", reply.status_code] += 1
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(100):
                request = infer_request(junk(MB), model_version=junk(MB))
                codes["ModelInfer", grpc_code(stub.ModelInfer, request, timeout=30)] += 1
        try:
            metrics = s.http.get("/metrics", timeout=10)
        except httpx.TimeoutException:
            pytest.fail("/metrics took over 10 s to render")
    labels = {re.sub(r"\\(.)", r"\1", v) for v in re.findall(r'[{,]model="((?:[^"\\]|\\.)*)"', metrics.text)}
    got = {kind: tally({code: n for (k, code), n in codes.items() if k == kind})
           for kind in ("/v1/embeddings", "v2 url", "ModelInfer")}
    shown = ", ".join(sorted(v if len(v) < 40 else v[:37] + "..." for v in labels))
    record("unknown_model_names",
           "200 requests naming random models and versions: 1 MB names in REST bodies (50), ~8 KB URLs (50), "
           "1 MB names and versions in gRPC fields (100)",
           "404 each (URLs: 404 or 414) / NOT_FOUND each; /metrics < 256 KB, model labels only emb, topics "
           "and at most one other (< 32 chars); readiness never fails, max < 100 ms",
           f"bodies {got['/v1/embeddings']}; URLs {got['v2 url']}; gRPC {got['ModelInfer']}; /metrics "
           f"{metrics.status_code}, {len(metrics.content) / 1024:.0f} KB, labels {{{shown}}}; "
           f"readiness {probes(ready)}")
    assert codes["/v1/embeddings", 404] == 50, codes
    # 404, or 414 URI Too Long where the HTTP server caps request lines (only these ~8 KB URLs may get it)
    assert codes["v2 url", 404] + codes["v2 url", 414] == 50, codes
    assert codes["ModelInfer", "NOT_FOUND"] == 100, codes
    assert metrics.status_code == 200 and len(metrics.content) < 256 * 1024, len(metrics.content)
    extra = labels - SERVED
    assert len(extra) <= 1 and all(len(v) < 32 for v in extra), sorted(v[:40] for v in extra)[:5]
    # ready answers within 100 ms throughout (the client threads share the 2 cores with the server)
    assert not ready.failures and ready.max_latency < 0.1, ready.summary()


# ---------------------------------------------------------------- b. oversized inputs


@dataclass
class Upload:
    status: int | None  # the answer's status, None if none came
    sent_before_answer: int  # body bytes sent when the first byte of the answer arrived
    sent: int  # body bytes sent in all


def upload(host: str, port: int, total: int, *, chunked: bool = False, chunk: int = 64 * 1024,
           max_seconds: float = 30) -> Upload:
    """POST /v1/embeddings with a ``total``-byte body, announced in Content-Length or sent chunked
    (no size up front: the server can only count), reading between writes and stopping as soon as
    an answer arrives (or the server stops the upload)."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    first = b'{"model": "emb", "input": "'
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % total
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n%s\r\n\r\n"
                 % (host.encode(), port, framing) + (b"%x\r\n%s\r\n" % (len(first), first) if chunked else first))
    piece = b"a" * chunk
    wire = memoryview(b"%x\r\n%s\r\n" % (chunk, piece) if chunked else piece)  # one chunk's bytes on the wire
    answer, sent, answered_at = b"", len(first), None
    pending = wire[:0]
    deadline = time.monotonic() + max_seconds
    sock.setblocking(False)
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while (sent < total or pending) and answered_at is None and time.monotonic() < deadline:
            for _, events in sel.select(1.0):
                if events & selectors.EVENT_READ:  # an answer (or EOF) before the body is done
                    with suppress(BlockingIOError, OSError):
                        answer += sock.recv(1 << 16)
                    answered_at = sent
                elif events & selectors.EVENT_WRITE:
                    if not pending:
                        pending, sent = wire, sent + chunk
                    try:
                        pending = pending[sock.send(pending):]
                    except BlockingIOError:
                        pass
                    except OSError:  # the server stopped the upload: read what it answered
                        answered_at = sent
    sock.setblocking(True)
    sock.settimeout(5)
    with suppress(OSError):
        if answered_at is None and chunked:
            sock.sendall(b"0\r\n\r\n")
        while b"\r\n" not in answer and (data := sock.recv(1 << 16)):
            answer += data
    sock.close()
    match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return Upload(int(match.group(1)) if match else None, answered_at if answered_at is not None else sent, sent)


def best_of(n: int, call: Callable[[], Any]) -> tuple[float, list[Any]]:
    """The fastest of ``n`` runs of ``call`` (scheduling noise on a shared box only ever adds time)."""
    times, results = [], []
    for _ in range(n):
        start = time.perf_counter()
        results.append(call())
        times.append(time.perf_counter() - start)
    return min(times), results


def test_oversized_inputs_are_refused_early_and_cheaply(repo: Path) -> None:
    """Attack: payloads sized to exhaust memory or CPU. A 64 MB body (refused while it arrives, not
    after it was buffered), one 3 MB text (refused before tokenizing), a tensor of a million empty
    strings over gRPC (refused from its shape, not walked). The event loop stays responsive."""
    with serving(repo) as s, LivenessPoller(s.url, max_duration_s=120) as live:
        for _ in range(5):  # warm: first requests allocate what every later one reuses
            assert s.http.post("/v1/embeddings", json={"model": "emb", "input": "warm up"}).status_code == 200
        host, port = s.http_addr
        with RssSampler(s.pid) as rss:
            announced = upload(host, port, 64 * MB)
            chunked = upload(host, port, 64 * MB, chunked=True)
        record("oversized_inputs", "a 64 MB REST body, twice: announced in Content-Length, and chunked (no size "
               "up front)", "413 each, answered before 24 MB were sent (the 4 MB cap plus socket buffers); "
               "server RSS growth < 50 MB",
               f"{announced.status} after {announced.sent_before_answer / MB:.1f} MB (Content-Length), "
               f"{chunked.status} after {chunked.sent_before_answer / MB:.1f} MB (chunked); "
               f"RSS +{rss.growth / MB:.1f} MB (peak {rss.peak / MB:.0f} MB)")
        for big in (announced, chunked):
            assert big.status == 413, big
            # answered after the 4 MB cap plus what loopback socket buffers hold, long before 64 MB
            assert big.sent_before_answer < 24 * MB, big
        assert rss.growth < 50 * MB, f"RSS grew {rss.growth / MB:.1f} MB"

        text_body = json.dumps({"model": "emb", "input": "a" * 3_000_000}).encode()
        with httpx.Client(base_url=s.url, timeout=30) as http:
            assert http.get("/v2/health/live").status_code == 200  # a warm connection: time the request only
            fastest, replies = best_of(3, lambda: http.post("/v1/embeddings", content=text_body,
                                                              headers={"content-type": "application/json"}))
        record("oversized_inputs", "one 3 MB text in a JSON body (REST), 3 times",
               "400 each (refused before tokenizing), the fastest < 50 ms",
               f"{tally(Counter(r.status_code for r in replies))}; fastest {ms(fastest)}")
        assert [r.status_code for r in replies] == [400] * 3, [r.text[:200] for r in replies]
        assert fastest < 0.05, f"3 MB text refused in {fastest * 1000:.1f} ms"

        empties = infer_request(texts=("",) * 1_000_000).SerializeToString()  # built before timing
        with grpc.insecure_channel(s.grpc_target) as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)  # connected
            raw = channel.unary_unary(MODEL_INFER)  # bytes in, bytes out: no client-side serializing timed
            fastest, codes = best_of(3, lambda: grpc_code(raw, empties, timeout=10))
        record("oversized_inputs", "a gRPC ModelInfer tensor of 1,000,000 empty strings (serialized up front), 3 times",
               "INVALID_ARGUMENT each (refused from its shape), the fastest < 50 ms",
               f"{tally(Counter(codes))}; fastest {ms(fastest)}")
        assert codes == ["INVALID_ARGUMENT"] * 3, codes
        assert fastest < 0.05, f"a million empty elements refused in {fastest * 1000:.1f} ms"
    record("oversized_inputs", "liveness probes (every 50 ms, one keep-alive connection) throughout the three above",
           "no failed probe, max < 200 ms", probes(live))
    assert not live.failures and live.max_latency < 0.2, live.summary()


# ---------------------------------------------------------------- c. gRPC floods, compression, TLS


def test_grpc_stream_and_ping_floods_are_cut_off(repo: Path) -> None:
    """Attack: 16 raw HTTP/2 connections, each opening 128 calls that announce a 4 MB message and send
    only part of it (the server holds the parts), then flooding PINGs. Memory stays bounded, the
    flooders get GOAWAY (or are closed), and stock clients keep being served within 1 s throughout."""
    with serving(repo) as s, RssSampler(s.pid) as rss, TritonProbe(s.grpc_target) as probe:
        host, port = s.grpc_addr
        flooders: list[RawH2] = []
        opened_each: list[int] = []
        try:
            for _ in range(16):
                conn = RawH2(host, port, timeout_s=5)
                flooders.append(conn)
                # 768 KB per stream at most: 1.5 GB if the server let it all in, above the 1 GiB bound
                opened_each.append(len(conn.send_partial_messages(128, announce=4_000_000,
                                                                  max_bytes_per_stream=768 * 1024, max_seconds=3)))
            opened = sum(opened_each)
            sent = sum(sum(c.sent.values()) for c in flooders)
            # what the server let into one stream: the two limits, seen apart (each alone would keep RSS
            # under the bound here, so RSS cannot tell that one of them went missing)
            per_stream = max((max(c.sent.values(), default=0) for c in flooders), default=0)
            advertised = {c.conn.remote_settings.max_concurrent_streams for c in flooders}
            for _ in range(5):
                for conn in flooders:
                    conn.ping_flood(200, max_seconds=1)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not all(c.terminated for c in flooders):
                for conn in flooders:
                    conn.receive(0.02)
            outcome = Counter("goaway" if c.goaway is not None else "closed" if c.closed else "open" for c in flooders)
        finally:
            for conn in flooders:
                conn.close()
        after = triton_infer(s.grpc_target)
    goaways = Counter(h2_error(c.goaway) for c in flooders if c.goaway is not None)
    record("grpc_stream_and_ping_floods",
           "16 raw HTTP/2 connections, each opening 128 calls that announce a 4 MB message and send up to 768 KB "
           "of it, never finishing; then 5 rounds of 200 PINGs per connection",
           "the server advertises 128 streams per connection, at most 256 KB accepted per stream (the "
           "announced 4 MB exceeds the 3 MiB gRPC message cap); server peak RSS < 1 GiB; every flooder gets "
           "GOAWAY or is closed; a stock client's inference every 250 ms (at least 3) never fails and each "
           "< 1 s, one after < 1 s",
           f"{opened} calls opened, at most {max(opened_each)} per connection (advertised {sorted(advertised)}) "
           f"({sum(c.refused_locally for c in flooders)} more held back by the server's stream limit), at most "
           f"{per_stream / 1024:.0f} KB accepted per stream, {sent / MB:.0f} MB of partial messages and "
           f"{sum(c.pings_sent for c in flooders)} PINGs sent; peak RSS {rss.peak / MB:.0f} MB "
           f"(from {rss.baseline / MB:.0f} MB); flooders {tally(outcome)}, GOAWAY codes {tally(goaways)}; "
           f"stock client {len(probe.latencies)} calls, max {ms(max(probe.latencies, default=0.0))}, "
           f"{len(probe.failures)} failed, after {ms(after)}")
    assert opened >= 16, opened
    assert advertised == {128} and max(opened_each) <= 128, (advertised, opened_each)  # grpc_max_concurrent_streams
    assert per_stream <= 256 * 1024, per_stream  # refused from the prefix, not buffered (grpc_max_message_bytes)
    assert rss.peak < 1024 * MB, f"peak RSS {rss.peak / MB:.0f} MB after {sent / MB:.0f} MB of partial messages"
    assert outcome["open"] == 0, outcome
    assert len(probe.latencies) >= 3 and not probe.failures, probe.failures[:5]
    assert max(probe.latencies) < 1.0 and after < 1.0, (max(probe.latencies), after)


def h2_error(code: int) -> str:
    """An HTTP/2 error code's name (ENHANCE_YOUR_CALM for 11), or the number."""
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


def test_grpc_gzip_requests_are_served(server: Server) -> None:
    """Compression is accepted: a gzip-compressed call (large enough that gRPC really compresses it)."""
    texts = ("commit your changes before merging",) * 64
    with grpc.insecure_channel(server.grpc_target, compression=grpc.Compression.Gzip) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(texts=texts), timeout=30)
    record("grpc_gzip", "a gzip-compressed ModelInfer of 64 texts (stock grpcio channel)", "answered: 64 embeddings",
           f"OK, {reply.outputs[0].shape[0] if reply.outputs else 'no'} embeddings")
    assert reply.outputs[0].shape[0] == 64


def test_raw_h2_client_speaks_grpc(server: Server) -> None:
    """The harness itself: the raw HTTP/2 client completes a real unary ModelInfer (so the flood test
    attacks a server that would have answered it)."""
    host, port = split_target(server.grpc_target)
    result = raw_grpc_call(host, port, MODEL_INFER, infer_request().SerializeToString())
    bad = raw_grpc_call(host, port, MODEL_INFER, infer_request("no-such-model").SerializeToString())
    reply = pb.ModelInferResponse.FromString(result.replies[0]) if result.replies else pb.ModelInferResponse()
    record("raw_h2_client", "the harness's own HTTP/2 client: a unary ModelInfer for emb, then for an unknown model",
           "status 0 with model emb and 1 row; NOT_FOUND (5)",
           f"status {result.status}, model {reply.model_name or '-'}, "
           f"{reply.outputs[0].shape[0] if reply.outputs else 0} row(s); unknown model: status {bad.status}")
    assert result.status == 0, result
    assert reply.model_name == "emb" and reply.outputs[0].shape[0] == 1
    assert bad.status == grpc.StatusCode.NOT_FOUND.value[0], bad


@dataclass
class Pki:
    ca: trustme.CA
    dir: Path
    ca_file: Path
    cert_file: Path
    key_file: Path
    client: trustme.LeafCert
    stranger: trustme.LeafCert  # a client certificate from a CA the server does not trust

    def context(self, client: trustme.LeafCert | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if client is not None:
            client.configure_cert(context)
        return context

    def channel(self, target: str, client: trustme.LeafCert | None = None) -> grpc.Channel:
        key = client.private_key_pem.bytes() if client else None
        chain = b"".join(p.bytes() for p in client.cert_chain_pems) if client else None
        credentials = grpc.ssl_channel_credentials(self.ca.cert_pem.bytes(), key, chain)
        return grpc.secure_channel(target, credentials)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    out = tmp_path_factory.mktemp("pki")
    ca.cert_pem.write_to_path(str(out / "ca.pem"))
    (out / "server.pem").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(out / "server.key"))
    return Pki(ca, out, out / "ca.pem", out / "server.pem", out / "server.key",
               ca.issue_cert("client.sampserve.test"), trustme.CA().issue_cert("client.sampserve.test"))


def test_tls_on_both_ports(repo: Path, pki: Pki) -> None:
    """Eavesdropping: with a certificate, REST is HTTPS and gRPC is TLS, verified against the CA."""
    s = launch_tls(repo, "--tls-cert-file", str(pki.cert_file), "--tls-key-file", str(pki.key_file),
                   "--drain-grace-s", "2", tls=pki.context())
    try:
        reply = s.http.post("/v1/embeddings", json={"model": "emb", "input": "hello"})
        with pki.channel(s.grpc_target) as channel:
            code, inferred = grpc_call(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, infer_request(),
                                       timeout=10)
        with httpx.Client(timeout=5) as plain:  # no cleartext on the TLS port: a transport error, not a status
            cleartext = get_status(plain, f"http://{s.http_addr[0]}:{s.http_addr[1]}/v2/health/live")
        record("tls_on_both_ports", "REST port: POST /v1/embeddings over HTTPS (server verified against the CA), "
               "then plain HTTP to the same port", "200 over HTTPS; plain HTTP refused (a transport error)",
               f"{s.url.split('://')[0]} {reply.status_code}; plain HTTP: {cleartext}")
        record("tls_on_both_ports", "gRPC port: ModelInfer over TLS (server verified against the CA)",
               "OK with outputs", f"{code}, {len(inferred.outputs) if inferred else 0} output(s)")
        assert s.url.startswith("https://")
        assert reply.status_code == 200, reply.text
        assert code == "OK" and inferred.outputs, code
        assert isinstance(cleartext, str), cleartext
    finally:
        s.stop()


def test_mutual_tls_refuses_clients_without_a_certificate_on_both_ports(repo: Path, pki: Pki) -> None:
    """Unauthorized callers on a shared network: with a client CA, a client needs a certificate that
    CA signed, on both ports; without one (or with another CA's) the handshake is refused."""
    s = launch_tls(repo, "--tls-cert-file", str(pki.cert_file), "--tls-key-file", str(pki.key_file),
                   "--tls-client-ca-file", str(pki.ca_file), "--drain-grace-s", "2", tls=pki.context(pki.client))
    try:
        reply = s.http.post("/v1/embeddings", json={"model": "emb", "input": "hello"})
        with pki.channel(s.grpc_target, pki.client) as channel:
            code, inferred = grpc_call(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer, infer_request(),
                                       timeout=10)
        refused_rest: dict[str, int | str] = {}
        refused_grpc: dict[str, str] = {}
        for name, client in (("none", None), ("another CA's", pki.stranger)):
            with httpx.Client(base_url=s.url, timeout=5, verify=pki.context(client)) as anonymous:
                # refused at the handshake: not even health (a transport error, not a status)
                refused_rest[name] = get_status(anonymous, "/v2/health/live")
            with pki.channel(s.grpc_target, client) as channel:
                refused_grpc[name] = grpc_code(pb_grpc.GRPCInferenceServiceStub(channel).ServerLive,
                                               pb.ServerLiveRequest(), timeout=5)
        record("mutual_tls", "REST port: POST /v1/embeddings with a client certificate the CA signed; "
               "GET /v2/health/live with none, and with another CA's",
               "200 with it; without, the handshake refused (a transport error), even for health",
               f"with it {reply.status_code}; " + "; ".join(f"{k}: {v}" for k, v in refused_rest.items()))
        record("mutual_tls", "gRPC port: ModelInfer with the client certificate; ServerLive with none, and "
               "with another CA's", "OK with it; UNAVAILABLE (handshake refused) without",
               f"with it {code}; " + "; ".join(f"{k}: {v}" for k, v in refused_grpc.items()))
        assert reply.status_code == 200
        assert code == "OK" and inferred.outputs, code
        for name in refused_rest:
            assert isinstance(refused_rest[name], str), (name, refused_rest[name])
            assert refused_grpc[name] == "UNAVAILABLE", (name, refused_grpc[name])
    finally:
        s.stop()


# ---------------------------------------------------------------- d. idle and slow connections


def _publish_copy_of(repo: Path, model: str, version: int) -> Path:
    source = repo / model / str(version)
    return publish(repo / model, {p.name: p for p in source.iterdir() if p.name != "manifest.json"})


def _versions(client: httpx.Client, model: str) -> list[str]:
    try:
        reply = client.get(f"/v2/models/{model}")
    except httpx.TransportError:
        return []
    return list(reply.json().get("versions", [])) if reply.status_code == 200 else []


def test_idle_and_slow_connections_are_closed_and_the_server_keeps_working(private_repo: Path) -> None:
    """Attack: connection exhaustion. 2,000 connections that send nothing and 200 slowloris clients
    (headers, or the HTTP/2 preface, one byte a second) on each port. All are closed within the
    timeouts (2 s) plus a 10 s margin, the server never runs out of descriptors, health keeps
    answering and a version published meanwhile loads."""
    # 4,400 client sockets here, as many server-side; the server inherits the raised limit
    if (limit := raise_nofile_limit(16384)) < 10_000:
        pytest.skip(f"RLIMIT_NOFILE hard limit {limit} leaves no room for 4,400 connections")
    margin = 10.0
    flags = ("--idle-timeout-s", "2", "--header-timeout-s", "2", "--grpc-handshake-timeout-s", "2",
             "--poll-interval-s", "0.5")
    herds: list[tuple[str, ConnectionHerd]] = []
    with serving(private_repo, *flags) as s, LivenessPoller(s.url, max_duration_s=120) as live:
        try:
            for name, (host, port), http2 in (("REST", s.http_addr, False), ("gRPC", s.grpc_addr, True)):
                herds.append((f"{name} idle", open_idle_connections(host, port, 2000)))
                herds.append((f"{name} slow", slow_header_clients(host, port, 200, http2=http2, max_seconds=20)))
            new = _publish_copy_of(private_repo, "emb", 1).name
            with httpx.Client(base_url=s.url, timeout=5) as client:
                loaded = wait_for(lambda: new in _versions(client, "emb"), timeout_s=20, period_s=0.2)
            for _, herd in herds:
                herd.wait_all_closed(max(0.0, herd.connected_at + 2 + margin - time.monotonic()))
            report = {name: herd.summary() for name, herd in herds}
            still_open = {name: herd.open_count for name, herd in herds}
            late = {name: max((t for t in herd.closed_at if t is not None), default=0.0) for name, herd in herds}
        finally:
            for _, herd in herds:
                herd.close()
        live_after = get_status(s.http, "/v2/health/live")
    log = s.output()
    emfile = "Too many open files" in log or "EMFILE" in log
    record("idle_and_slow_connections",
           "on each port: 2,000 TCP connections that send nothing and 200 slowloris clients (HTTP/1.1 headers, "
           "or the HTTP/2 preface, one byte a second); idle, header and handshake timeouts 2 s",
           f"every connection closed by the server within {2 + margin:.0f} s (2 s + {margin:.0f} s margin); "
           "no EMFILE in the server's output",
           "; ".join(f"{name} {herd.closed_count}/{len(herd.socks)} closed by {late[name]:.1f} s"
                     + (f" ({herd.failed} never connected)" if herd.failed else "") for name, herd in herds)
           + f"; EMFILE {'logged' if emfile else 'never logged'}")
    record("idle_and_slow_connections", "meanwhile: a new emb version published; liveness probed every 50 ms",
           "the new version served within 20 s; liveness never fails, max < 1 s (and 200 after)",
           f"version {new} {'served' if loaded else 'never served'}; liveness {probes(live)}, {live_after} after")
    assert live_after == 200
    assert not any(still_open.values()), report
    assert all(t <= 2 + margin for t in late.values()), report
    assert not emfile
    assert loaded, f"version {new} never served"
    assert not live.failures and live.max_latency < 1.0, live.summary()


# ---------------------------------------------------------------- e. API key

API_KEY = "test-secret-key-123"
AUTH = {"authorization": f"Bearer {API_KEY}"}
INFERENCE_ROUTES = [
    ("/v1/embeddings", {"model": "emb", "input": "hello"}),
    ("/v1/classify", {"model": "topics", "texts": ["cannot open file"]}),
    ("/v1/similarity", {"model": "emb", "pairs": [["hello", "hi"]]}),
    ("/v1/rerank", {"model": "emb", "query": "merge", "documents": ["merge branches", "print a file"]}),
    ("/v2/models/emb/infer", V2_BODY),
    ("/v2/models/emb/versions/1/infer", V2_BODY),
]


def test_api_key_guards_inference_and_never_leaks(repo: Path) -> None:
    """Unauthorized use: with an API key, every inference route and method needs it (401 /
    UNAUTHENTICATED without it or with a wrong one), health stays open for probes, and the key never
    reaches the server's output (startup lines, access log, errors)."""
    s = Served(start_server(repo, "--api-key", API_KEY, cwd=ROOT))
    refused: list[tuple[str, dict[str, str], int, str]] = []  # (path, headers, status, body) without a valid key
    accepted: list[tuple[str, int, str]] = []  # (path, status, body) with the key
    health: dict[str, int] = {}
    unauthenticated: list[tuple[str, tuple[tuple[str, str], ...], str]] = []  # (method, metadata, code)
    authenticated: dict[str, str] = {}
    try:
        http = s.http
        for path, body in INFERENCE_ROUTES:
            for headers in ({}, {"authorization": "Bearer wrong-key"}, {"authorization": API_KEY}):
                reply = http.post(path, json=body, headers=headers)
                refused.append((path, headers, reply.status_code, reply.text))
            reply = http.post(path, json=body, headers=AUTH)
            accepted.append((path, reply.status_code, reply.text[:300]))
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/emb/ready", "/metrics"):
            health[path] = http.get(path).status_code  # probes and scrapers need no key
        with grpc.insecure_channel(s.grpc_target) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel)
            embed = tasks_grpc.TasksStub(channel).Embed
            calls = {"ModelInfer": lambda md: infer.ModelInfer(infer_request(), metadata=md, timeout=10),
                     "Embed": lambda md: embed(tasks_pb.EmbedRequest(model="emb", texts=["hello"]), metadata=md,
                                               timeout=10)}
            for name, call in calls.items():
                for metadata in ((), (("authorization", "Bearer wrong-key"),)):
                    unauthenticated.append((name, metadata, grpc_code(call, metadata)))
                authenticated[name] = grpc_code(call, (("authorization", f"Bearer {API_KEY}"),))
            live = grpc_call(infer.ServerLive, pb.ServerLiveRequest(), timeout=10)[1]
            ready = grpc_call(infer.ServerReady, pb.ServerReadyRequest(), timeout=10)[1]
    finally:
        s.stop()
    log = s.output()
    record("api_key", f"{len(INFERENCE_ROUTES)} REST inference routes and 2 gRPC methods without the key, with a "
           "wrong one, with it not as a Bearer token (REST); then with it; health, readiness and /metrics without",
           "401 (JSON error) / UNAUTHENTICATED without a valid key, 200 / OK with it; health, readiness, "
           "/metrics, ServerLive and ServerReady answer without",
           f"REST without {tally(Counter(r[2] for r in refused))}, with {tally(Counter(a[1] for a in accepted))}; "
           f"gRPC without {tally(Counter(u[2] for u in unauthenticated))}, "
           f"with {tally(Counter(authenticated.values()))}; "
           f"health and /metrics {tally(Counter(health.values()))}; ServerLive {bool(live and live.live)}, "
           f"ServerReady {bool(ready and ready.ready)}")
    record("api_key", "the key in the server's whole output (startup lines, access log, errors, shutdown)",
           "absent; the refusals logged (a 401 line per REST refusal, UNAUTHENTICATED), output to 'drained; bye'",
           f"key {log.count(API_KEY)} times in {len(log.splitlines())} lines; {log.count(' 401 ')} lines with 401, "
           f"UNAUTHENTICATED {'logged' if 'UNAUTHENTICATED' in log else 'not logged'}, 'drained; bye' "
           f"{'present' if 'drained; bye' in log else 'missing'}")
    for path, headers, status, text in refused:
        assert status == 401, (path, headers, status)
        assert isinstance(json.loads(text), dict), text
    for path, status, text in accepted:
        assert status == 200, (path, text)
    for path, status in health.items():
        assert status == 200, path
    for name, metadata, code in unauthenticated:
        assert code == "UNAUTHENTICATED", (name, metadata)
    for name, code in authenticated.items():
        assert code == "OK", name
    assert live and live.live
    assert ready and ready.ready
    assert "REST on " in log  # the whole output, from its first line
    assert log.count(" 401 ") >= 3 * len(INFERENCE_ROUTES)  # the refusals were logged: the check below is not vacuous
    assert "UNAUTHENTICATED" in log and "drained; bye" in log
    assert API_KEY not in log


# ---------------------------------------------------------------- f. a runtime that hangs


def test_a_hung_runtime_fails_its_calls_flips_liveness_and_does_not_block_exit(private_repo: Path,
                                                                                tmp_path: Path) -> None:
    """Attack (or fault): a runtime call that never returns. Its requests get 504 after the runtime
    timeout while other models keep serving; enough stuck calls make liveness false (so an
    orchestrator restarts the pod); releasing them makes it true again; and SIGTERM still exits
    within the drain grace with a call stuck."""
    config_path = private_repo / "emb" / MODEL_CONFIG_FILE
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "runtime": "hanging"}))
    flag = tmp_path / "hang"
    flags = ("--plugins", "tests.service.hanging_runtime", "--runtime-timeout-s", "1", "--max-hung-calls", "2",
             "--instances", "1", "--drain-grace-s", "2")
    embed = {"model": "emb", "input": "hello"}
    classify = {"model": "topics", "texts": ["cannot open file"]}
    server = start_server(private_repo, *flags, env={"SAMPSERVE_TEST_HANG_FLAG": str(flag)}, cwd=ROOT)
    s = Served(server)
    try:
        http = s.http
        assert http.post("/v1/embeddings", json=embed).status_code == 200  # the plugin runtime serves
        flag.touch()
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(timed_post, s.url, "/v1/embeddings", embed, 10)
            time.sleep(0.2)
            others = [http.post("/v1/classify", json=classify).status_code]  # another model keeps serving
            status, seconds = first.result()
            record("hung_runtime", "an emb call into a runtime that never returns (--runtime-timeout-s 1); "
                   "meanwhile a topics call", "504 within 3 s; topics 200",
                   f"{status} after {seconds:.2f} s; topics {others[0]}")
            assert others[0] == 200, others
            assert status == 504 and seconds < 3.0, (status, seconds)
            # a second call for the wedged runtime: whether it reaches one (and hangs) or waits for an
            # instance that cannot come, two calls stuck past the timeout must make the process unlive
            second = pool.submit(timed_post, s.url, "/v1/embeddings", embed, 12)
            time.sleep(0.2)
            others.append(http.post("/v1/classify", json=classify).status_code)
            start = time.monotonic()
            unlive = wait_for(lambda: get_status(http, "/v2/health/live") == 503, timeout_s=5)
            unlive_after = time.monotonic() - start
            live_then = get_status(http, "/v2/health/live")
            flag.unlink()
            start = time.monotonic()
            relive = wait_for(lambda: get_status(http, "/v2/health/live") == 200, timeout_s=5)
            relive_after = time.monotonic() - start
            serves = wait_for(lambda: http.post("/v1/embeddings", json=embed).status_code == 200, timeout_s=5)
            second.result()
        record("hung_runtime", "a second emb call stuck (--max-hung-calls 2); then the runtime released",
               "liveness 503 within 5 s, topics 200 meanwhile; once released, liveness 200 and emb served "
               "again within 5 s each",
               (f"liveness 503 after {unlive_after:.1f} s" if unlive else f"liveness still {live_then} after 5 s")
               + f", topics {others[1]}; released: liveness "
               + (f"200 after {relive_after:.1f} s" if relive else "not 200 in 5 s")
               + f", emb {'served' if serves else 'not served'}")
        assert others[1] == 200, others
        assert unlive, f"/v2/health/live still {live_then} with two calls stuck"
        assert relive and serves, (relive, serves)
        flag.touch()  # SIGTERM with a call stuck in the runtime
        hanging_call = threading.Thread(target=timed_post, args=(s.url, "/v1/embeddings", embed, 15), daemon=True)
        hanging_call.start()
        time.sleep(0.3)
        start = time.monotonic()
        s.server.process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            s.server.process.wait(timeout=15)
        exited_after = time.monotonic() - start
        code = s.server.process.poll()
        record("hung_runtime", "SIGTERM with an emb call stuck in the runtime (--drain-grace-s 2)",
               "the process exits within 10 s",
               f"exited (code {code}) after {exited_after:.1f} s" if code is not None
               else f"still running {exited_after:.1f} s after SIGTERM")
        assert s.server.process.poll() is not None and exited_after < 10, f"running {exited_after:.1f} s after SIGTERM"
    finally:
        with suppress(FileNotFoundError):
            flag.unlink()
        s.stop(5)
        if s.server.process.poll() is None:
            s.server.process.kill()


def test_sigterm_exits_within_the_drain_bound_with_a_call_stuck_past_it(private_repo: Path, tmp_path: Path) -> None:
    """Fault: a runtime call stuck far longer than the drain grace (runtime timeout 60 s, grace 1 s).
    The watchdog ends the process drain_grace_s + 5 s after SIGTERM (exit status 3), so an
    orchestrator's stop never waits on a native call that will not return."""
    config_path = private_repo / "emb" / MODEL_CONFIG_FILE
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "runtime": "hanging"}))
    flag = tmp_path / "hang"
    server = start_server(private_repo, "--plugins", "tests.service.hanging_runtime", "--runtime-timeout-s", "60",
                          "--instances", "1", "--drain-grace-s", "1", env={"SAMPSERVE_TEST_HANG_FLAG": str(flag)},
                          cwd=ROOT)
    try:
        flag.touch()
        stuck = threading.Thread(target=timed_post, args=(server.url, "/v1/embeddings", {"model": "emb",
                                                                                        "input": "x"}, 30),
                                 daemon=True)
        stuck.start()
        time.sleep(0.5)
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=15)
        exited_after = time.monotonic() - start
        code = server.process.poll()
        record("drain_bound", "SIGTERM while an emb call is stuck in the runtime (--runtime-timeout-s 60, "
               "--drain-grace-s 1)", "exit within 1 + 5 s (+2 s margin), status 3 from the watchdog",
               f"exited (code {code}) after {exited_after:.1f} s" if code is not None
               else f"still running {exited_after:.1f} s after SIGTERM")
        assert code == 3 and 5.5 < exited_after < 8.0, (code, exited_after)
        assert "drain did not finish within 6s" in server.output()
    finally:
        with suppress(FileNotFoundError):
            flag.unlink()
        if server.process.poll() is None:
            server.process.kill()


def timed_post(url: str, path: str, body: dict[str, Any], timeout_s: float) -> tuple[int | str, float]:
    """POST on a connection of its own: (the status or the exception's name, seconds)."""
    start = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=timeout_s) as client:
            status: int | str = client.post(path, json=body).status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    return status, time.monotonic() - start


# ---------------------------------------------------------------- g. unservable folders


class EmbedLoad(ClosedLoop):
    """REST clients on threads, each on its own connection, embedding with the healthy model."""

    def __init__(self, url: str, clients: int) -> None:
        super().__init__(clients)
        self.url = url

    def connect(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def call(self, client: httpx.Client) -> tuple[int | str, str]:
        try:
            return client.post("/v1/embeddings", json={"model": "emb", "input": "merge the branches"}).status_code, ""
        except httpx.TransportError as exc:
            return type(exc).__name__, ""


def _add_unservable_models(repo: Path) -> None:
    """A model without any version yet, and one whose config is not JSON (each appears in one rename)."""
    for name, config in (("fresh", json.dumps({"name": "fresh", "task": "matching", "source": "tests"})),
                         ("broken", "{not json")):
        staging = repo / f".staging-{name}"
        staging.mkdir()
        (staging / MODEL_CONFIG_FILE).write_text(config)
        staging.rename(repo / name)


def _reason(reply: httpx.Response) -> str:
    try:
        body = reply.json()
    except ValueError:
        return ""
    for key in ("reason", "error"):
        value = body.get(key) if isinstance(body, dict) else None
        if isinstance(value, dict):
            value = value.get("message")
        if isinstance(value, str) and value:
            return value
    return ""


def test_unservable_model_folders_do_not_disturb_serving(private_repo: Path) -> None:
    """Fault (or a hostile write to the repository): a model folder with no version and one with a
    config that is not JSON appear under load. Nothing served fails, the server stays ready, and
    each bad model's readiness is 503 with the reason."""
    with serving(private_repo, "--poll-interval-s", "0.2") as s, \
            LivenessPoller(s.url, "/v2/health/ready", max_duration_s=60) as ready, EmbedLoad(s.url, 4) as load:
        time.sleep(0.5)
        _add_unservable_models(private_repo)
        replies: dict[str, httpx.Response] = {}

        def both_refused() -> bool:
            for name in ("fresh", "broken"):
                replies[name] = s.http.get(f"/v2/models/{name}/ready")
            return all(r.status_code == 503 and _reason(r) for r in replies.values())

        start = time.monotonic()
        settled = wait_for(both_refused, timeout_s=10, period_s=0.2)
        settled_after = time.monotonic() - start
        time.sleep(1.0)  # a few more polls of the repository under load
    record("unservable_model_folders", "under load (4 REST clients embedding with emb): a model folder with no "
           "version and one whose config is not JSON appear (--poll-interval-s 0.2)",
           "each bad model's readiness 503 with a reason within 10 s; every embed 200 (more than 20); server "
           "readiness never fails",
           "; ".join(f"{name} {r.status_code} '{_reason(r).replace(str(private_repo), 'repo')[:160]}'"
                     for name, r in replies.items())
           + (f" (after {settled_after:.1f} s)" if settled else " (not both within 10 s)")
           + f"; embeds {tally(load.codes)}; readiness {probes(ready)}")
    assert settled, {name: (r.status_code, r.text[:300]) for name, r in replies.items()}
    assert set(load.codes) == {200} and load.codes[200] > 20, load.codes
    assert not ready.failures, ready.summary()


def test_strict_readiness_counts_unservable_model_folders(private_repo: Path) -> None:
    """With --strict-readiness true, server readiness requires every model in the repository: the
    same two folders turn /v2/health/ready to 503."""
    with serving(private_repo, "--strict-readiness", "true", "--poll-interval-s", "0.2") as s:
        before = get_status(s.http, "/v2/health/ready")
        _add_unservable_models(private_repo)
        start = time.monotonic()
        flipped = wait_for(lambda: get_status(s.http, "/v2/health/ready") == 503, timeout_s=10)
        flipped_after = time.monotonic() - start
        record("strict_readiness", "--strict-readiness true: the same two unservable folders appear",
               "server readiness 200 before, 503 within 10 s",
               f"{before} before; " + (f"503 after {flipped_after:.1f} s" if flipped
                                       else f"still {get_status(s.http, '/v2/health/ready')} after 10 s"))
        assert before == 200
        assert flipped
