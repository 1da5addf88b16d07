"""The batcher's policy, with a real asyncio loop and a runner that records what it was given."""

import asyncio

import pytest

from service.batching import Batcher, BatchPolicy, DeadlineExceeded, QueueFull


class Recorder:
    """A batch runner that takes ``delay`` seconds and echoes its items (or fails on 'boom')."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.batches: list[list[int]] = []
        self.started = asyncio.Event()
        self.release: asyncio.Event | None = None

    async def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        self.started.set()
        if self.release is not None:
            await self.release.wait()
        await asyncio.sleep(self.delay)
        if "boom" in items:
            raise RuntimeError("model failed")
        return [f"out-{i}" for i in items]


async def busy_batcher(policy: BatchPolicy) -> tuple[Recorder, Batcher, asyncio.Task]:
    """A batcher whose runtime is held busy by one request until ``runner.release`` is set."""
    runner = Recorder()
    runner.release = asyncio.Event()
    batcher = Batcher(runner, policy)
    first = asyncio.create_task(batcher.submit("first", length=1))
    await runner.started.wait()
    return runner, batcher, first


async def test_a_lone_request_runs_at_once():
    runner = Recorder()
    batcher = Batcher(runner, BatchPolicy())
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await batcher.submit(7, length=5) == "out-7"
    assert loop.time() - start < 0.05  # no waiting for company while the runtime is idle
    assert runner.batches == [[7]]
    await batcher.close()


async def test_requests_queued_behind_a_running_batch_are_grouped_by_length():
    runner = Recorder()
    runner.release = asyncio.Event()
    batcher = Batcher(runner, BatchPolicy(max_batch_size=3, max_batch_tokens=10_000))
    first = asyncio.create_task(batcher.submit("first", length=10))
    await runner.started.wait()  # the runtime is now busy with "first"
    lengths = {"a": 10, "b": 100, "c": 12, "d": 98, "e": 11, "f": 99}
    tasks = {k: asyncio.create_task(batcher.submit(k, length=n)) for k, n in lengths.items()}
    await asyncio.sleep(0.01)
    runner.release.set()
    results = await asyncio.gather(first, *tasks.values())
    assert results[0] == "out-first"
    # oldest ("a", 10 tokens) anchors the next batch with its nearest lengths; the long ones go together
    assert runner.batches[1] == ["a", "e", "c"]
    assert sorted(runner.batches[2]) == ["b", "d", "f"]
    await batcher.close()


async def test_token_budget_counts_padding():
    runner, batcher, blocker = await busy_batcher(BatchPolicy(max_batch_size=32, max_batch_tokens=100))
    tasks = [asyncio.create_task(batcher.submit(i, length=30)) for i in range(5)]
    await asyncio.sleep(0.01)
    runner.release.set()
    await asyncio.gather(blocker, *tasks)
    assert [len(b) for b in runner.batches[1:]] == [3, 2]  # 3 x 30 = 90 <= 100 < 4 x 30
    await batcher.close()


async def test_full_queue_refuses_at_once():
    runner, batcher, running = await busy_batcher(BatchPolicy(max_queue_size=2))
    waiting = [asyncio.create_task(batcher.submit(i, length=1)) for i in range(2)]
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(QueueFull):
        await batcher.submit("overflow", length=1)
    assert loop.time() - start < 0.01
    runner.release.set()
    assert await asyncio.gather(running, *waiting) == ["out-first", "out-0", "out-1"]  # nothing accepted is lost
    await batcher.close()


async def test_deadline_and_gone_clients_are_dropped_before_batching():
    runner, batcher, running = await busy_batcher(BatchPolicy())
    late = asyncio.create_task(batcher.submit("late", length=1, timeout_s=0.01))
    gone = asyncio.create_task(batcher.submit("gone", length=1))
    kept = asyncio.create_task(batcher.submit("kept", length=1))
    await asyncio.sleep(0.03)
    gone.cancel()
    with pytest.raises(DeadlineExceeded):
        await late
    runner.release.set()
    assert await running == "out-first" and await kept == "out-kept"
    assert runner.batches[1] == ["kept"]  # neither the expired nor the abandoned request ran
    await batcher.close()


async def test_a_failed_batch_fails_each_of_its_requests_and_serving_goes_on():
    runner, batcher, blocker = await busy_batcher(BatchPolicy())
    doomed = [asyncio.create_task(batcher.submit(v, length=1)) for v in ("boom", "ok")]
    await asyncio.sleep(0)
    runner.release.set()
    await blocker
    for task in doomed:
        with pytest.raises(RuntimeError, match="model failed"):
            await task
    assert await batcher.submit("after", length=1) == "out-after"
    await batcher.close()


async def test_close_drains_what_was_accepted_and_refuses_new_work():
    runner = Recorder(delay=0.01)
    batcher = Batcher(runner, BatchPolicy(max_batch_size=2))
    tasks = [asyncio.create_task(batcher.submit(i, length=1)) for i in range(5)]
    await asyncio.sleep(0)
    await batcher.close(drain=True)
    assert [t.result() for t in tasks] == [f"out-{i}" for i in range(5)]
    with pytest.raises(QueueFull):
        await batcher.submit("late", length=1)


async def test_too_long_input_is_a_client_error():
    batcher = Batcher(Recorder(), BatchPolicy(max_batch_tokens=16))
    with pytest.raises(ValueError, match="max_batch_tokens"):
        await batcher.submit("x", length=17)
    await batcher.close()


async def test_a_request_is_admitted_whole_or_not_at_all():
    runner, batcher, running = await busy_batcher(BatchPolicy(max_queue_size=4))
    with pytest.raises(QueueFull):
        await batcher.submit_many([(i, 1) for i in range(5)])
    assert batcher.depth == 0  # nothing of the refused request was left queued
    admitted = asyncio.create_task(batcher.submit_many([(i, 1) for i in range(4)]))
    await asyncio.sleep(0)
    runner.release.set()
    assert await admitted == [f"out-{i}" for i in range(4)] and await running == "out-first"
    await batcher.close()


async def test_padding_is_kept_within_the_ratio():
    runner, batcher, first = await busy_batcher(BatchPolicy(max_batch_size=32, max_padding_ratio=1.25))
    lengths = [10, 11, 12, 40, 9, 41, 10]
    tasks = [asyncio.create_task(batcher.submit(f"len{n}-{i}", length=n)) for i, n in enumerate(lengths)]
    await asyncio.sleep(0.01)
    runner.release.set()
    await asyncio.gather(first, *tasks)
    for batch in runner.batches[1:]:
        sizes = [int(item.split("-")[0][3:]) for item in batch]
        assert max(sizes) * len(sizes) <= 1.25 * sum(sizes)  # padding kept small
    short = next(b for b in runner.batches[1:] if "len10-0" in b)
    assert not any(item.startswith("len4") for item in short)  # 40-token inputs never padded into it
    await batcher.close()


class Gauge:
    """A runner that records how many batches run at the same time."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.release = asyncio.Event()

    async def __call__(self, items: list) -> list:
        self.running += 1
        self.most = max(self.most, self.running)
        await self.release.wait()
        self.running -= 1
        return [f"out-{i}" for i in items]


async def submitted(concurrency: int, count: int) -> tuple[Gauge, Batcher, list[asyncio.Task]]:
    """``count`` single-input batches submitted to a batcher of ``concurrency`` instances, let run."""
    runner = Gauge()
    batcher = Batcher(runner, BatchPolicy(max_batch_size=1), concurrency=concurrency)
    tasks = [asyncio.create_task(batcher.submit(i, length=1)) for i in range(count)]
    for _ in range(10):
        await asyncio.sleep(0)
    return runner, batcher, tasks


async def test_instances_run_batches_side_by_side_and_never_more_than_configured():
    runner, batcher, tasks = await submitted(concurrency=2, count=5)
    assert runner.running == 2  # a second instance took the next batch while the first was busy
    assert batcher.depth == 3
    runner.release.set()
    assert await asyncio.gather(*tasks) == [f"out-{i}" for i in range(5)]
    assert runner.most == 2
    await batcher.close()


async def test_close_waits_for_every_running_instance():
    runner, batcher, tasks = await submitted(concurrency=3, count=3)
    closing = asyncio.create_task(batcher.close(drain=True))
    await asyncio.sleep(0.02)
    assert not closing.done()  # three batches still running
    runner.release.set()
    await closing
    assert [t.result() for t in tasks] == ["out-0", "out-1", "out-2"]


def test_concurrency_must_be_positive():
    with pytest.raises(ValueError, match="concurrency"):
        Batcher(Gauge(), BatchPolicy(), concurrency=0)
