"""One request's life in the engine: its tokens, sampling and text state, and its way back to the caller."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

from service.generation.detokenizer import IncrementalDetokenizer
from service.generation.params import Delta, FinishReason, SamplingParams
from service.generation.sampler import SamplerState

Item = Delta | BaseException
"""What a caller receives: a delta, or the error that ends its stream."""


@dataclass(frozen=True, eq=False)
class Outlet:
    """The caller's end: a queue on its event loop (the engine thread may only reach it through
    ``loop.call_soon_threadsafe``)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Item]


@dataclass(eq=False)
class Sequence:
    id: int
    """Arrival order: the newest running sequence is the one preempted."""
    prompt_ids: list[int]
    params: SamplingParams
    sampler: SamplerState
    detokenizer: IncrementalDetokenizer
    outlet: Outlet
    arrival: float
    """time.monotonic() at submission."""
    deadline: float | None = None
    output_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    prefilled: bool = False
    """Its prompt went through the graph once (counted once, whatever preemption recomputes)."""
    cancelled: bool = False
    """Set by the caller's side when it stops reading; the step loop drops the sequence."""
    finish_reason: FinishReason | None = None
    preemptions: int = 0

    @property
    def ids(self) -> list[int]:
        """Everything a (re)prefill feeds: the prompt and what was generated so far."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def done(self) -> bool:
        return self.cancelled or self.finish_reason is not None

    def delta(self, text: str, token_ids: list[int], finish: FinishReason | None = None) -> Delta:
        return Delta(text, token_ids, finish, len(self.prompt_ids), len(self.output_ids))


def send(items: list[tuple[Sequence, Item]]) -> None:
    """Hand each item to its caller, from the engine thread: one wake-up per event loop per step
    (not one per token), in order. A caller whose loop has closed is not reading: cancelled."""
    by_loop: defaultdict[asyncio.AbstractEventLoop, list[tuple[Sequence, Item]]] = defaultdict(list)
    for seq, item in items:
        by_loop[seq.outlet.loop].append((seq, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop is closed
            for seq, _ in batch:
                seq.cancelled = True


def _put_all(batch: list[tuple[Sequence, Item]]) -> None:
    for seq, item in batch:
        seq.outlet.queue.put_nowait(item)
