"""Continuous batching: what each step of the engine does, shaped after TGI's cached batch.

A step either prefills newly admitted requests (as their own batches, grouped by length) and
concatenates them into the running batch, or decodes one token for every running sequence. New
requests join at the next step, so a short request arriving behind a long one finishes first.
Finished and cancelled sequences leave every step. When a decode step would take the cache past
``max_kv_tokens``, the newest running sequence is preempted by recompute: its cache is dropped and
its prompt plus what it generated goes back to the front of the queue.

Everything here runs on the engine's thread, except ``submit``, ``cancel`` and ``abort``, which
the event loop calls; the waiting queue is shared under ``lock``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.errors import DeadlinePassed, ModelFailure, NotReady, Overloaded, ServiceError
from service.generation.cache import KVCache
from service.generation.graph import DecoderGraph
from service.generation.params import FinishReason
from service.generation.sampler import sample
from service.generation.sequence import Item, Sequence, send

log = logging.getLogger("sampserve")
GROUP_WASTE = 0.25
"""A prefill group takes the next (longer) prompt while its padding stays under this share."""


@dataclass(frozen=True)
class EngineLimits:
    max_num_seqs: int = 16
    max_batch_prefill_tokens: int = 2048
    max_kv_tokens: int = 16 * 2048
    max_model_len: int = 2048
    max_waiting: int = 256
    continuous: bool = True
    """False: request-level batching, a batch runs to completion before others join (benchmarks)."""

    def __post_init__(self) -> None:
        if self.max_kv_tokens < self.max_model_len or self.max_batch_prefill_tokens < self.max_model_len:
            raise ValueError(f"max_kv_tokens ({self.max_kv_tokens}) and max_batch_prefill_tokens "
                             f"({self.max_batch_prefill_tokens}) must each hold one sequence of "
                             f"max_model_len ({self.max_model_len}) tokens")


class EngineObserver(Protocol):
    """Where the engine reports (service.metrics.GenerationMetrics); called on the engine thread."""

    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def tokens(self, prompt: int, generated: int) -> None: ...
    def occupancy(self, running: int, waiting: int, kv_tokens: int, kv_capacity: int) -> None: ...
    def preempted(self) -> None: ...


class NullObserver:
    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def tokens(self, prompt: int, generated: int) -> None: ...
    def occupancy(self, running: int, waiting: int, kv_tokens: int, kv_capacity: int) -> None: ...
    def preempted(self) -> None: ...


class Scheduler:
    def __init__(self, graph: DecoderGraph, limits: EngineLimits, stop_token_ids: Iterable[int], pad_id: int,
                 observer: EngineObserver | None = None) -> None:
        self.graph, self.limits, self.pad_id = graph, limits, pad_id
        self.stop_ids = frozenset(stop_token_ids)
        self.observer: EngineObserver = observer or NullObserver()
        self.lock = threading.Condition()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.cache = graph.empty_cache()
        self.preemptions = 0
        self._outbox: list[tuple[Sequence, Item]] = []
        """What this step sends, delivered after the batch and the gauges are updated: a caller
        holding its final delta sees its slot already free."""
        self.closed = False
        """No new requests (the version is unloading); the loop ends once the work is done."""

    # -- called from the event loop ----------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue a request, or raise Overloaded at once when the queue is full (never blocks), or
        NotReady once closed."""
        with self.lock:
            if self.closed:
                raise NotReady("this model version is shutting down")
            if len(self.waiting) >= self.limits.max_waiting:
                raise Overloaded(f"{len(self.waiting)} generation requests are waiting (max_waiting="
                                 f"{self.limits.max_waiting}); try again later")
            self.waiting.append(seq)
            self.lock.notify()
        self.report()

    def cancel(self, seq: Sequence) -> None:
        """The caller stopped reading: a waiting sequence leaves now, a running one at the next step."""
        seq.cancelled = True
        with self.lock:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.lock.notify()
        self.report()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()

    def abort(self, error: ServiceError) -> None:
        """Fail everything waiting or running (closing without drain)."""
        with self.lock:
            doomed = [*self.waiting, *self.running]
            self.waiting.clear()
            for seq in doomed:
                seq.cancelled = True
            send([(seq, error) for seq in doomed])
            self.lock.notify()
        self.report()

    # -- the engine thread -------------------------------------------------------------------

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> None:
        """One prefill of newly admitted requests, or one decode step of the running batch."""
        now = time.monotonic()
        self._drop(now)
        admitted = self._admit()
        try:
            if admitted:
                self._prefill(admitted)
            elif self.running:
                self._make_room()
                self._decode()
        except Exception as exc:  # the runtime failed: fail the batch, keep serving the queue
            log.exception("generation step failed")
            for seq in [*self.running, *admitted]:
                if not seq.done:
                    self._outbox.append((seq, ModelFailure(f"the model failed: {type(exc).__name__}: {exc}")))
                    seq.cancelled = True
            self.running, self.cache = [], self.graph.empty_cache()
        self.report()
        outbox, self._outbox = self._outbox, []
        send(outbox)

    def report(self) -> None:
        self.observer.occupancy(len(self.running), len(self.waiting), self.cache.tokens, self.limits.max_kv_tokens)

    def _drop(self, now: float) -> None:
        """Cancelled sequences leave; deadlines: before the first token an error, after it "length"."""
        with self.lock:
            keep: deque[Sequence] = deque()
            for seq in self.waiting:
                if seq.cancelled:
                    continue
                if seq.deadline is not None and now >= seq.deadline:
                    self._expire(seq)
                    continue
                keep.append(seq)
            self.waiting = keep
        for seq in self.running:
            if not seq.cancelled and seq.deadline is not None and now >= seq.deadline:
                self._expire(seq)
        self._keep_live()

    def _expire(self, seq: Sequence) -> None:
        if seq.output_ids:
            self._finish(seq, "length", [], "")
        else:
            seq.cancelled = True
            self._outbox.append((seq, DeadlinePassed("deadline passed before the first token")))

    def _admit(self) -> list[Sequence]:
        """Waiting sequences (in order) that fit a free slot, the prefill budget and the cache cap."""
        limits = self.limits
        with self.lock:
            if not self.waiting or (self.running and not limits.continuous):
                return []
            chosen: list[Sequence] = []
            rows, length, tokens = self.cache.batch, self.cache.length, 0
            for seq in self.waiting:
                n = len(seq.ids)
                if rows + 1 > limits.max_num_seqs or (chosen and tokens + n > limits.max_batch_prefill_tokens):
                    break
                if (rows or chosen) and (rows + 1) * (max(length, n) + 1) > limits.max_kv_tokens:
                    break
                chosen.append(seq)
                rows, length, tokens = rows + 1, max(length, n), tokens + n
            for _ in chosen:
                self.waiting.popleft()
            return chosen

    def _prefill(self, admitted: list[Sequence]) -> None:
        parts, logits = [self.cache], []
        ordered: list[Sequence] = []
        for group in group_by_length(admitted):
            out, cache = self.graph.prefill([s.ids for s in group], self.pad_id)
            parts.append(cache)
            logits.append(out)
            ordered += group
        self.cache = KVCache.concat(parts)
        self.running += ordered
        prompt = sum(len(s.prompt_ids) for s in ordered if not s.prefilled)
        for seq in ordered:
            seq.prefilled = True
        self._advance(ordered, np.concatenate(logits), prompt)

    def _decode(self) -> None:
        logits, self.cache = self.graph.decode([s.output_ids[-1] for s in self.running], self.cache)
        self._advance(self.running, logits, 0)

    def _advance(self, seqs: list[Sequence], logits: np.ndarray, prompt_tokens: int) -> None:
        """Sample a token for each of ``seqs`` (rows of ``logits``), stream it, drop the finished."""
        tokens = sample(logits, [s.sampler for s in seqs])
        now = time.monotonic()
        accepted = sum(self._accept(seq, token, now) for seq, token in zip(seqs, tokens, strict=True))
        self.observer.tokens(prompt_tokens, accepted)
        self._keep_live()

    def _accept(self, seq: Sequence, token: int, now: float) -> bool:
        """Append a token, queue its delta, finish the sequence if it ends; False if cancelled."""
        if seq.cancelled:
            return False
        seq.output_ids.append(token)
        seq.sampler.observe(token)
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.observer.first_token(now - seq.arrival)
        elif seq.last_token_at is not None:
            self.observer.inter_token(now - seq.last_token_at)
        seq.last_token_at = now
        if token in self.stop_ids and not seq.params.ignore_eos:
            self._finish(seq, "stop", [token], "")
            return True
        text = seq.detokenizer.add(token)
        if seq.detokenizer.stopped:
            self._finish(seq, "stop", [token], text)
        elif (len(seq.output_ids) >= seq.params.max_tokens
              or len(seq.prompt_ids) + len(seq.output_ids) >= self.limits.max_model_len
              or (seq.deadline is not None and now >= seq.deadline)):
            self._finish(seq, "length", [token], text)
        else:
            self._outbox.append((seq, seq.delta(text, [token])))
        return True

    def _finish(self, seq: Sequence, reason: FinishReason, token_ids: list[int], text: str) -> None:
        text += seq.detokenizer.finish()
        seq.finish_reason = "stop" if seq.detokenizer.stopped else reason
        self._outbox.append((seq, seq.delta(text, token_ids, seq.finish_reason)))

    def _keep_live(self) -> None:
        """Index-select the running batch down to the sequences still going."""
        live = [i for i, s in enumerate(self.running) if not s.done]
        if len(live) < len(self.running):
            self.running = [self.running[i] for i in live]
            self.cache = self.cache.select(live) if live else self.graph.empty_cache()

    def _make_room(self) -> None:
        """Preempt the newest sequences until the next decode step fits ``max_kv_tokens``."""
        while len(self.running) > 1 and self.cache.batch * (self.cache.length + 1) > self.limits.max_kv_tokens:
            victim = max(range(len(self.running)), key=lambda i: self.running[i].id)
            seq = self.running[victim]
            keep = [i for i in range(len(self.running)) if i != victim]
            self.running = [self.running[i] for i in keep]
            self.cache = self.cache.select(keep)
            seq.preemptions += 1
            self.preemptions += 1
            with self.lock:
                self.waiting.appendleft(seq)
            self.observer.preempted()


def group_by_length(seqs: list[Sequence]) -> list[list[Sequence]]:
    """Prefill batches: shortest first, a new group when padding to the next length would waste
    more than GROUP_WASTE of the group's tokens (one long prompt does not pad many short ones)."""
    groups: list[list[Sequence]] = []
    real = 0
    for seq in sorted(seqs, key=lambda s: len(s.ids)):
        n = len(seq.ids)
        if groups and (len(groups[-1]) + 1) * n - (real + n) <= GROUP_WASTE * (real + n):
            groups[-1].append(seq)
            real += n
        else:
            groups.append([seq])
            real = n
    return groups
