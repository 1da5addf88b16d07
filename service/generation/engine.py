"""One generation engine per loaded version: a step loop on a thread of its own, an async API.

The thread runs the scheduler (service.generation.scheduler) while there is work and sleeps on its
condition otherwise. Each request gets an asyncio.Queue on the caller's loop; the thread hands it
each step's delta with ``loop.call_soon_threadsafe``. A caller that stops reading (the generator
closed, or its task cancelled when the client disconnects) marks its sequence cancelled, and the
step loop drops it at its next step, so its slot frees without waiting for its max_tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer

from service.errors import DeadlinePassed, InvalidInput, NotReady
from service.generation.detokenizer import IncrementalDetokenizer
from service.generation.graph import DecoderGraph
from service.generation.params import Delta, SamplingParams
from service.generation.sampler import SamplerState
from service.generation.scheduler import EngineLimits, EngineObserver, Scheduler
from service.generation.sequence import Outlet, Sequence

log = logging.getLogger("sampserve")


def warm_up(graph: DecoderGraph, pad_id: int) -> None:
    """One short prefill and one decode step straight through the graph (blocking), so a version's
    first request does not pay for onnxruntime's first-run allocations, and a graph that cannot
    run fails its load instead."""
    logits, cache = graph.prefill([[pad_id] * 4], pad_id)
    graph.decode([int(logits[0].argmax())], cache)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_tokens: int
    """Cache slots held by the running batch, padding included (batch x padded length)."""
    kv_capacity: int
    preemptions: int
    """Sequences preempted (recomputed later) since the engine started."""


class GenerationEngine:
    def __init__(self, graph: DecoderGraph, tokenizer: Tokenizer, limits: EngineLimits,
                 stop_token_ids: Iterable[int], pad_id: int = 0, observer: EngineObserver | None = None,
                 name: str = "generation") -> None:
        self.graph, self.tokenizer, self.limits, self.name = graph, tokenizer, limits, name
        self.vocab_size = graph.vocab_size or tokenizer.get_vocab_size(with_added_tokens=True)
        self.scheduler = Scheduler(graph, limits, stop_token_ids, pad_id, observer)
        self._ids = itertools.count()
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, name=f"{name}-engine", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The step loop is running, or not started yet (False once it stopped on a bug or closed)."""
        return not self._stopped.done()

    def abort(self, reason: str) -> None:
        """Fail every waiting and running request now (NotReady naming ``reason``) and take no more:
        at shutdown, a stream that cannot finish within the grace ends with an error event instead of
        a cut connection."""
        self.scheduler.close()
        self.scheduler.abort(NotReady(f"{self.name}: {reason}"))

    async def close(self, drain: bool = True) -> None:
        """Stop taking requests; with ``drain`` finish those admitted, else fail them (NotReady)."""
        self.scheduler.close()
        if not drain:
            self.scheduler.abort(NotReady(f"{self.name} is shutting down"))
        if self._thread.ident is None:  # never started: nothing to wait for
            if not self._stopped.done():
                self._stopped.set_result(None)
        elif self._thread.is_alive():
            await asyncio.wrap_future(self._stopped)

    def _serve(self) -> None:
        scheduler = self.scheduler
        try:
            while True:
                with scheduler.lock:
                    while not scheduler.has_work() and not scheduler.closed:
                        scheduler.lock.wait()
                    if not scheduler.has_work():
                        return
                scheduler.step()
        except BaseException as exc:  # a bug, not the runtime (step handles that): fail loudly
            log.exception("%s: the generation loop stopped", self.name)
            scheduler.abort(NotReady(f"{self.name}: the generation loop stopped: {exc}"))
        finally:
            self._stopped.set_result(None)

    def stats(self) -> EngineStats:
        s = self.scheduler
        with s.lock:
            waiting = len(s.waiting)
        return EngineStats(len(s.running), waiting, s.cache.tokens, self.limits.max_kv_tokens, s.preemptions)

    # -- requests ----------------------------------------------------------------------------

    def check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidInput when the request can never run (empty prompt, unknown ids, too long)."""
        if not prompt_ids:
            raise InvalidInput("prompt: empty; give at least one token")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidInput(f"prompt: token id {bad} is outside the vocabulary (0 to {self.vocab_size - 1})")
        total, limit = len(prompt_ids) + params.max_tokens, self.limits.max_model_len
        if total > limit:
            raise InvalidInput(f"the prompt is {len(prompt_ids)} tokens and max_tokens is {params.max_tokens}: "
                               f"{total} in all, more than the model's max_model_len of {limit}; shorten the "
                               f"prompt or lower max_tokens")

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       timeout_s: float | None = None) -> AsyncGenerator[Delta, None]:
        """Stream a completion: one Delta per step, the last with finish_reason and usage.

        Admission (InvalidInput, Overloaded, NotReady when closing) raises before the first delta.
        ``timeout_s`` passing before the first token raises DeadlinePassed; after it the stream
        finishes with "length". Closing the generator early cancels the sequence.
        """
        self.check(prompt_ids, params)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        now = time.monotonic()
        deadline = None if timeout_s is None else now + timeout_s
        seq = Sequence(
            id=next(self._ids), prompt_ids=list(prompt_ids), params=params,
            sampler=SamplerState(params, self.vocab_size, prompt_ids),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop),
            outlet=Outlet(loop, queue), arrival=now, deadline=deadline)
        self.scheduler.submit(seq)
        finished, started = False, False
        try:
            while True:
                if not started and deadline is not None:
                    try:
                        async with asyncio.timeout(deadline - time.monotonic()):
                            item = await queue.get()
                    except TimeoutError:
                        raise DeadlinePassed(f"no token within the deadline of {timeout_s:g}s") from None
                else:
                    item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine already let the sequence go
                    raise item
                started = True
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.scheduler.cancel(seq)
