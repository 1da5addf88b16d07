"""Timing that survives a busy machine.

A single sequential measurement per candidate is what made a quiet 2.87x plan read as 0.87x while
another process shared the cores: whichever candidate ran during the burst looked slow. Here every
candidate (PyTorch eager included) is timed in the same rounds, round robin with the order rotated
each round, so a burst lands on all of them alike; each gets the median of its samples and a spread
(interquartile range over the median). Comparisons are made sample by sample within the rounds: a
ratio between two candidates is the median of their round-by-round ratios (on a shared VM a whole
round can run 20-40% slow for every candidate in it, which cancels in its ratios). What is trusted
is a median ratio whose ~95% confidence interval is narrow: rounds are added while it is wide, since
a noisy engine (PyTorch eager's own runs vary by ~15% here) needs more samples, not a verdict of
"busy". Meanwhile the CPU time that *other* processes used is read from /proc/stat. When other
processes used the CPU, or an interval is still wide at the round limit, the measurement is retried
after a pause; when it stays so the caller is told, and publishes no speed ratio rather than a wrong
one. Decisions between candidates whose ratio's interval includes 1 (or lies within the noise
floor of it) are ties, which the caller breaks by accuracy and batch invariance, not by speed.
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
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    max_rounds: int = Field(
        20, ge=1, description="Rounds allowed in one attempt: after ``rounds``, rounds are added while a ratio's "
        "median is still uncertain by more than max_uncertainty.")
    max_uncertainty: float = Field(
        0.075, gt=0, description="Largest relative half-width of the ~95% confidence interval of a candidate's "
        "median ratio to the reference in a trusted measurement: two measurements each within 7.5% of the "
        "truth are within 15% of each other.")
    max_other_cores: float = Field(
        0.3, ge=0, description="Most CPU (in cores) other processes may use during a quiet measurement.")
    retries: int = Field(2, ge=0, description="Re-measurements after a busy one, each after a pause.")
    pause_s: float = Field(3.0, ge=0)
    min_sample_ms: float = Field(
        50.0, ge=0, description="Each sample times enough back-to-back runs to last this long (as timeit's "
        "autorange does): a run of a few milliseconds alone is dominated by timer and scheduler jitter.")
    noise_floor: float = Field(
        0.03, ge=0, description="Ratios closer to 1 than this fraction are a tie however narrow their interval.")

    @model_validator(mode="after")
    def _rounds_fit(self) -> TimingPolicy:
        if self.max_rounds < self.rounds:
            raise ValueError(f"max_rounds ({self.max_rounds}) must be at least rounds ({self.rounds})")
        return self


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
    """Largest interquartile range / median of a candidate's round-by-round ratios to the reference (the
    first candidate) in the last attempt (of its own samples when it was timed alone)."""
    worst_uncertainty: float | None = None
    """Largest relative half-width of the ~95% interval of a median ratio in the last attempt (None: a report
    from before intervals were kept)."""
    rounds: int | None = None
    """Rounds the last attempt took."""
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

    def so_far(self) -> float | None:
        """Other processes' cores since the block began."""
        machine = cpu_busy_seconds()
        if machine is None or self._machine is None:
            return None
        wall = max(time.perf_counter() - self._wall, 1e-6)
        own = time.process_time() - self._own
        return max(0.0, (machine - self._machine - own) / wall)

    def __exit__(self, *exc: object) -> None:
        self.cores = self.so_far()


def interleaved(runners: Mapping[str, Callable[[], object]], policy: TimingPolicy,
                enough: Callable[[dict[str, Timing]], bool] | None = None) -> dict[str, Timing]:
    """Time every runner in the same rounds: round r starts at the r-th runner, so none is always first;
    each turn starts with untimed warm-up runs. After ``policy.rounds``, rounds are added (up to
    ``policy.max_rounds``) until ``enough`` says the timings so far suffice."""
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    calls: dict[str, int] = {}

    def timings() -> dict[str, Timing]:
        return {name: Timing(tuple(values)) for name, values in samples.items()}

    collecting = gc.isenabled()
    gc.disable()  # as timeit does: a collection pass inside a sample is jitter, not the engine's time
    try:
        for r in range(policy.max_rounds):
            if r >= policy.rounds and (enough is None or enough(timings())):
                break
            _round(r, runners, names, policy, samples, calls)
    finally:
        if collecting:
            gc.enable()
    return timings()


def _round(r: int, runners: Mapping[str, Callable[[], object]], names: list[str], policy: TimingPolicy,
           samples: dict[str, list[float]], calls: dict[str, int]) -> None:
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


def median_interval(values: np.ndarray) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval of the median: the order statistics k values in from
    each end, k = floor((n - 1.96 sqrt(n)) / 2) (the binomial's normal approximation; n = 10 gives the
    2nd and 9th values, 98% coverage); with 7 values or fewer it is their whole range."""
    ordered = np.sort(np.asarray(values, dtype=float))
    k = max(0, math.floor((len(ordered) - 1.96 * math.sqrt(len(ordered))) / 2))
    return float(ordered[k]), float(ordered[len(ordered) - 1 - k])


def uncertainty(values: np.ndarray) -> float:
    """Relative half-width of ``median_interval``: how far the median may be from the truth."""
    low, high = median_interval(values)
    return (high - low) / 2 / max(float(np.median(values)), 1e-12)


def _judged(timings: Mapping[str, Timing]) -> dict[str, np.ndarray]:
    """What each candidate is judged by: its round-by-round ratios to the first candidate (the
    reference), or its own samples when it is alone."""
    names = list(timings)
    if len(names) == 1:
        return {names[0]: np.array(timings[names[0]].samples_ms)}
    return {name: paired_ratios(timings[name], timings[names[0]]) for name in names[1:]}


def uncertainties(timings: Mapping[str, Timing]) -> dict[str, float]:
    """``uncertainty`` of what each candidate is judged by (``_judged``)."""
    return {name: uncertainty(values) for name, values in _judged(timings).items()}


def spreads(timings: Mapping[str, Timing]) -> dict[str, float]:
    """Interquartile range / median of what each candidate is judged by (``_judged``): for the report."""

    def iqr(values: np.ndarray) -> float:
        low, high = np.percentile(values, [25, 75])
        return float((high - low) / max(float(np.median(values)), 1e-12))

    return {name: iqr(values) for name, values in _judged(timings).items()}


def busy_reason(timings: Mapping[str, Timing], other_cores: float | None, policy: TimingPolicy) -> str:
    """Why a measurement cannot be trusted, or '' when it can: a median ratio (to the first candidate)
    whose interval is wider than ``max_uncertainty``, or other processes using the CPU."""
    reasons = []
    noise = uncertainties(timings)
    worst = max(noise, key=noise.__getitem__)
    if noise[worst] > policy.max_uncertainty:
        what = f"{worst}'s time" if len(timings) == 1 else f"{worst}'s ratio to {next(iter(timings))}"
        samples = len(next(iter(timings.values())).samples_ms)
        reasons.append(f"{what} was uncertain by +-{noise[worst]:.0%} after {samples} samples (95% interval of "
                       f"the median; trusted is <= +-{policy.max_uncertainty:.1%})")
    if other_cores is not None and other_cores > policy.max_other_cores:
        reasons.append(f"other processes used {other_cores:.2f} cores (quiet is <= {policy.max_other_cores:.2f})")
    return "; ".join(reasons)


Attempt = Callable[[], tuple[dict[str, Timing], float | None]]


def measure(runners: Mapping[str, Callable[[], object]], policy: TimingPolicy,
            attempt: Attempt | None = None, sleep: Callable[[float], None] = time.sleep,
            ) -> tuple[dict[str, Timing], Quietness]:
    """Interleaved timings, re-measured while the machine is busy (up to ``policy.retries`` times).
    The first runner is the reference: rounds are added while a median ratio to it is uncertain, and
    the attempt is busy when one still is at ``max_rounds`` or other processes used the CPU.

    ``attempt`` replaces one real measurement (timings, other processes' cores): the decision logic
    is tested with synthetic noisy timings through it."""

    def real() -> tuple[dict[str, Timing], float | None]:
        with OtherLoad() as load:
            def enough(timings: dict[str, Timing]) -> bool:  # narrow, or lost to other processes anyway
                other = load.so_far()
                return (max(uncertainties(timings).values()) <= policy.max_uncertainty
                        or (other is not None and other > policy.max_other_cores))

            timings = interleaved(runners, policy, enough)
        return timings, load.cores

    attempt = attempt or real
    for number in range(1, policy.retries + 2):
        timings, other = attempt()
        reason = busy_reason(timings, other, policy)
        verdict = Quietness(quiet=not reason, attempts=number, worst_spread=max(spreads(timings).values()),
                            worst_uncertainty=max(uncertainties(timings).values()), other_cores=other,
                            rounds=len(next(iter(timings.values())).samples_ms) // policy.per_round, reason=reason)
        if not reason:
            return timings, verdict
        if number <= policy.retries:
            sleep(policy.pause_s)
    return timings, verdict


def clearly_faster(a: Timing, b: Timing, policy: TimingPolicy) -> bool:
    """``a`` beats ``b`` timed in the same interleaved rounds: the whole ~95% interval of the median of their
    round-by-round ratios a/b lies below 1 by more than the noise floor. A slow round slows both and cancels
    in its ratio, so a 10% gain in every round is told apart where the medians, each spread by the
    machine's noise, could not be; with under 6 samples the interval is their whole range."""
    return median_interval(paired_ratios(a, b))[1] < 1.0 - policy.noise_floor


def combine(conditions: list[Quietness], labels: list[int]) -> Quietness:
    """One verdict over measurements at several batch sizes (``labels``): quiet only if each was; the worst
    spread, interval, rounds and load."""
    loads = [c.other_cores for c in conditions if c.other_cores is not None]
    known = [c.worst_uncertainty for c in conditions if c.worst_uncertainty is not None]
    rounds = [c.rounds for c in conditions if c.rounds is not None]
    return Quietness(quiet=all(c.quiet for c in conditions), attempts=sum(c.attempts for c in conditions),
                     worst_spread=max(c.worst_spread for c in conditions), other_cores=max(loads) if loads else None,
                     worst_uncertainty=max(known) if known else None, rounds=max(rounds) if rounds else None,
                     reason="; ".join(f"batch {b}: {c.reason}" for b, c in zip(labels, conditions) if c.reason))
