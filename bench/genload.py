"""Closed-loop streaming load for the generation benchmark, in its own process (shares nothing with
the server): ``clients`` clients, each sending its share of ``requests`` chat completions with
``stream: true`` one after another, reading server-sent events as they arrive (aiohttp).

    python bench/genload.py --url http://127.0.0.1:8000 --model m --clients 8 --requests 16 \
        --prompts prompts.json --lengths 16 64 128

Prints one JSON line: output tokens/s, time to first token and inter-token latency percentiles (ms),
end-to-end latency, status counts. Request i asks for exactly ``lengths[i % n]`` tokens
(``ignore_eos``, greedy), so systems are compared on equal work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np


async def run(url: str, model: str, prompts: list[str], clients: int, requests: int, lengths: list[int]) -> dict:
    import aiohttp

    ttft: list[float] = []
    itl: list[float] = []
    e2e: list[float] = []
    tokens = 0
    codes: dict[str, int] = {}
    queue = list(range(requests))

    async def one(session: aiohttp.ClientSession, prompt: str, max_tokens: int) -> None:
        nonlocal tokens
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        last = None
        gaps: list[float] = []
        first = None
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            key = str(response.status)
            if response.status != 200:
                await response.read()
                codes[key] = codes.get(key, 0) + 1
                return
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    tokens += chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0].get("delta", {}).get("content"):
                    continue
                if first is None:
                    first = now - start
                elif last is not None:
                    gaps.append(now - last)
                last = now
        codes[key] = codes.get(key, 0) + 1
        if first is not None:
            ttft.append(first)
            itl.extend(gaps)
            e2e.append(time.perf_counter() - start)

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            index = queue.pop(0)
            await one(session, prompts[index % len(prompts)], lengths[index % len(lengths)])

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:
        begin = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - begin

    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")

    return {"tokens_per_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99), "e2e_p50_ms": pct(e2e, 50), "codes": codes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[64],
                        help="max_tokens of request i is lengths[i %% len(lengths)]")
    parser.add_argument("--prompts", type=Path, required=True)
    args = parser.parse_args()
    prompts = json.loads(args.prompts.read_text())
    print(json.dumps(asyncio.run(run(args.url, args.model, prompts, args.clients, args.requests, args.lengths))))


if __name__ == "__main__":
    main()
