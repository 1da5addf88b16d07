"""SAMP end to end: export, measure extremes, measure each unit, search, verify, report.

The steps are fixed (as in onnxruntime's calibrate.py: augment / collect / compute); the decision
is ``quantizer.search.search``, a pure function. Every number in the report is measured in this
run except each unit's latency gain, which is the measured FP32 -> all-INT8 saving apportioned by
the unit's share of matrix FLOPs (one unit alone moves latency less than run-to-run noise).
Timings go through ``quantizer.timing`` (interleaved rounds, a quietness check); the report carries
the machine they were taken on (``service.provenance``).
"""

from __future__ import annotations

import functools
import itertools
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import get_args

from onnxruntime import InferenceSession
from rich.progress import Progress

from quantizer.data import build_data
from quantizer.engines import ort_session
from quantizer.export import ExportInfo, export_onnx
from quantizer.measure import batch_invariance, keeps_budget, metric_name, run_batched, session_runner, torch_runner
from quantizer.quantize import apply_plan
from quantizer.schemas import DEFAULT_BATCH_COSINE, Candidate, SampReport, SampResult, SampSettings
from quantizer.search import Plan, UnitMeasurement, back_off, frontier, plan_from, prefer_all_int8, search
from quantizer.timing import (
    TORCH,
    Quietness,
    Timing,
    TimingPolicy,
    clearly_faster,
    combine,
    measure,
    paired_ratio,
)
from quantizer.units import Unit, find_units, quantization_rate
from service.provenance import host_info
from service.repository import OrtFusion
from training.checkpoint import Checkpoint

FORMS = ("dynamic", "static", "blockwise")
"""The INT8 forms ``auto`` measures (quantizer.quantize)."""
FUSIONS: tuple[OrtFusion, ...] = get_args(OrtFusion)
"""onnxruntime fusions timed with and without on the chosen form (SkipLayerNormFusion measured 8% slower
than a separate Add and LayerNormalization on a 2-core AVX-512 VNNI EPYC, docs/design.md)."""


def choose_fusions(timings: dict[str, Timing], quiet: Quietness, policy: TimingPolicy) -> tuple[list[OrtFusion], str]:
    """The fusions to run without and why: ``timings`` holds ``default`` and ``without <fusion>`` for each of
    FUSIONS; a fusion is left out only when the graph measured faster without it round by round
    (``clearly_faster``) on a quiet machine (a busy machine keeps onnxruntime's defaults)."""
    if not quiet.quiet:
        return [], f"onnxruntime's fusions kept: the machine was busy while timing them ({quiet.reason})"
    base = timings["default"]
    disabled = [f for f in FUSIONS if clearly_faster(timings[f"without {f}"], base, policy)]
    described = ", ".join(f"without {f} {timings[f'without {f}'].median_ms:.1f} ms" for f in FUSIONS)
    verdict = ("running without " + ", ".join(disabled)) if disabled else "onnxruntime's fusions kept"
    return disabled, f"all-INT8 with every fusion {base.median_ms:.1f} ms, {described}: {verdict}"


def choose_form(timings: dict[str, Timing], ranked: list[str], policy: TimingPolicy) -> tuple[str, str]:
    """The INT8 form among ``ranked`` (admitted forms, most batch-invariant first) and why: a form
    displaces the current choice only when its all-INT8 graph is faster beyond the timing noise, so a
    tie keeps the more batch-invariant one."""
    best = ranked[0]
    for form in ranked[1:]:
        if clearly_faster(timings[form], timings[best], policy):
            best = form
    if len(ranked) == 1:
        return best, "the only form admitted"
    if best == ranked[0]:
        return best, "no other admitted form is faster beyond the noise; this one depends least on batch-mates"
    return best, "faster beyond the noise"


class Samp:
    """One SAMP run over one checkpoint (holds the exported graph and the reference outputs)."""

    def __init__(self, checkpoint: Checkpoint, records: list[dict], settings: SampSettings,
                 workdir: Path | None = None, progress: Progress | None = None) -> None:
        self.checkpoint = checkpoint
        self.settings = settings
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="samp-"))
        self.progress = progress
        self.info: ExportInfo = export_onnx(checkpoint, self.workdir / "fp32.onnx")
        self.units: list[Unit] = find_units(self.info.path)
        self.data = build_data(checkpoint, records, self.info.input_names, settings)
        fp32 = session_runner(ort_session(self.info.path, settings.threads))
        self.reference = {
            "dev": run_batched(fp32, self.data.dev.feeds),
            "test": run_batched(fp32, self.data.test.feeds),
        }
        self.fp32_metric = {
            "dev": self.data.dev.score(self.reference["dev"], self.reference["dev"]),
            "test": self.data.test.score(self.reference["test"], self.reference["test"]),
        }
        self.is_embedding = self.info.output_name == "embeddings"
        self._built: dict[tuple[str, frozenset[str]], Path] = {}
        self._batch_checks: dict[Path, tuple[float, bool]] = {}
        self._plan_ids = itertools.count()  # file names never reused, though plans are discarded
        self.disabled_optimizers: list[OrtFusion] = []
        """Fusions the plan's sessions run without (chosen by ``_tune_fusions``, written to head.json)."""
        self.calibration_cache.unlink(missing_ok=True)  # ranges of an earlier run in this directory are not ours

    # -- building and measuring plans -------------------------------------------------------

    def build(self, int8: frozenset[str], mode: str) -> Path:
        key = (mode, int8)
        if key not in self._built:
            path = self.workdir / f"plan-{next(self._plan_ids)}.onnx"
            apply_plan(self.info.path, path, self.units, set(int8), mode,  # type: ignore[arg-type]
                       self.data.calibration, self.settings.calibration_method,
                       calibration_cache=self.calibration_cache)
            self._built[key] = path
        return self._built[key]

    @property
    def calibration_cache(self) -> Path:
        """Activation ranges of this run's calibration data, computed by the first static plan and reused."""
        return self.workdir / f"calibration-{self.settings.calibration_method}.json"

    def discard(self, int8: frozenset[str], mode: str) -> None:
        """Delete a plan that is measured once (a unit's sensitivity): kept, one full-size ONNX file per
        unit would fill the disk (49 x 214 MB for a 12-layer model with a 250k-word table)."""
        path = self._built.pop((mode, int8), None)
        if path is not None:
            path.unlink(missing_ok=True)

    def metric(self, path: Path, split: str = "dev") -> tuple[float, float | None]:
        evaluation = self.data.dev if split == "dev" else self.data.test
        outputs = run_batched(session_runner(self.session(path)), evaluation.feeds)
        score = evaluation.score(outputs, self.reference[split])
        cosine = evaluation.cosine_to_reference(outputs, self.reference[split]) if self.is_embedding else None
        return score, cosine

    def session(self, path: Path, disabled: Sequence[str] | None = None) -> InferenceSession:
        """A session as the server will open the published plan (with this run's disabled fusions)."""
        return ort_session(path, self.settings.threads,
                           disabled_optimizers=self.disabled_optimizers if disabled is None else disabled)

    def time_plans(self, paths: dict[str, Path | None], batch: int,
                   disabled: dict[str, Sequence[str]] | None = None) -> tuple[dict[str, Timing], Quietness]:
        """Time graphs (None: PyTorch eager FP32) on one fixed-shape batch, interleaved round by round;
        ``disabled``: fusions a graph runs without, by name (default: this run's)."""
        # Timed at the asked length even when the head truncates shorter: the graph takes any
        # length its position table holds, and benchmarks compare plans at one shape.
        embedding = self.checkpoint.config.embedding
        limit = embedding.max_position - (embedding.position_padding_idx or -1) - 1
        feed = self.data.latency(batch, min(self.settings.sequence_length, limit))
        runners: dict[str, Callable[[], object]] = {}
        for name, path in paths.items():
            run = (torch_runner(self.checkpoint.model, self.info.input_names) if path is None
                   else session_runner(self.session(path, (disabled or {}).get(name))))
            runners[name] = functools.partial(run, feed)
        return measure(runners, self.settings.timing)

    def batch_check(self, path: Path) -> tuple[float, bool]:
        """The lowest cosine between a dev text's output alone and inside a batch of mixed lengths, and
        whether that is batch-invariant (the tolerance met; for classification also the same top-1)."""
        if path in self._batch_checks:  # the all-INT8 graph is checked when choosing the form and as a candidate
            return self._batch_checks[path]
        run = session_runner(self.session(path))
        self._batch_checks[path] = batch_invariance(
            run_batched(run, self.data.alone), run_batched(run, self.data.together), self.checkpoint.head.task,
            self.settings.min_batch_cosine or DEFAULT_BATCH_COSINE)
        return self._batch_checks[path]

    def _choose_form(self, everything: frozenset[str], notes: list[str]) -> tuple[str, float, bool]:
        """The INT8 form (mode) the plan uses, the FP32 -> all-INT8 saving at the largest batch that the
        units share, and whether any form is admitted (batch invariance, unless the user relaxed it)."""
        s = self.settings
        big = max(s.latency_batches)
        modes = list(FORMS) if s.mode == "auto" else [s.mode]
        paths = {m: self.build(everything, m) for m in modes}
        self._step("batch invariance and timing of FP32 and all-INT8 (" + ", ".join(modes) + "), interleaved")
        checks = {m: self.batch_check(paths[m]) for m in modes}
        extremes, quiet = self.time_plans({"fp32": self.info.path, **paths}, big)
        admitted = [m for m in modes if s.min_batch_cosine is None or checks[m][1]]
        described = ", ".join(f"{m} {extremes[m].median_ms:.1f} ms (spread {extremes[m].spread:.0%}, batch cosine "
                              f"{checks[m][0]:.6f})" for m in modes)
        if not quiet.quiet:
            notes.append(f"the FP32 / all-INT8 timings were taken on a busy machine ({quiet.reason}); units are "
                         "still ranked by their share of the saving, but its size is uncertain")
        if s.min_batch_cosine is None:
            notes.append("batch invariance not required (min_batch_cosine unset): forms whose outputs depend on "
                         "batch-mates compete too")
        if not admitted:
            notes.append(f"all-INT8 at batch {big}: {described}; no form keeps an output's cosine alone vs batched "
                         f">= {s.min_batch_cosine}: the FP32 plan is kept")
            return modes[0], 0.0, False
        ranked = sorted(admitted, key=lambda m: -checks[m][0])  # most batch-invariant first
        mode, why = choose_form(extremes, ranked, s.timing)
        notes.append(f"all-INT8 at batch {big}: {described}; using {mode} ({why})")
        self._tune_fusions(paths[mode], big, notes)
        return mode, max(extremes["fp32"].median_ms - extremes[mode].median_ms, 0.0), True

    def _tune_fusions(self, path: Path, batch: int, notes: list[str]) -> None:
        """Time the chosen form's all-INT8 graph with onnxruntime's fusions and without each of FUSIONS,
        interleaved; every later measurement (and the server) runs with the choice."""
        self._step("onnxruntime fusions of the all-INT8 graph, with and without, interleaved")
        variants: dict[str, Path | None] = {"default": path, **{f"without {f}": path for f in FUSIONS}}
        timings, quiet = self.time_plans(variants, batch, {"default": [], **{f"without {f}": [f] for f in FUSIONS}})
        self.disabled_optimizers, why = choose_fusions(timings, quiet, self.settings.timing)
        if self.disabled_optimizers:
            self._batch_checks.clear()  # measured with every fusion: the numbers change a little without
        notes.append(f"fusions at batch {batch}: {why}")

    def within_budget(self, metric: float, cosine: float | None, split: str = "dev") -> bool:
        return keeps_budget(self.fp32_metric[split], metric, cosine, self.settings.max_drop, self.settings.min_cosine)

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> SampResult:
        s = self.settings
        notes: list[str] = []
        everything = frozenset(u.name for u in self.units)
        big = max(s.latency_batches)
        mode, saved, admitted = self._choose_form(everything, notes)
        total_flops = sum(u.flops_per_token for u in self.units) or 1

        measurements: list[UnitMeasurement] = []
        unit_rows: list[dict] = []
        for unit in self.units if admitted else []:
            self._step(f"sensitivity of {unit.name}")
            score, cosine = self.metric(self.build(frozenset({unit.name}), mode))
            self.discard(frozenset({unit.name}), mode)
            gain = saved * unit.flops_per_token / total_flops
            cosine_loss = 1.0 - cosine if cosine is not None else 0.0
            measurements.append(UnitMeasurement(unit.name, self.fp32_metric["dev"] - score, gain, cosine_loss))
            unit_rows.append({"unit": unit.name, "drop": self.fp32_metric["dev"] - score, "gain_ms": gain,
                              "cosine": cosine, "flops_per_token": unit.flops_per_token})
        if not admitted:  # no INT8 form keeps outputs independent of batch-mates: FP32, nothing to search
            measurements = [UnitMeasurement(u.name, float("inf"), 0.0, 0.0) for u in self.units]

        # Per-unit drops are noisy and need not add up: when every unit that buys speed fits the
        # budget measured together, that is the fastest plan and the search is not needed.
        fastest = plan_from(measurements, {m.name for m in measurements if m.gain_ms > 0})
        self._step("verifying every speed-buying unit in INT8")
        if fastest.is_fp32:
            plan = fastest
        elif self.within_budget(*self.metric(self.build(fastest.int8, mode))):
            plan = fastest
            notes.append("every unit that buys speed fits the budget together: no search needed")
        else:
            plan = search(measurements, s.max_drop, None if s.min_cosine is None else 1.0 - s.min_cosine)
        while True:
            self._step(f"verifying a plan with {len(plan.int8)} INT8 units")
            score, cosine = self.metric(self.build(plan.int8, mode))
            if plan.is_fp32 or self.within_budget(score, cosine):
                break
            notes.append(f"plan with {len(plan.int8)} units measured drop {self.fp32_metric['dev'] - score:.4f} "
                         f"> budget; backing off")
            plan = back_off(plan, measurements)

        candidates, torch_ms, timing, timings = self._candidates(plan, measurements, mode)
        plan, candidates = self._prefer_measured_all_int8(plan, candidates, measurements, timings, notes)
        chosen = next(c for c in candidates if c.name == "samp")
        speed = (f"{chosen.speedup_vs_torch:.2f}x PyTorch eager at batch {big}" if chosen.speedup_vs_torch is not None
                 else f"speed ratio not published: the machine was busy while timing ({timing.reason}); re-measure "
                      "on a quiet machine with sampserve quantize --retune")
        if not admitted:
            verdict = (f"No INT8 form keeps an output's cosine alone vs inside a batch >= {s.min_batch_cosine}: the "
                       f"FP32 plan is chosen ({speed}). Relax min_batch_cosine to admit batch-dependent forms.")
        elif plan.is_fp32:
            verdict = f"No INT8 unit fits a max drop of {s.max_drop}: the FP32 plan is chosen ({speed})."
        else:
            verdict = (f"{len(plan.int8)} of {len(self.units)} units in INT8 ({mode}), quantization rate "
                       f"{chosen.quantization_rate:.0%}: {self._metric_name()} drop "
                       f"{self.fp32_metric['dev'] - chosen.dev_metric:.4f} on dev, "
                       f"{self.fp32_metric['test'] - (chosen.test_metric or 0):.4f} on test; {speed}.")
        verdict += (f" Batch-invariant: {'yes' if chosen.batch_invariant else 'NO'} (lowest cosine of an output alone "
                    f"vs inside a batch {chosen.batch_cosine:.6f}" + ("" if s.min_batch_cosine is not None else
                                                                       "; not required by the settings") + ").")
        report = SampReport(
            task=self.checkpoint.head.task, metric=self._metric_name(),
            budget={"max_drop": s.max_drop, "min_cosine": s.min_cosine, "min_batch_cosine": s.min_batch_cosine},
            units=unit_rows,
            torch_eager_ms=torch_ms, candidates=candidates, chosen="samp", verdict=verdict,
            export_max_abs_diff=self.info.max_abs_diff, mode=mode, notes=notes, timing=timing,
            provenance=host_info(s.threads), disabled_optimizers=list(self.disabled_optimizers),
        )
        return SampResult(report=report, model_path=self.build(plan.int8, mode), workdir=self.workdir)

    def _prefer_measured_all_int8(self, plan: Plan, candidates: list[Candidate], measurements: list[UnitMeasurement],
                                  timings: dict[str, Timing], notes: list[str]) -> tuple[Plan, list[Candidate]]:
        searched = next(c for c in candidates if c.name == "samp")
        full = next(c for c in candidates if c.name == "all-int8")
        fits = self.within_budget(full.dev_metric, full.dev_cosine) and (
            self.settings.min_batch_cosine is None or bool(full.batch_invariant))
        same = set(full.int8) == set(searched.int8)
        faster = clearly_faster(timings["all-int8"], timings["samp"], self.settings.timing)
        if not prefer_all_int8(faster, fits, same):
            return plan, candidates
        batch = max(self.settings.latency_batches)
        notes.append(f"all-INT8 also keeps the budget on dev and measured faster beyond the noise at batch {batch} "
                     f"({full.latency_ms[batch]:.1f} vs {searched.latency_ms[batch]:.1f} ms): chosen")
        chosen = full.model_copy(update={"name": "samp"})
        return plan_from(measurements, set(full.int8)), [chosen if c.name == "samp" else c for c in candidates]

    def _candidates(self, plan: Plan, measurements: list[UnitMeasurement], mode: str,
                    ) -> tuple[list[Candidate], dict[int, float], Quietness, dict[str, Timing]]:
        """Every candidate measured on dev (and test for the three named ones), then all of them and PyTorch
        eager timed together at each batch size. Returns the candidates, PyTorch eager's medians, the
        quietness of the timings (the worst over batch sizes) and the largest batch's timings."""
        s = self.settings
        everything = frozenset(u.name for u in self.units)
        named: list[tuple[str, Plan]] = [("fp32", plan_from(measurements, set())),
                                         ("all-int8", plan_from(measurements, everything)),
                                         ("samp", plan)]
        line = frontier(measurements)[1:-1]
        step = max(1, len(line) // max(1, s.max_candidates - 3))
        named += [(f"frontier-{len(p.int8)}", p) for p in line[::step] if p.int8 != plan.int8]
        big = max(s.latency_batches)
        paths = {name: self.info.path if c.is_fp32 else self.build(c.int8, mode) for name, c in named}
        scores = {}
        for name, _ in named:
            self._step(f"measuring candidate {name}")
            dev, cosine = self.metric(paths[name])
            test = self.metric(paths[name], "test")[0] if name in ("fp32", "all-int8", "samp") else None
            scores[name] = (dev, cosine, test, *self.batch_check(paths[name]))
        timings: dict[int, dict[str, Timing]] = {}
        quiet: list[Quietness] = []
        for batch in s.latency_batches:
            self._step(f"timing {len(paths)} candidates and PyTorch eager at batch {batch}, interleaved")
            timings[batch], condition = self.time_plans({TORCH: None, **paths}, batch)
            quiet.append(condition)
        overall = combine(quiet, list(s.latency_batches))
        out = []
        for name, candidate in named:
            dev, cosine, test, batch_cosine, invariant = scores[name]
            medians = {b: timings[b][name].median_ms for b in s.latency_batches}
            out.append(Candidate(
                name=name, mode="fp32" if candidate.is_fp32 else mode, int8=sorted(candidate.int8),
                quantization_rate=quantization_rate(self.units, set(candidate.int8)), dev_metric=dev,
                test_metric=test, dev_cosine=cosine, latency_ms=medians, batch_cosine=batch_cosine,
                batch_invariant=invariant,
                latency_spread={b: timings[b][name].spread for b in s.latency_batches},
                speedup_vs_torch=paired_ratio(timings[big][TORCH], timings[big][name]) if overall.quiet else None,
                size_bytes=paths[name].stat().st_size,
            ))
        torch_ms = {b: timings[b][TORCH].median_ms for b in s.latency_batches}
        return out, torch_ms, overall, timings[big]

    def _metric_name(self) -> str:
        return metric_name(self.checkpoint.head.task, self.settings.matching_metric)

    def _step(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[dim]·[/] {text}")

