"""The engine on a real exported decoder: continuous batching returns exactly the greedy tokens of
each request decoded alone, short requests overtake long ones, cancelled streams free their slot,
a full queue is refused at once, preemption recomputes to the same tokens, and the gauges drain."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

import pytest
from prometheus_client import CollectorRegistry
from tokenizers import Tokenizer

from service.errors import DeadlinePassed, InvalidInput, ModelFailure, NotReady, Overloaded
from service.generation import Delta, SamplingParams
from service.generation.engine import GenerationEngine
from service.generation.graph import DecoderGraph
from service.metrics import Metrics
from tests.service.generation.conftest import Engines
from tests.tiny_llama import CORPUS, PAD_ID

GREEDY = {"temperature": 0.0, "ignore_eos": True}


def params(max_tokens: int, **extra: object) -> SamplingParams:
    return SamplingParams.model_validate({**GREEDY, "max_tokens": max_tokens, **extra})


def reference(graph: DecoderGraph, prompt: list[int], steps: int) -> list[int]:
    """Greedy decoding of one request alone, straight through the graph: no scheduler."""
    logits, cache = graph.prefill([prompt], PAD_ID)
    out: list[int] = []
    while True:
        out.append(int(logits[0].argmax()))
        if len(out) == steps:
            return out
        logits, cache = graph.decode([out[-1]], cache)


def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode(text).ids for text in CORPUS]


async def collect(stream: AsyncGenerator[Delta, None], log: list[Delta] | None = None) -> list[Delta]:
    deltas = log if log is not None else []
    async for delta in stream:
        deltas.append(delta)
    return deltas


def tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


def assert_idle(engine: GenerationEngine) -> None:
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_tokens) == (0, 0, 0)


async def test_staggered_overlapping_requests_get_exactly_their_greedy_tokens_alone(
        engines: Engines, graph: DecoderGraph, tokenizer: Tokenizer) -> None:
    engine = engines(max_num_seqs=8)
    asks = [(p, n) for p, n in zip(prompts(tokenizer), (30, 7, 45, 12, 25, 3, 40, 18, 33, 9, 21), strict=True)]
    logs: list[list[Delta]] = [[] for _ in asks]
    most_running = 0
    tasks = []
    for i, (prompt, max_tokens) in enumerate(asks):
        tasks.append(asyncio.create_task(collect(engine.generate(prompt, params(max_tokens)), logs[i])))
        if i % 3 != 2:  # most arrive while the previous one is mid-stream, some together
            await until(lambda i=i: len(logs[i]) >= 2 or (logs[i] and logs[i][-1].finish_reason))
        most_running = max(most_running, engine.stats().running)
    results = await asyncio.gather(*tasks)
    assert most_running >= 2  # they really shared the batch
    for (prompt, max_tokens), deltas in zip(asks, results, strict=True):
        assert tokens(deltas) == reference(graph, prompt, max_tokens)
        last = deltas[-1]
        assert last.finish_reason == "length" and (last.prompt_tokens, last.completion_tokens) == (
            len(prompt), max_tokens)
        assert "".join(d.text for d in deltas) == tokenizer.decode(tokens(deltas))
    assert_idle(engine)


async def test_a_short_request_arriving_behind_a_long_one_finishes_first(
        engines: Engines, tokenizer: Tokenizer) -> None:
    engine = engines()
    finished: list[str] = []
    long_log: list[Delta] = []

    async def run(name: str, stream: AsyncGenerator[Delta, None], log: list[Delta]) -> None:
        await collect(stream, log)
        finished.append(name)

    first, second = prompts(tokenizer)[:2]
    long = asyncio.create_task(run("long", engine.generate(first, params(90)), long_log))
    await until(lambda: len(long_log) >= 2)
    await run("short", engine.generate(second, params(3)), [])
    assert finished == ["short"] and len(long_log) < 90
    await long


async def test_request_level_batching_makes_the_short_request_wait(engines: Engines, tokenizer: Tokenizer) -> None:
    engine = engines(continuous=False)
    long_log: list[Delta] = []
    first, second = prompts(tokenizer)[:2]
    long = asyncio.create_task(collect(engine.generate(first, params(60)), long_log))
    await until(lambda: len(long_log) >= 2)
    await collect(engine.generate(second, params(3)))
    assert long.done() and len(long_log) == 60


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_a_closed_stream_frees_its_slot_at_the_next_step(engines: Engines, tokenizer: Tokenizer,
                                                              how: str) -> None:
    engine = engines(max_num_seqs=1)
    first, second = prompts(tokenizer)[:2]
    stream = engine.generate(first, params(90))
    if how == "aclose":
        await anext(stream)
        await stream.aclose()
    else:
        log: list[Delta] = []
        task = asyncio.create_task(collect(stream, log))
        await until(lambda: len(log) >= 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    start = time.perf_counter()
    deltas = await collect(engine.generate(second, params(2)))
    assert tokens(deltas) and deltas[-1].finish_reason == "length"
    assert engine.scheduler.preemptions == 0 and time.perf_counter() - start < 5
    await until(lambda: engine.stats().running == 0)
    assert_idle(engine)


async def test_a_full_waiting_queue_is_refused_at_once(engines: Engines, tokenizer: Tokenizer) -> None:
    engine = engines(max_num_seqs=1, max_waiting=2)
    prompt = prompts(tokenizer)[0]
    streams = [engine.generate(prompt, params(5)) for _ in range(2)]
    with engine.scheduler.lock:  # the step loop stalls on its lock: nothing leaves the queue meanwhile
        waiting = [asyncio.create_task(anext(s)) for s in streams]
        await until(lambda: engine.stats().waiting == 2)
        start = time.perf_counter()
        with pytest.raises(Overloaded, match="max_waiting=2"):
            await anext(engine.generate(prompt, params(5)))
        assert time.perf_counter() - start < 0.1
    await asyncio.gather(*waiting)
    for stream in streams:
        await collect(stream)
    assert_idle(engine)


async def test_preemption_under_a_small_cache_returns_the_same_greedy_tokens(
        engines: Engines, graph: DecoderGraph, tokenizer: Tokenizer) -> None:
    engine = engines(max_num_seqs=4, max_model_len=64, max_kv_tokens=100, max_batch_prefill_tokens=64)
    asks = list(zip(prompts(tokenizer)[:4], (25, 35, 25, 30), strict=True))
    results = await asyncio.gather(*(collect(engine.generate(p, params(n))) for p, n in asks))
    assert engine.stats().preemptions > 0
    for (prompt, max_tokens), deltas in zip(asks, results, strict=True):
        assert tokens(deltas) == reference(graph, prompt, max_tokens)
        assert deltas[-1].completion_tokens == max_tokens
    assert_idle(engine)


async def test_a_seeded_request_draws_the_same_tokens_whatever_shares_its_batch(
        engines: Engines, tokenizer: Tokenizer) -> None:
    engine = engines()
    prompt, *others = prompts(tokenizer)[:4]
    seeded = params(20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    alone = tokens(await collect(engine.generate(prompt, seeded)))
    crowd = [asyncio.create_task(collect(engine.generate(p, params(25, temperature=1.0)))) for p in others]
    together = tokens(await collect(engine.generate(prompt, seeded)))
    await asyncio.gather(*crowd)
    assert together == alone


async def test_stop_ids_and_stop_strings_finish_with_stop(engines: Engines, graph: DecoderGraph,
                                                         tokenizer: Tokenizer) -> None:
    prompt = prompts(tokenizer)[0]
    expected = reference(graph, prompt, 12)
    stop_engine = engines(stop_ids=(expected[3],))
    deltas = await collect(stop_engine.generate(prompt, params(12, ignore_eos=False)))
    assert tokens(deltas) == expected[:4] and deltas[-1].finish_reason == "stop"
    assert "".join(d.text for d in deltas) == tokenizer.decode(expected[:3])  # the stop token's text is not sent

    engine = engines()
    text = "".join(d.text for d in await collect(engine.generate(prompt, params(12))))
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    deltas = await collect(engine.generate(prompt, params(12, stop=[stop])))
    assert deltas[-1].finish_reason == "stop" and "".join(d.text for d in deltas) == text[:text.find(stop)]


async def test_admission_checks_raise_before_the_first_delta(engines: Engines, tokenizer: Tokenizer) -> None:
    engine = engines(max_model_len=64, max_kv_tokens=128, max_batch_prefill_tokens=64)
    prompt = prompts(tokenizer)[0]
    with pytest.raises(InvalidInput, match=rf"prompt is {len(prompt)} tokens and max_tokens is 60.*64"):
        await anext(engine.generate(prompt, params(60)))
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        await anext(engine.generate([10**6], params(1)))
    with pytest.raises(InvalidInput, match="empty"):
        await anext(engine.generate([], params(1)))
    assert_idle(engine)


async def test_deadlines_before_and_after_the_first_token(engines: Engines, tokenizer: Tokenizer) -> None:
    engine = engines()
    prompt = prompts(tokenizer)[0]
    with engine.scheduler.lock, pytest.raises(DeadlinePassed):  # the step loop stalls: no first token in time
        await anext(engine.generate(prompt, params(5), timeout_s=0.05))
    log: list[Delta] = []
    stream = engine.generate(prompt, params(90), timeout_s=0.5)
    log.append(await anext(stream))
    with engine.scheduler.lock:  # stalled past the deadline after the first token
        await asyncio.sleep(0.6)
    await collect(stream, log)
    assert log[-1].finish_reason == "length" and len(log) < 90
    await until(lambda: engine.stats().running == 0)
    assert_idle(engine)


async def test_gauges_and_counters_follow_the_engine_and_return_to_zero(engines: Engines,
                                                                       tokenizer: Tokenizer) -> None:
    metrics = Metrics(CollectorRegistry())
    engine = engines(metrics.generation("tiny", 1), max_num_seqs=4, max_model_len=64, max_kv_tokens=100,
                     max_batch_prefill_tokens=64)
    asks = list(zip(prompts(tokenizer)[:4], (25, 35, 25, 30), strict=True))
    await asyncio.gather(*(collect(engine.generate(p, params(n))) for p, n in asks))

    def value(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": "tiny", "version": "1"})

    assert value("sampserve_generation_tokens_total") == 115
    assert value("sampserve_prompt_tokens_total") == sum(len(p) for p, _ in asks)  # once, despite recompute
    assert value("sampserve_preemptions_total") == engine.stats().preemptions > 0
    assert value("sampserve_time_to_first_token_seconds_count") == 4
    assert value("sampserve_inter_token_latency_seconds_count") == 115 - 4
    for gauge in ("sampserve_sequences_running", "sampserve_sequences_waiting", "sampserve_kv_cache_tokens"):
        assert value(gauge) == 0
    assert value("sampserve_kv_cache_capacity_tokens") == 100
    metrics.version_unloaded("tiny", 1)
    assert value("sampserve_generation_tokens_total") is None and value("sampserve_kv_cache_tokens") is None


async def test_close_without_drain_fails_what_is_left(engines: Engines, tokenizer: Tokenizer) -> None:
    engine = engines(max_num_seqs=1)
    prompt = prompts(tokenizer)[0]
    running = engine.generate(prompt, params(90))
    waiting = engine.generate(prompt, params(5))
    await anext(running)
    queued = asyncio.create_task(anext(waiting))
    await until(lambda: engine.stats().waiting == 1)
    await engine.close(drain=False)
    with pytest.raises(NotReady, match="shutting down"):
        await collect(running)
    with pytest.raises(NotReady, match="shutting down"):
        await queued
    with pytest.raises(NotReady, match="shutting down"):
        await anext(engine.generate(prompt, params(1)))
    assert not engine.alive


async def test_a_runtime_failure_fails_the_sequences_it_hit_and_the_engine_serves_on(
        engines: Engines, fixed_batch_graph: DecoderGraph, tokenizer: Tokenizer) -> None:
    """onnxruntime raising in a step (here: a graph exported with a fixed batch of 1, when a second
    sequence joins) fails the sequences of that step with ModelFailure, after the tokens they already
    streamed; the engine drops their cache and serves the next request."""
    engine = engines(graph=fixed_batch_graph, max_model_len=1024, max_kv_tokens=4096, max_batch_prefill_tokens=1024)
    first, second = prompts(tokenizer)[:2]
    running = engine.generate(first, params(900))
    log = [await anext(running)]  # alone: a batch of one runs
    joining = engine.generate(second, params(5))
    log.append(await anext(joining))  # its prefill runs alone too; the next step decodes both
    with pytest.raises(ModelFailure, match=r"the model failed: .*INVALID_ARGUMENT"):
        await collect(running, log)
    with pytest.raises(ModelFailure, match="INVALID_ARGUMENT"):
        await collect(joining, log)
    assert log and all(d.finish_reason is None for d in log) and len(log) < 900
    assert engine.alive and engine.stats().running == 0 and engine.stats().kv_tokens == 0
    deltas = await collect(engine.generate(second, params(5)))
    assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 5
    assert_idle(engine)
