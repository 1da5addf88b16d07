"""The public gRPC port (service.api.grpc_front): its framing, and the real server under real gRPC
clients: one channel past zttp's per-connection stream cap, overload, SIGTERM, a relayed stream,
refused compression and non-gRPC requests."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tritonclient.grpc import service_pb2 as pb  # the v2 protocol's messages, as stock clients build them
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.api.grpc_gen import sampserve_pb2 as tasks_pb
from service.api.grpc_gen import sampserve_pb2_grpc as tasks_grpc
from service.api.grpc_front import CallError, GrpcH2Protocol, MessageReader, frame, one_message, parse_timeout
from tests.servers import start_server

from .conftest import ClosedLoop, set_queue_size


def _request(text: str = "commit your changes before merging") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="emb", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[text.encode()]))])


class GrpcLoad(ClosedLoop):
    """gRPC clients on threads, each with its own channel, counting status codes."""

    def __init__(self, target: str, clients: int) -> None:
        super().__init__(clients)
        self.target = target

    def connect(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def call(self, channel: grpc.Channel) -> tuple[str, str]:
        try:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(), timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name, ""
        return "OK", reply.model_version


# ---------------------------------------------------------------- framing


def test_grpc_timeout_header_units():
    assert parse_timeout("250m") == pytest.approx(0.25)
    assert parse_timeout("10S") == 10 and parse_timeout("2M") == 120 and parse_timeout("1H") == 3600
    assert parse_timeout("1500u") == pytest.approx(0.0015)
    for bad in ("", "10", "123456789S", "5s", "-1S"):
        with pytest.raises(CallError) as caught:
            parse_timeout(bad)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def _reader(chunks: list[bytes], max_bytes: int = 1024) -> MessageReader:
    events = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive() -> dict:
        return events.pop(0) if events else {"type": "http.disconnect"}

    return MessageReader(receive, max_bytes)


async def _all(reader: MessageReader) -> list[bytes]:
    out = []
    while (payload := await reader.next()) is not None:
        out.append(payload)
    return out


async def test_messages_split_across_chunks_and_refusals():
    body = frame(b"first") + frame(b"") + frame(b"x" * 300)
    assert await _all(_reader([body[:3], body[3:11], body[11:]])) == [b"first", b"", b"x" * 300]
    cases = [([b"\x01" + frame(b"zz")[1:]], grpc.StatusCode.UNIMPLEMENTED),  # compressed flag set
             ([frame(b"y" * 2000)], grpc.StatusCode.RESOURCE_EXHAUSTED),      # over max_bytes
             ([frame(b"cut short")[:-3]], grpc.StatusCode.INTERNAL)]          # body ends mid-message
    for chunks, code in cases:
        with pytest.raises(CallError) as caught:
            await _all(_reader(chunks))
        assert caught.value.code == code
        with pytest.raises(CallError) as caught:  # the unary fast path refuses the same bodies
            one_message(b"".join(chunks), 1024)
        assert caught.value.code == code
    assert one_message(frame(b"one"), 1024) == b"one"
    with pytest.raises(CallError, match="exactly one"):
        one_message(frame(b"one") + frame(b"two"), 1024)


# ---------------------------------------------------------------- the real server


def test_one_channel_outlives_the_per_connection_stream_cap(server):
    """More calls than GrpcH2Protocol.max_streams on one channel, 32 at a time: the front retires
    the connection gracefully and the channel moves to a new one with no failed call."""
    calls = GrpcH2Protocol.max_streams + 400
    counts: Counter = Counter()
    lock = threading.Lock()
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def client(n: int) -> None:
            for _ in range(n):
                try:
                    reply = stub.ModelInfer(_request(), timeout=30)
                    key = "OK" if reply.outputs[0].shape == [1, 64] else "bad shape"
                except grpc.RpcError as exc:
                    key = exc.code().name
                with lock:
                    counts[key] += 1

        threads = [threading.Thread(target=client, args=(calls // 32,)) for _ in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert counts == {"OK": calls // 32 * 32}, counts


def test_a_client_that_cancels_many_calls_keeps_its_channel(server):
    """Each cancelled call resets its stream. zttp drops a connection after 256 peer resets; the
    front retires it gracefully before that, so the calls running beside the cancelled ones on the
    same channel never fail."""
    failures: Counter = Counter()
    stopping = threading.Event()
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def steady() -> None:
            while not stopping.is_set():
                try:
                    stub.ModelInfer(_request(), timeout=30)
                except grpc.RpcError as exc:
                    failures[exc.code().name] += 1

        threads = [threading.Thread(target=steady) for _ in range(4)]
        for thread in threads:
            thread.start()
        cancelled = sum(stub.ModelInfer.future(_request(), timeout=30).cancel() for _ in range(3 * 256))
        stopping.set()
        for thread in threads:
            thread.join()
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert cancelled > 2 * 256 and not failures, (cancelled, failures)


def test_relayed_stream_refused_compression_and_non_grpc_requests(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING  # server streaming, relayed
        watch.cancel()
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            # gRPC sends a message uncompressed when gzip would not shrink it: this one shrinks
            stub.ModelInfer(_request("merge " * 2000), compression=grpc.Compression.Gzip, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "identity" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(pb.ModelInferRequest(model_name="nope", inputs=_request().inputs), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in caught.value.details()
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready  # the channel still serves
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    answer = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code}",
                             "-X", "POST", "-d", "{}", "-H", "content-type: application/json",
                             f"http://{server.grpc_target}/inference.GRPCInferenceService/ModelInfer"],
                            capture_output=True, text=True, timeout=30)
    assert answer.stdout == "415"


def test_answers_larger_than_the_flow_control_window_arrive_whole(server):
    """256 embeddings of 64 floats (with protobuf framing, more than HTTP/2's initial 65,535-byte
    window): the answer is sent as the client grants window, trailers after the last byte."""
    texts = [f"sentence number {i} about merging branches" for i in range(256)]
    with grpc.insecure_channel(server.grpc_target) as channel:
        reply = tasks_grpc.TasksStub(channel).Embed(tasks_pb.EmbedRequest(model="emb", texts=texts), timeout=60)
    assert reply.ByteSize() > 65_535
    assert len(reply.embeddings) == 256 and {len(v.values) for v in reply.embeddings} == {64}


def test_grpc_overload_gets_resource_exhausted_and_loses_no_accepted_call(private_repo):
    set_queue_size(private_repo, "emb", 6)
    server = start_server(private_repo)
    try:
        with GrpcLoad(server.grpc_target, clients=16) as load:
            time.sleep(4.0)
        assert load.codes["OK"] > 0 and load.codes["RESOURCE_EXHAUSTED"] > 0, load.codes
        assert set(load.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, load.codes  # each call served or refused
    finally:
        assert server.stop() == 0


def test_sigterm_under_grpc_load_finishes_accepted_calls_and_exits_0(private_repo):
    server = start_server(private_repo)
    with GrpcLoad(server.grpc_target, clients=8) as load:
        time.sleep(1.5)
        before = load.codes["OK"]
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=30)
    assert code == 0 and before > 0
    # calls in flight at SIGTERM finish; later ones are refused (UNAVAILABLE), none fails otherwise
    assert set(load.codes) <= {"OK", "UNAVAILABLE"}, load.codes
