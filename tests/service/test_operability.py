"""What an operator sees: request ids echoed and logged, JSON access lines, OpenTelemetry spans
received by a real OTLP/HTTP endpoint, /metrics on its own port, /docs switched off."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.servers import start_server

INFER = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["cannot lock ref"]}]}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class Collector:
    """An OTLP/HTTP endpoint on a loopback port: decodes every export into span names and trace ids."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        spans.extend((s.name, s.trace_id.hex()) for s in scope.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def names(self) -> set[str]:
        return {name for name, _ in self.spans}


@pytest.fixture
def collector() -> Iterator[Collector]:
    running = Collector()
    yield running
    running.server.shutdown()


def test_spans_for_rest_and_grpc_reach_an_otlp_endpoint(repo, collector):
    server = start_server(repo, "--otlp-endpoint", collector.url)
    try:
        traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
        response = server.http.post("/v2/models/emb/infer", json=INFER, headers={"traceparent": traceparent})
        assert response.status_code == 200
        with grpc.insecure_channel(server.grpc_target) as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(
                model_name="emb", inputs=[pb.ModelInferRequest.InferInputTensor(
                    name="text", datatype="BYTES", shape=[1],
                    contents=pb.InferTensorContents(bytes_contents=[b"hello"]))]), timeout=30)
        wanted = {"POST /v2/models/emb/infer", "/inference.GRPCInferenceService/ModelInfer", "tokenize", "queue",
                  "compute"}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not wanted <= collector.names():
            time.sleep(0.2)
        assert wanted <= collector.names(), collector.names()
        rest_traces = {trace for name, trace in collector.spans if name == "POST /v2/models/emb/infer"}
        assert rest_traces == {TRACE_ID}  # the caller's trace continues through the server
        in_trace = {name for name, trace in collector.spans if trace == TRACE_ID}
        assert {"tokenize", "queue", "compute"} <= in_trace  # the request's own steps, in its trace
    finally:
        assert server.stop() == 0


def test_request_ids_are_echoed_and_json_access_lines_carry_them(repo):
    server = start_server(repo, "--log-format", "json")
    try:
        given = server.http.post("/v2/models/emb/infer", json=INFER, headers={"X-Request-Id": "job-42.a"})
        assert given.headers["x-request-id"] == "job-42.a"
        made = server.http.post("/v1/embeddings", json={"model": "emb", "input": "hi"})
        assert len(made.headers["x-request-id"]) == 32
        hostile = server.http.get("/v2/health/ready", headers={"X-Request-Id": "x" * 500})
        assert hostile.headers["x-request-id"] != "x" * 500  # not echoed: a new id instead
        with grpc.insecure_channel(server.grpc_target) as channel:
            _, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
                pb.ModelInferRequest(model_name="nope"), metadata=(("x-request-id", "grpc-7"),), timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        assert ("x-request-id", "grpc-7") in tuple(exc.trailing_metadata())
    else:
        raise AssertionError(f"an unknown model was served: {call}")
    finally:
        assert server.stop() == 0
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line.get("logger") == "sampserve.access"}
    assert access["job-42.a"]["status"] == 200 and access["job-42.a"]["model"] == "emb"
    assert access["job-42.a"]["version"] == "1" and access["job-42.a"]["latency_ms"] > 0
    assert access["grpc-7"]["status"] == "NOT_FOUND" and access["grpc-7"]["path"].endswith("/ModelInfer")


def test_metrics_on_their_own_port_and_docs_off(repo):
    server = start_server(repo, "--metrics-port", "0", "--docs", "false")
    try:
        line = "".join(server.lines)
        metrics_url = line.split("metrics on ", 1)[1].split()[0]
        scraped = httpx.get(metrics_url, timeout=10)
        assert scraped.status_code == 200 and "sampserve_model_ready" in scraped.text
        assert "process_resident_memory_bytes" in scraped.text  # the process collector is registered
        assert server.http.get("/metrics").status_code == 404  # not on the API port any more
        assert server.http.get("/docs").status_code == 404 and server.http.get("/openapi.json").status_code == 404
    finally:
        assert server.stop() == 0
