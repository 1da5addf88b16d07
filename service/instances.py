"""Runtime instances of one model version, each on a thread of its own, with a bound on each call.

Why not ``asyncio.to_thread``: its executor is shared by everything in the process (6 threads on
2 cores), so one model whose runtime hangs would soon hold every thread and stop every other model.
Here each instance owns one daemon thread. A call that runs past ``timeout_s`` fails its batch
(``RuntimeHung``), its instance is abandoned and a new one is built in its place; the abandoned
thread is counted as hung until it returns. Daemon threads never keep the process from exiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from service.runtimes import Runtime

log = logging.getLogger("sampserve")
Feed = dict[str, np.ndarray]


class RuntimeHung(Exception):
    """A runtime call ran past its bound; its instance is being replaced."""


class _Worker:
    """One runtime and the one thread that calls it."""

    def __init__(self, runtime: Runtime, name: str) -> None:
        self.runtime = runtime
        self._jobs: queue.SimpleQueue[tuple[Feed, concurrent.futures.Future[np.ndarray]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            feed, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self.runtime.run(feed))
            except BaseException as exc:  # handed to the caller, never lost with the thread
                future.set_exception(exc)

    def submit(self, feed: Feed) -> concurrent.futures.Future[np.ndarray]:
        future: concurrent.futures.Future[np.ndarray] = concurrent.futures.Future()
        self._jobs.put((feed, future))
        return future

    def stop(self) -> None:
        self._jobs.put(None)  # after the job in hand, if it ever returns


class InstancePool:
    """``count`` runtime instances; ``run`` takes a free one, bounded by ``timeout_s``."""

    def __init__(self, build: Callable[[], Runtime], count: int, timeout_s: float, label: str,
                 on_hung: Callable[[int], None] | None = None) -> None:
        self._build, self.count, self.timeout_s, self.label = build, count, timeout_s, label
        self._on_hung = on_hung or (lambda n: None)
        self._idle: asyncio.Queue[_Worker] | None = None
        self._workers: list[_Worker] = []
        self._made = 0
        self.hung = 0
        """Calls abandoned past the bound whose thread has not returned yet."""
        self.replacing = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, warm_up: Feed) -> None:
        """Build every instance and run one real forward pass on each (blocking: call off the loop)."""
        for _ in range(self.count):
            self._workers.append(self._new_worker(warm_up))

    def _new_worker(self, warm_up: Feed) -> _Worker:
        runtime = self._build()
        runtime.run(warm_up)
        self._made += 1
        return _Worker(runtime, f"{self.label}#{self._made}")

    def _queue(self) -> asyncio.Queue[_Worker]:
        if self._idle is None:  # made on the serving loop, not in the thread that loaded the version
            self._idle = asyncio.Queue()
            for worker in self._workers:
                self._idle.put_nowait(worker)
        return self._idle

    @property
    def instances(self) -> int:
        return len(self._workers)

    @property
    def runtimes(self) -> list[Runtime]:
        return [worker.runtime for worker in self._workers]

    async def run(self, feed: Feed, warm_up: Feed) -> np.ndarray:
        idle = self._queue()
        if idle.empty():  # every instance busy, stuck or being replaced: wait, within the bound
            try:
                worker = await asyncio.wait_for(idle.get(), self.timeout_s)
            except TimeoutError:
                raise RuntimeHung(f"no runtime instance became free within {self.timeout_s:g}s "
                                  f"(SAMPSERVE_RUNTIME_TIMEOUT_S); {self.hung} call(s) stuck") from None
        else:
            worker = idle.get_nowait()
        future = worker.submit(feed)
        loop = asyncio.get_running_loop()
        waiter = asyncio.wrap_future(future)
        expired = False

        def expire() -> None:  # one timer, not wait_for's task and shield per call
            nonlocal expired
            expired = True
            waiter.cancel()  # the thread's call cannot be cancelled: it runs on, abandoned

        expiry = loop.call_later(self.timeout_s, expire)
        try:
            result = await waiter
        except asyncio.CancelledError:
            if expired:
                self._abandon(worker, future, warm_up)
                raise RuntimeHung(f"runtime call exceeded {self.timeout_s:g}s (SAMPSERVE_RUNTIME_TIMEOUT_S); "
                                  "its instance is being replaced") from None
            # the batch was cancelled: the call finishes in its thread, then the worker is free again
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(idle.put_nowait, worker))
            raise
        except BaseException:
            idle.put_nowait(worker)
            raise
        finally:
            expiry.cancel()
        idle.put_nowait(worker)
        return result

    def _abandon(self, worker: _Worker, future: concurrent.futures.Future[np.ndarray], warm_up: Feed) -> None:
        loop = asyncio.get_running_loop()
        self.hung += 1
        self._on_hung(self.hung)
        self._workers.remove(worker)
        worker.stop()
        log.error("%s: a runtime call exceeded %gs; instance abandoned (%d hung), building a replacement",
                  self.label, self.timeout_s, self.hung)

        def returned(_: object) -> None:
            def account() -> None:
                self.hung -= 1
                self._on_hung(self.hung)
                log.warning("%s: a hung runtime call returned (%d still hung)", self.label, self.hung)

            loop.call_soon_threadsafe(account)

        future.add_done_callback(returned)
        self._spawn_replacement(warm_up)

    def _spawn_replacement(self, warm_up: Feed) -> None:
        self.replacing += 1
        task = asyncio.get_running_loop().create_task(self._replace(warm_up))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replace(self, warm_up: Feed) -> None:
        """Build an instance on a thread of its own. A warm-up stuck past the bound counts as a hung
        call (the runtime is wedged, not just one instance) until it returns; then it serves."""
        building = asyncio.wrap_future(call_in_thread(self._new_worker, warm_up))
        stuck = False
        try:
            try:
                worker = await asyncio.wait_for(asyncio.shield(building), self.timeout_s)
            except TimeoutError:
                stuck = True
                self.hung += 1
                self._on_hung(self.hung)
                log.error("%s: the replacement's warm-up exceeded %gs (%d hung)", self.label, self.timeout_s,
                          self.hung)
                worker = await building
        except Exception:
            log.exception("%s: building a replacement instance failed; trying again in %gs", self.label,
                          self.timeout_s)
            await asyncio.sleep(self.timeout_s)
            self._spawn_replacement(warm_up)
            return
        finally:
            self.replacing -= 1
            if stuck:
                self.hung -= 1
                self._on_hung(self.hung)
        self._workers.append(worker)
        self._queue().put_nowait(worker)
        log.info("%s: replacement instance ready", self.label)

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()


def call_in_thread(fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
    """Run ``fn`` on a fresh daemon thread (loading, which may be slow or stuck, never blocks exit)."""
    done: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def target() -> None:
        try:
            done.set_result(fn(*args))
        except BaseException as exc:
            done.set_exception(exc)

    threading.Thread(target=target, daemon=True).start()
    return done
