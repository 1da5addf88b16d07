"""Closed-loop load generator, run in its own process so it shares nothing with the server.

HTTP uses one aiohttp session (httpx added multi-second p99 spikes of its own at 64 connections
here, docs/design.md); gRPC uses grpc.aio with the v2 protocol's stubs. Each client sends one sentence
per request from a fixed list, as fast as answers come.

    python bench/loadgen.py --url http://127.0.0.1:8000 --model m --clients 16 --seconds 15 \
        --sentences sentences.json [--protocol http|grpc] [--path v2|v1]

Prints one JSON line: requests/s, p50/p99 latency (ms), status counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np


async def _http(url: str, model: str, path: str, sentences: list[str], clients: int, seconds: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    codes: dict[str, int] = {}
    stop = time.perf_counter() + seconds
    if path == "v1":
        endpoint = f"{url}/v1/embeddings"
        make = lambda text: {"model": model, "input": text}  # noqa: E731
    else:
        endpoint = f"{url}/v2/models/{model}/infer"
        make = lambda text: {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}  # noqa: E731

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        i = index
        while time.perf_counter() < stop:
            body = make(sentences[i % len(sentences)])
            i += clients
            start = time.perf_counter()
            try:
                async with session.post(endpoint, json=body) as response:
                    await response.read()
                    key = str(response.status)
            except aiohttp.ClientError as exc:
                key = type(exc).__name__
            if key == "200":
                latencies.append(time.perf_counter() - start)
            codes[key] = codes.get(key, 0) + 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        begin = time.perf_counter()
        await asyncio.gather(*(client(i, session) for i in range(clients)))
        elapsed = time.perf_counter() - begin
    return _summary(latencies, codes, elapsed)


async def _grpc(target: str, model: str, sentences: list[str], clients: int, seconds: float) -> dict:
    import grpc

    from service.api.grpc_gen import grpc_predict_v2_pb2 as pb
    from service.api.grpc_gen import grpc_predict_v2_pb2_grpc as pb_grpc

    latencies: list[float] = []
    codes: dict[str, int] = {}
    stop = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def client(index: int) -> None:
            i = index
            while time.perf_counter() < stop:
                text = sentences[i % len(sentences)].encode()
                i += clients
                request = pb.ModelInferRequest(model_name=model, inputs=[pb.ModelInferRequest.InferInputTensor(
                    name="text", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[text]))])
                start = time.perf_counter()
                try:
                    await stub.ModelInfer(request)
                    key = "OK"
                except grpc.aio.AioRpcError as exc:
                    key = exc.code().name
                if key == "OK":
                    latencies.append(time.perf_counter() - start)
                codes[key] = codes.get(key, 0) + 1

        begin = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - begin
    return _summary(latencies, codes, elapsed)


_WRK_SCRIPT = """
local bodies = {%(bodies)s}
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("POST", "%(path)s", {["Content-Type"] = "application/json"}, bodies[(counter %% #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {"requests": %%d, "seconds": %%f, "p50_us": %%f, "p99_us": %%f, "errors": %%d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout + e.status))
end
"""


def _wrk(url: str, model: str, path: str, sentences: list[str], clients: int, seconds: float) -> dict:
    """Debian's wrk (C, one thread): a load generator that costs the shared cores far less than any
    Python client. Status codes other than 2xx are counted by wrk as errors."""
    import subprocess
    import tempfile

    if path == "v1":
        endpoint = "/v1/embeddings"
        make = lambda text: {"model": model, "input": text}  # noqa: E731
    else:
        endpoint = f"/v2/models/{model}/infer"
        make = lambda text: {  # noqa: E731
            "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
    bodies = ", ".join("[==[" + json.dumps(make(text)) + "]==]" for text in sentences)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % {"bodies": bodies, "path": endpoint})
    command = ["wrk", "-t1", f"-c{clients}", f"-d{seconds:g}s", "--timeout", "60s", "-s", script.name, url]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(li for li in done.stdout.splitlines() if li.startswith("WRK "))
    stats = json.loads(line[4:])
    ok = stats["requests"] - stats["errors"]
    codes = {"200": ok, **({"errors": stats["errors"]} if stats["errors"] else {})}
    return {"rps": ok / stats["seconds"], "p50_ms": stats["p50_us"] / 1000, "p99_ms": stats["p99_us"] / 1000,
            "codes": codes}


def _summary(latencies: list[float], codes: dict[str, int], elapsed: float) -> dict:
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"rps": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "codes": codes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="http://host:port, or host:port for gRPC")
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--sentences", type=Path, required=True)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--path", choices=("v2", "v1"), default="v2")
    parser.add_argument("--client", choices=("wrk", "aiohttp"), default="aiohttp", help="HTTP load generator")
    args = parser.parse_args()
    sentences = json.loads(args.sentences.read_text())
    if args.protocol == "grpc":
        result = asyncio.run(_grpc(args.url, args.model, sentences, args.clients, args.seconds))
    elif args.client == "wrk":
        result = _wrk(args.url, args.model, args.path, sentences, args.clients, args.seconds)
    else:
        result = asyncio.run(_http(args.url, args.model, args.path, sentences, args.clients, args.seconds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
