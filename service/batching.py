"""Dynamic batching in front of one model version: length-aware, never idle-waiting, bounded.

Why this shape (measured on a 2-core CPU, docs/design.md): padding a random batch of 32 sentences to
its longest runs 2.2x the real tokens and makes naive batching slower than batch 1, while batches
of similar lengths are the fastest; and a batcher that waits for a fuller batch while the runtime
is idle adds its whole delay at low load. So:

- Each runtime instance runs one batch at a time, and ``concurrency`` instances run side by side
  (Triton's instance_group). The moment one is free and anything is queued, a batch is formed and
  sent: at low load a request goes alone, at once.
- While the runtime is busy, requests queue. The next batch starts from the oldest request (no
  request starves) and adds the queued requests closest to it in length, until ``max_batch_size``
  or ``max_batch_tokens`` (rows x longest, i.e. padding counted) would be exceeded, taking only
  inputs that keep the computed tokens within ``max_padding_ratio`` of the real ones.
- There is no timer: with one runner, the time a batch waits for company is exactly the time the
  previous batch runs, which is what an adaptive ``max_queue_delay`` approximates; when a runtime
  is idle a request waits 0 ms (so the repository has no queue-delay setting).
- A full queue refuses at once (``QueueFull`` -> 429 / RESOURCE_EXHAUSTED). Requests whose caller
  has gone or whose deadline passed are dropped before a batch is formed. When a batch fails,
  every request in it gets the error and the batcher keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFull(Exception):
    """The model's queue is at capacity: the request is refused without waiting."""


class BatcherClosed(QueueFull):
    """This version is being retired: the caller may retry on the version that replaced it."""


class DeadlineExceeded(Exception):
    """The request's deadline passed before its batch ran."""


class BatchObserver(Protocol):
    """Hooks for metrics; every method must be cheap and must not raise."""

    def queued(self, depth: int) -> None: ...

    def batch(self, size: int, tokens: int, padded_tokens: int, queue_seconds: Sequence[float]) -> None: ...

    def dropped(self, reason: str) -> None: ...


class _NullObserver:
    def queued(self, depth: int) -> None:
        return None

    def batch(self, size: int, tokens: int, padded_tokens: int, queue_seconds: Sequence[float]) -> None:
        return None

    def dropped(self, reason: str) -> None:
        return None


@dataclass
class BatchPolicy:
    max_batch_size: int = 32
    max_batch_tokens: int = 8192
    max_queue_size: int = 256
    # Computed tokens (rows x longest) may exceed the real tokens by at most this factor. Measured
    # here at 64 clients: taking the 31 nearest lengths blindly computed 2.6x the real tokens; with
    # two instances, batches of 6-10 at 1.1x served more than batches of 14 at 1.22x (1.25), since
    # small length-sorted batches run as fast per sentence as large ones on this CPU.
    max_padding_ratio: float = 1.1


@dataclass(eq=False)
class _Pending(Generic[Item, Result]):
    item: Item
    length: int
    future: asyncio.Future[Result]
    enqueued: float
    deadline: float | None
    order: int = field(default=0)
    started: float = 0.0  # when its batch started running (monotonic)
    finished: float = 0.0  # when its batch returned


class Batcher(Generic[Item, Result]):
    """One queue for one model version, and up to ``concurrency`` batches running at once.

    ``run_batch`` receives the items of a batch (sorted by length) and returns one result per item,
    in the same order. It is awaited, so a runtime call should go to a thread (``asyncio.to_thread``)
    to keep the event loop free; it is never called more than ``concurrency`` times at once.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Awaitable[list[Result]]],
        policy: BatchPolicy | None = None,
        observer: BatchObserver | None = None,
        concurrency: int = 1,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.policy = policy or BatchPolicy()
        self.concurrency = concurrency
        self._run_batch = run_batch
        self._observer: BatchObserver = observer or _NullObserver()
        self._queue: list[_Pending[Item, Result]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._counter = 0
        self._closed = False

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def submit(self, item: Item, length: int, timeout_s: float | None = None) -> Result:
        """Queue one item of ``length`` tokens; resolve to its result. Raises QueueFull at once when
        the queue is at capacity, DeadlineExceeded when ``timeout_s`` passes first."""
        return (await self.submit_many([(item, length)], timeout_s))[0]

    async def submit_many(self, items: list[tuple[Item, int]], timeout_s: float | None = None,
                          timings: list[tuple[float, float, float]] | None = None) -> list[Result]:
        """Queue all items of one request at once, or none of them: a request is admitted whole
        (so a refused request leaves no orphan work behind), then each item is batched on its own.
        ``timings`` receives (queued, batch started, batch finished) per item, for tracing."""
        if self._closed:
            raise BatcherClosed("this model version is shutting down")
        if len(self._queue) + len(items) > self.policy.max_queue_size:
            self._observer.dropped("queue_full")
            raise QueueFull(f"queue is full ({len(self._queue)} of {self.policy.max_queue_size} inputs waiting); "
                            "retry later")
        for _, length in items:
            if length > self.policy.max_batch_tokens:
                raise ValueError(f"input of {length} tokens exceeds max_batch_tokens={self.policy.max_batch_tokens}")
        self.start()
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        deadline = now + timeout_s if timeout_s is not None else None
        pending = []
        for item, length in items:
            pending.append(_Pending(item, length, loop.create_future(), now, deadline, self._counter))
            self._counter += 1
        self._queue.extend(pending)
        self._observer.queued(len(self._queue))
        self._wakeup.set()
        futures = [p.future for p in pending]
        # the deadline is one timer that cancels the request's futures: asyncio.wait_for with shield
        # (a task and two futures more per request) cost 0.8 ms per single request here
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            for future in futures:
                future.cancel()  # the batch former drops them, as for a caller that has gone

        expiry = loop.call_later(timeout_s, expire) if timeout_s is not None else None
        try:
            results = [await futures[0]] if len(futures) == 1 else list(await asyncio.gather(*futures))
            if timings is not None:
                timings.extend((p.enqueued, p.started, p.finished) for p in pending)
            return results
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()  # the caller has gone: the batch former will drop its inputs
            if expired:
                raise DeadlineExceeded(f"no result within {timeout_s:.3f}s") from None
            raise
        except Exception:
            for future in futures:
                future.cancel()  # one input failed: the request fails whole, drop the rest
            raise
        finally:
            if expiry is not None:
                expiry.cancel()

    async def close(self, drain: bool = True) -> None:
        """Stop accepting; with ``drain`` finish everything queued, else fail it."""
        self._closed = True
        if not drain:
            for pending in self._queue:
                if not pending.future.done():
                    pending.future.set_exception(BatcherClosed("the model is shutting down"))
            self._queue.clear()
        while drain and (self._queue or self._running):
            await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- the loop ---------------------------------------------------------------------------

    def _drop_stale(self) -> None:
        now = time.monotonic()
        keep = []
        for pending in self._queue:
            if pending.future.done():  # cancelled by a caller that went away
                self._observer.dropped("cancelled")
            elif pending.deadline is not None and now >= pending.deadline:
                pending.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                self._observer.dropped("deadline")
            else:
                keep.append(pending)
        self._queue = keep

    def form_batch(self) -> list[_Pending[Item, Result]]:
        """The oldest request plus the queued ones nearest to it in length, within the limits."""
        self._drop_stale()
        if not self._queue:
            return []
        anchor = min(self._queue, key=lambda p: p.order)
        others = sorted((p for p in self._queue if p is not anchor),
                        key=lambda p: (abs(p.length - anchor.length), p.order))
        chosen = [anchor]
        longest = anchor.length
        real = anchor.length
        for candidate in others:
            if len(chosen) >= self.policy.max_batch_size:
                break
            new_longest = max(longest, candidate.length)
            padded = new_longest * (len(chosen) + 1)
            if padded > self.policy.max_batch_tokens:
                continue
            if padded > self.policy.max_padding_ratio * (real + candidate.length):
                continue
            chosen.append(candidate)
            longest = new_longest
            real += candidate.length
        taken = set(map(id, chosen))
        self._queue = [p for p in self._queue if id(p) not in taken]
        return sorted(chosen, key=lambda p: p.length)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue or len(self._running) >= self.concurrency:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self.form_batch()
            if not batch:
                continue
            task = loop.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wakeup.set()  # an instance is free: form the next batch from what queued meanwhile

    async def _execute(self, batch: list[_Pending[Item, Result]]) -> None:
        now = time.monotonic()
        for pending in batch:
            pending.started = now
        longest = max(p.length for p in batch)
        self._observer.queued(len(self._queue))
        self._observer.batch(len(batch), sum(p.length for p in batch), longest * len(batch),
                             [now - p.enqueued for p in batch])
        try:
            results = await self._run_batch([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # every request of a failed batch gets the error
            for pending in batch:
                pending.finished = time.monotonic()
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        finished = time.monotonic()
        for pending, result in zip(batch, results, strict=True):
            pending.finished = finished
            if not pending.future.done():
                pending.future.set_result(result)


def run_in_thread(fn: Callable[[list[Any]], list[Any]]) -> Callable[[list[Any]], Awaitable[list[Any]]]:
    """Adapt a blocking batch function (an onnxruntime call) to the batcher, off the event loop."""

    async def run(items: list[Any]) -> list[Any]:
        return await asyncio.to_thread(fn, items)

    return run
