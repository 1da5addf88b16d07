"""Closed-loop streaming load for the generation benchmark, in its own process (shares nothing with
the server): ``clients`` clients, each sending chat completions with ``stream: true`` one after
another, reading server-sent events as they arrive (aiohttp).

    python bench/genload.py --url http://127.0.0.1:8000 --model m --clients 8 --seconds 30 \
        --prompts prompts.json --lengths 16 64 128

Throughput is measured in a steady-state window (after ``warmup``, for ``seconds``) from the
server's own count of generated tokens, so neither the start (every client arriving at once) nor
the tail (the last long request running alone) skews it. Prints one JSON line: output tokens/s, time
to first token and inter-token latency percentiles (ms) of the requests in the window, status
counts. Request i asks for exactly ``lengths[i % n]`` tokens (``ignore_eos``, greedy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np


async def generated_tokens(session, url: str, model: str) -> float:
    """The server's own count of tokens generated for ``model`` (sampserve_generation_tokens_total)."""
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("sampserve_generation_tokens_total{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def run(url: str, model: str, prompts: list[str], clients: int, seconds: float, warmup: float,
              lengths: list[int]) -> dict:
    import aiohttp

    ttft: list[float] = []
    itl: list[float] = []
    e2e: list[float] = []
    codes: dict[str, int] = {}
    counter = iter(range(10**9))

    async def one(session: aiohttp.ClientSession, prompt: str, max_tokens: int) -> None:
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
        while True:
            index = next(counter)
            await one(session, prompts[index % len(prompts)], lengths[index % len(lengths)])

    connector = aiohttp.TCPConnector(limit=clients + 1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900)) as session:
        tasks = [asyncio.ensure_future(client(session)) for _ in range(clients)]
        await asyncio.sleep(warmup)  # the first requests all arrive at once: not the steady state
        start_tokens, begin = await generated_tokens(session, url, model), time.perf_counter()
        ttft.clear(), itl.clear(), e2e.clear()
        await asyncio.sleep(seconds)
        end_tokens, elapsed = await generated_tokens(session, url, model), time.perf_counter() - begin
        for task in tasks:  # the streams in flight are abandoned: the server frees their slots
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tokens = int(end_tokens - start_tokens)

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
    parser.add_argument("--seconds", type=float, default=30, help="the measured window")
    parser.add_argument("--warmup", type=float, default=5, help="load before the window opens")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64],
                        help="max_tokens of request i is lengths[i %% len(lengths)]")
    parser.add_argument("--prompts", type=Path, required=True)
    args = parser.parse_args()
    prompts = json.loads(args.prompts.read_text())
    print(json.dumps(asyncio.run(run(args.url, args.model, prompts, args.clients, args.seconds, args.warmup,
                                     args.lengths))))


if __name__ == "__main__":
    main()
