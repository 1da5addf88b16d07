"""Timing on a busy machine: interleaved rounds, the quietness verdict and its retries driven by
synthetic noisy timings, ties within the noise, and a real SAMP run beside a process that loads a core."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from quantizer.samp import FUSIONS, Samp, choose_form, choose_fusions
from quantizer.schemas import SampSettings
from quantizer.timing import (
    OtherLoad,
    Quietness,
    Timing,
    TimingPolicy,
    clearly_faster,
    interleaved,
    measure,
    paired_ratio,
)
from training.checkpoint import load_checkpoint
from training.data.tasks import read_records

POLICY = TimingPolicy(rounds=3, max_rounds=3, per_round=2, warmup=1, max_uncertainty=0.075, max_other_cores=0.3,
                      retries=2, pause_s=0.5,
                      min_sample_ms=0, warmup_ms=0)


def steady(ms: float) -> Timing:
    return Timing(tuple(ms * f for f in (0.99, 1.0, 1.0, 1.01, 1.0, 0.995)))


def bursty(ms: float) -> Timing:
    """What a candidate looks like when another process takes the cores for part of the rounds."""
    return Timing((ms, ms * 3.1, ms, ms * 2.4, ms * 1.02, ms * 2.9))


def test_rounds_rotate_the_order_warm_each_turn_and_count_every_run() -> None:
    calls: list[str] = []
    runners = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    timings = interleaved(runners, POLICY)
    # round 0: a turn is 2 warm-up + 2 timed runs; later rounds 1 + 2
    assert calls[:12] == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert calls[12:21] == ["b"] * 3 + ["c"] * 3 + ["a"] * 3  # each round starts with a different runner
    assert calls[21:] == ["c"] * 3 + ["a"] * 3 + ["b"] * 3
    assert all(len(t.samples_ms) == 6 for t in timings.values())


def test_a_short_run_is_repeated_within_each_sample() -> None:
    counts = {"fast": 0}

    def fast() -> None:
        counts["fast"] += 1
        time.sleep(0.001)

    timings = interleaved({"fast": fast}, POLICY.model_copy(update={"min_sample_ms": 10.0}))
    assert counts["fast"] >= 2 + 6 * 5  # warm-ups, then 6 samples of several ~1 ms runs each
    assert all(0.9 < ms < 5 for ms in timings["fast"].samples_ms)  # per run, not per sample


def test_a_busy_measurement_is_retried_and_a_quiet_one_accepted() -> None:
    attempts = iter([({"torch": bursty(30), "int8": steady(10)}, 0.1),
                     ({"torch": steady(30), "int8": steady(10)}, 1.4),
                     ({"torch": steady(30), "int8": steady(10)}, 0.05)])
    pauses: list[float] = []
    timings, quiet = measure({}, POLICY, attempt=lambda: next(attempts), sleep=pauses.append)
    assert quiet.quiet and quiet.attempts == 3 and pauses == [0.5, 0.5]
    assert timings["torch"].median_ms / timings["int8"].median_ms == pytest.approx(3.0)


def test_a_machine_that_stays_busy_is_reported_not_hidden() -> None:
    def attempt():
        return {"torch": bursty(30), "int8": steady(10)}, 1.9

    _, quiet = measure({}, POLICY, attempt=attempt, sleep=lambda s: None)
    assert not quiet.quiet and quiet.attempts == 3
    assert "int8's ratio to torch was uncertain by" in quiet.reason
    assert "other processes used 1.90 cores" in quiet.reason
    # steady but slowed by a competitor: the load alone says busy
    _, loaded = measure({}, POLICY, attempt=lambda: ({"a": steady(30)}, 0.8), sleep=lambda s: None)
    assert not loaded.quiet and "uncertain" not in loaded.reason and "0.80 cores" in loaded.reason


def slowed_like(timing: Timing, ms: float) -> Timing:
    """Another candidate timed in the same rounds: the rounds that slowed ``timing`` slow it alike."""
    return Timing(tuple(t * ms / timing.samples_ms[0] for t in timing.samples_ms))


def test_a_noisy_host_that_slows_whole_rounds_still_gives_the_ratio() -> None:
    """A shared VM's slow rounds slow every candidate in them: each one's own spread is large, but the
    round-by-round ratio is steady; it is the ratio that is published, and the machine counts as quiet."""
    torch = bursty(30)
    int8 = slowed_like(torch, 10)
    assert torch.spread > 0.5 and int8.spread > 0.5
    timings, quiet = measure({}, POLICY, attempt=lambda: ({"torch": torch, "int8": int8}, 0.05), sleep=lambda s: None)
    assert quiet.quiet and quiet.attempts == 1 and quiet.worst_uncertainty == pytest.approx(0.0)
    assert paired_ratio(timings["torch"], timings["int8"]) == pytest.approx(3.0)
    # the same noise landing on one candidate only (another process in its turns) is busy
    _, busy = measure({}, POLICY, attempt=lambda: ({"torch": torch, "int8": steady(10)}, 0.05), sleep=lambda s: None)
    assert not busy.quiet and "int8's ratio to torch was uncertain" in busy.reason


def test_rounds_are_added_while_a_ratio_is_uncertain() -> None:
    """A noisy engine is given more rounds (up to max_rounds), not a verdict of busy after the first few;
    a steady pair stops at ``rounds``."""
    # other processes' load is not this test's subject: a busy CI host must not cut the rounds short
    policy = POLICY.model_copy(update={"rounds": 3, "max_rounds": 8, "warmup": 0, "retries": 0,
                                       "max_other_cores": 1e6})
    cycle = iter([0.02, 0.06] * 200)
    noisy = {"ref": lambda: time.sleep(0.02), "noisy": lambda: time.sleep(next(cycle))}
    timings, verdict = measure(noisy, policy)
    assert len(timings["noisy"].samples_ms) == 8 * 2 and verdict.rounds == 8
    assert verdict.worst_uncertainty is not None and verdict.worst_uncertainty > policy.max_uncertainty
    assert "uncertain" in verdict.reason and not verdict.quiet
    steady_pair = {"ref": lambda: time.sleep(0.02), "same": lambda: time.sleep(0.02)}
    timings, verdict = measure(steady_pair, policy)
    assert len(timings["same"].samples_ms) == 3 * 2 and verdict.rounds == 3
    assert verdict.worst_uncertainty is not None and verdict.worst_uncertainty < policy.max_uncertainty
    with pytest.raises(ValueError, match="max_rounds"):
        TimingPolicy(rounds=5, max_rounds=4)


def test_differences_within_the_noise_are_ties_broken_towards_the_batch_invariant_form() -> None:
    assert clearly_faster(steady(10), steady(13), POLICY)
    assert not clearly_faster(steady(10), steady(10.2), POLICY)  # under the 3% floor
    assert not clearly_faster(steady(10), bursty(9), POLICY)  # faster in half the rounds: the interval holds 1
    # forms ranked most batch-invariant first: a later one must be clearly faster to displace it
    ranked = ["static", "dynamic"]
    assert choose_form({"dynamic": steady(10), "static": steady(13)}, ranked, POLICY)[0] == "dynamic"
    mode, why = choose_form({"dynamic": steady(10), "static": steady(10.2)}, ranked, POLICY)
    assert mode == "static" and "batch-mates" in why
    assert choose_form({"blockwise": steady(50), "static": steady(20)}, ["blockwise", "static"], POLICY)[0] == "static"


def test_a_fusion_is_left_out_only_when_the_graph_is_faster_without_it_on_a_quiet_machine() -> None:
    quiet = Quietness(quiet=True, attempts=1, worst_spread=0.01, other_cores=0.0)
    busy = Quietness(quiet=False, attempts=3, worst_spread=0.4, other_cores=1.0, reason="other processes")
    fusion = FUSIONS[0]
    slower_fused = {"default": steady(268), f"without {fusion}": steady(247)}
    disabled, why = choose_fusions(slower_fused, quiet, POLICY)
    assert disabled == [fusion] and "268.0 ms" in why and "247.0 ms" in why
    assert choose_fusions({"default": steady(250), f"without {fusion}": steady(247)}, quiet, POLICY)[0] == []
    # faster in some rounds, much slower in others: not a gain
    assert choose_fusions({"default": steady(268), f"without {fusion}": bursty(247)}, quiet, POLICY)[0] == []
    # the same bursts in both (a noisy neighbour slowing whole rounds): the round-by-round ratio still tells
    together = {"default": bursty(268), f"without {fusion}": Timing(tuple(0.9 * t for t in bursty(268).samples_ms))}
    assert clearly_faster(together[f"without {fusion}"], together["default"], POLICY)
    assert choose_fusions(together, quiet, POLICY)[0] == [fusion]
    disabled, why = choose_fusions(slower_fused, busy, POLICY)  # never decided on a busy machine
    assert disabled == [] and "busy" in why


def _burner(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time\nend = time.time() + {seconds}\n"
                             "while time.time() < end: pass"])


def test_other_processes_cpu_is_seen() -> None:
    burner = _burner(3.0)
    try:
        time.sleep(0.3)
        with OtherLoad() as load:
            time.sleep(1.0)
    finally:
        burner.wait()
    assert load.cores is not None and load.cores > 0.6  # one core spinning in another process


def test_samp_beside_a_busy_core_publishes_no_speed_ratio(tiny_classifier, topics_data, tmp_path) -> None:
    """A real run while another process spins: the report says the machine was busy and gives no ratio."""
    settings = SampSettings(max_drop=0.05, latency_batches=(1, 4), sequence_length=32, max_examples=48,
                            calibration_batches=2, threads=1, max_candidates=2, mode="blockwise",
                            timing={"rounds": 2, "max_rounds": 2, "per_round": 2, "retries": 1, "pause_s": 0.2,
                                    "max_other_cores": 0.3})
    samp = Samp(load_checkpoint(tiny_classifier), read_records(topics_data / "dev.jsonl"), settings,
                workdir=tmp_path)
    burner = _burner(600)
    try:
        report = samp.run().report
    finally:
        burner.kill()
        burner.wait()
    assert report.timing is not None and not report.timing.quiet
    assert "other processes used" in report.timing.reason
    assert all(c.speedup_vs_torch is None for c in report.candidates)
    assert "speed ratio not published" in report.verdict
    assert all(c.latency_ms[4] > 0 for c in report.candidates)  # the timings themselves are still recorded
