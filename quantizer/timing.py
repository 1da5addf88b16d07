"""Timing that survives a busy machine.

A single sequential measurement per candidate is what made a quiet 2.87x plan read as 0.87x while
another process shared the cores: whichever candidate ran during the burst looked slow. Here every
candidate (PyTorch eager included) is timed in the same rounds, round robin with the order rotated
each round, so a burst lands on all of them alike; each gets the median of its samples and a spread
(interquartile range over the median). Comparisons are made sample by sample within the rounds: a
ratio between two candidates is the median of their round-by-round ratios, and quietness is judged
by how much those ratios vary, not by how much each candidate's own time does. On a shared VM a
whole round can run 20-40% slow for both candidates (the host's noise): each candidate's own spread
then says "busy" while its ratio to the reference stays within a few percent. Meanwhile the CPU time
that *other* processes used is read from /proc/stat. When the spread or the other processes' share
says the machine was busy, the measurement is retried after a pause; when it stays busy the caller
is told, and publishes no speed ratio rather than a wrong one. Decisions between candidates whose
medians differ by less than the noise are ties, which the caller breaks by accuracy and batch
invariance, not by speed.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PROC_STAT = Path("/proc/stat")
CGROUP_CPU_STAT = Path("/sys/fs/cgroup/cpu.stat")
TORCH = "PyTorch eager"
"""The runner name of the PyTorch eager FP32 reference that speed ratios are taken against."""


class TimingPolicy(BaseModel):
    """How candidates are timed and when a measurement counts as quiet."""

    model_config = ConfigDict(extra="forbid")

    rounds: int = Field(5, ge=1, description="Round-robin rounds over all candidates.")
    per_round: int = Field(2, ge=1, description="Timed runs of each candidate per round.")
    warmup: int = Field(
        1, ge=0, description="Untimed runs at the start of each candidate's turn (one more in the first round), "
        "and at least warmup_ms of them: the engine timed before leaves threads spinning for a while "
        "(onnxruntime's pool, OpenMP), which would otherwise land on the first timed runs.")
    warmup_ms: float = Field(100.0, ge=0, description="Shortest warm-up at each turn, in milliseconds.")
    max_spread: float = Field(
        0.15, gt=0, description="Largest interquartile range / median of any candidate in a quiet measurement.")
    max_other_cores: float = Field(
        0.3, ge=0, description="Most CPU (in cores) other processes may use during a quiet measurement.")
    retries: int = Field(2, ge=0, description="Re-measurements after a busy one, each after a pause.")
    pause_s: float = Field(3.0, ge=0)
    min_sample_ms: float = Field(
        50.0, ge=0, description="Each sample times enough back-to-back runs to last this long (as timeit's "
        "autorange does): a run of a few milliseconds alone is dominated by timer and scheduler jitter.")
    noise_floor: float = Field(
        0.03, ge=0, description="Medians closer than this fraction are a tie even when the spread is smaller.")


@dataclass(frozen=True)
class Timing:
    """Samples of one candidate in milliseconds, with a robust centre and spread."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.samples_ms))

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.0 for one sample)."""
        low, high = np.percentile(self.samples_ms, [25, 75])
        return float((high - low) / max(self.median_ms, 1e-9))


class Quietness(BaseModel):
    """What the report records about the conditions of a measurement."""

    quiet: bool
    attempts: int
    worst_spread: float
    """Largest relative interquartile range in the last attempt: of a candidate's round-by-round ratio to the
    reference (the first candidate), or of its own samples when it was timed alone."""
    other_cores: float | None
    """CPU used by other processes during the last attempt, in cores (None where /proc/stat is absent)."""
    reason: str = ""
    """Why the machine counted as busy (empty when quiet)."""


def cpu_busy_seconds() -> float | None:
    """Busy CPU seconds since boot of what this process shares its CPUs with: its container's cgroup
    where there is one (in a container /proc/stat counts the whole host), else the machine (steal
    included: a VM's host taking the cores is load too); None off Linux."""
    try:
        for line in CGROUP_CPU_STAT.read_text().splitlines():
            key, value = line.split()
            if key == "usage_usec":
                return int(value) / 1e6
    except (OSError, ValueError):
        pass
    try:
        fields = PROC_STAT.read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Measures the CPU that processes other than this one use while the block runs, in cores."""

    def __enter__(self) -> OtherLoad:
        self.cores: float | None = None
        self._machine, self._own, self._wall = cpu_busy_seconds(), time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        machine = cpu_busy_seconds()
        if machine is None or self._machine is None:
            return
        wall = max(time.perf_counter() - self._wall, 1e-6)
        own = time.process_time() - self._own
        self.cores = max(0.0, (machine - self._machine - own) / wall)


def interleaved(runners: Mapping[str, Callable[[], object]], policy: TimingPolicy) -> dict[str, Timing]:
    """Time every runner in the same rounds: round r starts at the r-th runner, so none is always first;
    each turn starts with untimed warm-up runs."""
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    calls: dict[str, int] = {}
    collecting = gc.isenabled()
    gc.disable()  # as timeit does: a collection pass inside a sample is jitter, not the engine's time
    try:
        _rounds(runners, names, policy, samples, calls)
    finally:
        if collecting:
            gc.enable()
    return {name: Timing(tuple(values)) for name, values in samples.items()}


def _rounds(runners: Mapping[str, Callable[[], object]], names: list[str], policy: TimingPolicy,
            samples: dict[str, list[float]], calls: dict[str, int]) -> None:
    for r in range(policy.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            warm_start, runs = time.perf_counter(), 0
            while runs < policy.warmup + (r == 0) or (time.perf_counter() - warm_start) * 1000 < policy.warmup_ms:
                start = time.perf_counter()
                runners[name]()
                once_ms = (time.perf_counter() - start) * 1000
                runs += 1
            if name not in calls:  # sized from the last warm-up run of the first round
                calls[name] = max(1, math.ceil(policy.min_sample_ms / max(once_ms, 1e-3)))
            for _ in range(policy.per_round):
                start = time.perf_counter()
                for _ in range(calls[name]):
                    runners[name]()
                samples[name].append((time.perf_counter() - start) * 1000 / calls[name])


def paired_ratios(a: Timing, b: Timing) -> np.ndarray:
    """``a``'s samples over ``b``'s, taken in the same order (the same rounds of ``interleaved``)."""
    n = min(len(a.samples_ms), len(b.samples_ms))
    return np.array(a.samples_ms[:n]) / np.maximum(np.array(b.samples_ms[:n]), 1e-9)


def paired_ratio(a: Timing, b: Timing) -> float:
    """How many times ``a``'s time ``b``'s is: the median of their round-by-round ratios (a slow round
    slows both and cancels)."""
    return float(np.median(paired_ratios(a, b)))


def paired_spread(a: Timing, b: Timing) -> float:
    """Interquartile range / median of the round-by-round ratios: the noise left in a comparison."""
    ratios = paired_ratios(a, b)
    low, high = np.percentile(ratios, [25, 75])
    return float((high - low) / max(float(np.median(ratios)), 1e-9))


def spreads(timings: Mapping[str, Timing]) -> dict[str, float]:
    """The noise that counts for each candidate: its round-by-round ratio's spread against the first
    candidate (the reference), or its own spread when it is alone."""
    names = list(timings)
    if len(names) == 1:
        return {names[0]: timings[names[0]].spread}
    reference = timings[names[0]]
    return {name: paired_spread(timings[name], reference) for name in names[1:]}


def busy_reason(timings: Mapping[str, Timing], other_cores: float | None, policy: TimingPolicy) -> str:
    """Why a measurement cannot be trusted, or '' when it can (``spreads``: the first candidate is the
    reference the others are compared with)."""
    reasons = []
    noise = spreads(timings)
    worst = max(noise, key=noise.__getitem__)
    if noise[worst] > policy.max_spread:
        against = "" if len(timings) == 1 else f" against {next(iter(timings))} round by round"
        reasons.append(f"{worst} varied by {noise[worst]:.0%}{against} (interquartile range / median; "
                       f"quiet is <= {policy.max_spread:.0%})")
    if other_cores is not None and other_cores > policy.max_other_cores:
        reasons.append(f"other processes used {other_cores:.2f} cores (quiet is <= {policy.max_other_cores:.2f})")
    return "; ".join(reasons)


Attempt = Callable[[], tuple[dict[str, Timing], float | None]]


def measure(runners: Mapping[str, Callable[[], object]], policy: TimingPolicy,
            attempt: Attempt | None = None, sleep: Callable[[float], None] = time.sleep,
            ) -> tuple[dict[str, Timing], Quietness]:
    """Interleaved timings, re-measured while the machine is busy (up to ``policy.retries`` times).
    The first runner is the reference whose round-by-round ratios to the others judge the noise.

    ``attempt`` replaces one real measurement (timings, other processes' cores): the decision logic
    is tested with synthetic noisy timings through it."""

    def real() -> tuple[dict[str, Timing], float | None]:
        with OtherLoad() as load:
            timings = interleaved(runners, policy)
        return timings, load.cores

    attempt = attempt or real
    for number in range(1, policy.retries + 2):
        timings, other = attempt()
        reason = busy_reason(timings, other, policy)
        worst = max(spreads(timings).values())
        if not reason:
            return timings, Quietness(quiet=True, attempts=number, worst_spread=worst, other_cores=other)
        if number <= policy.retries:
            sleep(policy.pause_s)
    return timings, Quietness(quiet=False, attempts=number, worst_spread=worst, other_cores=other, reason=reason)


def clearly_faster(a: Timing, b: Timing, policy: TimingPolicy) -> bool:
    """``a`` beats ``b`` timed in the same interleaved rounds: ``a`` was faster in at least three of four
    round-by-round ratios a/b, and their median is lower than 1 by more than their spread and the noise
    floor. A slow round slows both and cancels in its ratio, so a 10% gain in every round is told apart
    where the medians, each spread by the machine's noise, could not be."""
    ratios = paired_ratios(a, b)
    noise = max(paired_spread(a, b), policy.noise_floor)
    return bool(np.percentile(ratios, 75) < 1.0 and np.median(ratios) < 1.0 - noise)


def combine(conditions: list[Quietness], labels: list[int]) -> Quietness:
    """One verdict over measurements at several batch sizes (``labels``): quiet only if each was; the worst
    spread and load."""
    loads = [c.other_cores for c in conditions if c.other_cores is not None]
    return Quietness(quiet=all(c.quiet for c in conditions), attempts=sum(c.attempts for c in conditions),
                     worst_spread=max(c.worst_spread for c in conditions), other_cores=max(loads) if loads else None,
                     reason="; ".join(f"batch {b}: {c.reason}" for b, c in zip(labels, conditions) if c.reason))
