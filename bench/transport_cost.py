"""What one call costs the server in CPU, transport alone: no model, a fixed 384-float answer.

Four servers, each in its own process, under bench/loadgen.py at 64 clients: plain grpc.aio,
grpc.aio as sampserve's gRPC port runs it (its channel options and the edge interceptor: API key
check, request id, access log), uvicorn's HTTP/1.1 with a raw ASGI app, and the same behind the
REST gate (service/api/gate.py) and the connection guard. The two pairs tell what the edges cost. The
server's CPU time (user + system, all threads) divided by the calls it answered is the number
that matters on a small machine: it is taken from the model. Writes its section of
docs/benchmarks.md.

    python bench/transport_cost.py [--seconds 10] [--clients 64]

``BENCH_VARIANT`` (comma-separated ``noedge``, ``nolog``, ``noopt``) strips the sampserve gRPC
server of its interceptor, its access log or its channel options, for the A/B of what each costs.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.docs import machine, write_section  # noqa: E402

MARKS = ("<!-- bench/transport_cost.py begin -->", "<!-- bench/transport_cost.py end -->")
SERVERS = ("grpc.aio", "grpc.aio as sampserve runs it", "uvicorn HTTP/1.1 (raw ASGI)",
           "uvicorn HTTP/1.1 behind sampserve's gate")


def _reply():
    import numpy as np

    from service.api.grpc_gen import grpc_predict_v2_pb2 as pb

    return pb, pb.ModelInferResponse(
        model_name="fp32", model_version="1",
        outputs=[pb.ModelInferResponse.InferOutputTensor(name="embeddings", datatype="FP32", shape=[1, 384])],
        raw_output_contents=[np.zeros((1, 384), "<f4").tobytes()])


async def _serve_grpc_aio(port: int) -> None:
    import grpc

    from service.api.grpc_gen import grpc_predict_v2_pb2_grpc as pb_grpc

    _, reply = _reply()

    class Echo(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            return reply

    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _serve_sampserve_grpc(port: int) -> None:
    import grpc

    from service.api.grpc import INFERENCE_SERVICE, OPEN_METHODS, _handlers, server_options
    from service.api.grpc_edge import EdgeInterceptor
    from service.api.grpc_gen import grpc_predict_v2_pb2_grpc as pb_grpc
    from service.metrics import Metrics
    from service.settings import Settings

    pb, reply = _reply()

    class Echo(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            return reply

    import os

    variant = os.environ.get("BENCH_VARIANT", "")
    edge = EdgeInterceptor(Metrics(), None, {INFERENCE_SERVICE.full_name}, OPEN_METHODS,
                           access_log="nolog" not in variant)
    server = grpc.aio.server(interceptors=[] if "noedge" in variant else [edge],
                             options=[] if "noopt" in variant else server_options(Settings()))
    server.add_generic_rpc_handlers((_handlers(Echo(), INFERENCE_SERVICE, pb),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


async def _serve_http(port: int, gated: bool = False) -> None:
    import orjson
    import uvicorn

    body = orjson.dumps({"model_name": "fp32", "model_version": "1", "outputs": [
        {"name": "embeddings", "datatype": "FP32", "shape": [1, 384], "data": [0.0] * 384}]})

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    if not gated:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                                access_log=False, proxy_headers=False)
    else:
        from service.api.connections import guarded_protocol
        from service.api.gate import Gate
        from service.metrics import Metrics
        from service.settings import Settings

        settings = Settings()
        app = Gate(app, Metrics(), settings.max_body_bytes, settings.body_timeout_s, None, access_log=True)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                                access_log=False, proxy_headers=False,
                                http=guarded_protocol(settings.header_timeout_s, settings.max_connections))
    await uvicorn.Server(config).serve()


def serve(kind: str, port: int) -> None:
    import uvloop

    from service.logs import configure

    configure("text")
    targets = {SERVERS[0]: lambda: _serve_grpc_aio(port), SERVERS[1]: lambda: _serve_sampserve_grpc(port),
               SERVERS[2]: lambda: _serve_http(port), SERVERS[3]: lambda: _serve_http(port, gated=True)}
    uvloop.run(targets[kind]())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


def wait_listening(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def measure(kind: str, clients: int, seconds: float, sentence_file: Path) -> dict:
    from bench.serve import free_port

    port = free_port()
    # the access log (one line a call, as served) goes nowhere: its cost counts, its output does not
    server = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)], cwd=ROOT,
                              stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        grpc = kind in SERVERS[:2]
        url = f"127.0.0.1:{port}" if grpc else f"http://127.0.0.1:{port}"
        before = cpu_seconds(server.pid)
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "loadgen.py"), "--url", url, "--model", "fp32",
                               "--clients", str(clients), "--seconds", str(seconds), "--sentences",
                               str(sentence_file), "--protocol", "grpc" if grpc else "http", "--client", "aiohttp"],
                              capture_output=True, text=True, check=True, cwd=ROOT)
        used = cpu_seconds(server.pid) - before
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    calls = sum(result["codes"].values())
    return {**result, "calls": calls, "ms_per_call": 1000 * used / max(calls, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="each server measured this many times, interleaved")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    from bench.serve import sentences

    sentence_file = Path(tempfile.mkdtemp(prefix="bench-transport-")) / "sentences.json"
    sentence_file.write_text(json.dumps(sentences()))
    results: dict[str, list[dict]] = {kind: [] for kind in SERVERS}
    for _ in range(args.rounds):
        for kind in SERVERS:
            result = measure(kind, args.clients, args.seconds, sentence_file)
            results[kind].append(result)
            print(f"{kind:32s} {result['rps']:8.0f} calls/s  {result['ms_per_call']:.3f} ms CPU per call "
                  f"{result['codes']}", flush=True)
    lines = ["## Transport cost per call: grpc.aio and uvicorn HTTP/1.1, bare and with sampserve's edges", "",
             f"`python bench/transport_cost.py` ({machine()}; {args.clients} clients from bench/loadgen.py, "
             f"grpc.aio for gRPC and aiohttp for HTTP, {args.seconds:.0f} s per run, {args.rounds} interleaved "
             "runs per server). No model: each server answers every call with the same 384-float output, so "
             "this is what the transport alone takes from a model sharing the cores.", "",
             "| server | calls/s | server CPU per call (ms) |", "|---|---|---|"]
    for kind, runs in results.items():
        rates = " / ".join(f"{r['rps']:.0f}" for r in runs)
        costs = " / ".join(f"{r['ms_per_call']:.3f}" for r in runs)
        lines.append(f"| {kind} | {rates} | {costs} |")
    write_section("\n".join(lines) + "\n", args.out, MARKS)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
