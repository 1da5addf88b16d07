"""SAMP for the PyTorch (GPU) plan: the same steps and decision as the ONNX plan's (quantizer.samp), with the
GPU's unit forms and baselines.

1. The body dtype: every dtype asked for (FP16, BF16) measured all-float on dev; those within the budget
   are timed interleaved with PyTorch eager FP32 and FP16, and the fastest beyond the noise is kept (a
   tie keeps the first listed). None fits: the body stays FP32.
2. All-INT8 over that body: its batch invariance (an output alone vs inside a batch of mixed lengths) and
   its timing against the all-float body give the saving the units share by their matrix FLOPs.
3. Each unit alone in INT8: its drop on dev. Then the search (quantizer.search), verification of the
   chosen plan end to end with back-off, and the candidates (all-float, all-INT8, the plan, frontier
   points) measured on dev, test and batch invariance and timed against PyTorch eager FP32 and FP16 at
   every batch size, interleaved round by round.

Plans run through service.runtimes.pytorch.PlannedRunner, the server's own runner (with CUDA graphs on a
GPU), so the timings are what the server runs. Every number is measured in the run on the device named in
the report; on a CPU the whole procedure runs too (that is how it is tested here), but its speed figures
say nothing about a GPU.
"""

from __future__ import annotations

import copy
import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import Progress

from quantizer.data import SampData, build_data
from quantizer.export import input_names_for
from quantizer.measure import batch_invariance, keeps_budget, metric_name, run_batched
from quantizer.schemas import DEFAULT_BATCH_COSINE, MeasuredPlan, SampSettings
from quantizer.search import Plan, UnitMeasurement, back_off, frontier, plan_from, prefer_all_int8, search
from quantizer.timing import Quietness, Timing, TimingPolicy, clearly_faster, combine, measure, paired_ratio
from service.provenance import host_info
from service.repository import TorchDevice, TorchDtype, TorchForm, TorchPlan
from service.runtimes.pytorch import PlannedRunner
from service.runtimes.torch_plan import DTYPES, apply_plan, int8_units, unit_flops, unit_linears
from training.checkpoint import Checkpoint

EAGER_FP32 = "PyTorch eager FP32"
EAGER_FP16 = "PyTorch eager FP16"


class TorchSampSettings(BaseModel):
    """What the user asks of SAMP on a GPU; validated before any work starts."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["cuda", "cpu"] = Field("cuda", description="Where plans are measured (cpu: a check of "
                                           "the procedure; its speed figures say nothing about a GPU).")
    dtypes: list[TorchDtype] = Field(["float16", "bfloat16"], min_length=1, description=(
        "Body dtypes tried, in order of preference (a timing tie keeps the earlier one)."))
    max_drop: float = Field(0.01, ge=0, description="Largest allowed drop of the task metric (0.01 = 1 point).")
    min_cosine: float | None = Field(None, gt=0, le=1, description="Embeddings: lowest mean cosine to FP32.")
    min_batch_cosine: float | None = Field(DEFAULT_BATCH_COSINE, gt=0, le=1, description=(
        "Lowest cosine of an output alone vs inside a batch (None: not required)."))
    sequence_length: int = Field(128, ge=8)
    latency_batches: tuple[int, ...] = (1, 8, 32)
    cuda_graphs: bool = Field(True, description="Time plans as the server runs them: one CUDA graph per shape.")
    timing: TimingPolicy = Field(default_factory=TimingPolicy)
    max_candidates: int = Field(6, ge=3)
    max_examples: int = Field(256, ge=8)
    matching_metric: Literal["spearman_vs_fp32", "retrieval"] = "spearman_vs_fp32"

    def data_settings(self) -> SampSettings:
        """The settings the shared data preparation (quantizer.data) reads."""
        return SampSettings(sequence_length=self.sequence_length, max_examples=self.max_examples,
                            matching_metric=self.matching_metric, latency_batches=self.latency_batches)


class TorchCandidate(MeasuredPlan):
    dtype: TorchDtype
    batch_cosine: float
    batch_invariant: bool
    latency_ms: dict[int, float]
    speedup_vs_eager_fp32: float | None
    """PyTorch eager FP32's median over this candidate's, round by round, at the largest batch (None: busy)."""
    speedup_vs_eager_fp16: float | None


class TorchSampReport(BaseModel):
    """``torch/samp_report.json``: what SAMP measured on the device to choose the PyTorch plan."""

    task: str
    metric: str
    budget: dict[str, float | None]
    device: TorchDevice
    sequence_length: int
    units: list[dict]
    eager_ms: dict[str, dict[int, float]]
    """PyTorch eager FP32 and FP16 medians per batch size, timed with the candidates."""
    candidates: list[TorchCandidate]
    chosen: str
    verdict: str
    notes: list[str]
    timing: Quietness
    plan: TorchPlan


@dataclass
class TorchSampResult:
    report: TorchSampReport
    plan: TorchPlan
    workdir: Path


def device_facts(device: torch.device) -> TorchDevice:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return TorchDevice(name=torch.cuda.get_device_name(device), capability=f"{major}.{minor}",
                           torch=torch.__version__, cuda=torch.version.cuda)
    return TorchDevice(name=host_info().cpu, torch=torch.__version__)


class TorchSamp:
    """One SAMP run of the PyTorch plan over one checkpoint."""

    def __init__(self, checkpoint: Checkpoint, records: list[dict], settings: TorchSampSettings,
                 workdir: Path | None = None, progress: Progress | None = None) -> None:
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("SAMP on GPU needs a CUDA device; torch sees none (use --device cpu to check the "
                               "procedure on the CPU)")
        self.checkpoint = checkpoint
        self.settings = settings
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="samp-torch-"))
        self.progress = progress
        self.device = torch.device("cuda", torch.cuda.current_device()) if settings.device == "cuda" \
            else torch.device("cpu")
        self.input_names = list(input_names_for(checkpoint))
        self.data: SampData = build_data(checkpoint, records, tuple(self.input_names), settings.data_settings())
        self.fp32 = copy.deepcopy(checkpoint.model).float().eval().to(self.device)
        self.units = int8_units(self.fp32)
        self.not_int8 = [u for u in unit_linears(self.fp32) if u not in self.units]
        """Units whose matrices an int8 GEMM cannot take (a dimension not a multiple of 8): kept in the body."""
        flops = unit_flops(self.fp32)
        self.flops = {u: flops[u] for u in self.units}
        reference = self.runner(self.fp32, torch.float32)
        self.reference = {"dev": run_batched(reference.run, self.data.dev.feeds),
                          "test": run_batched(reference.run, self.data.test.feeds)}
        self.fp32_metric = {s: self._score(self.reference[s], s)[0] for s in ("dev", "test")}
        self._models: dict[tuple[str, frozenset[str]], torch.nn.Module] = {}
        self._fp16: torch.nn.Module | None = None
        self._batch_checks: dict[tuple[str, frozenset[str]], tuple[float, bool]] = {}

    # -- plans ----------------------------------------------------------------------------------

    def model(self, dtype: str, int8: frozenset[str]) -> torch.nn.Module:
        key = (dtype, int8)
        if key not in self._models:
            forms: dict[str, TorchForm] = {u: "int8" for u in int8}
            self._models[key] = apply_plan(copy.deepcopy(self.fp32), dtype, forms)  # type: ignore[arg-type]
        return self._models[key]

    def drop_model(self, dtype: str, int8: frozenset[str]) -> None:
        self._models.pop((dtype, int8), None)

    def runner(self, model: torch.nn.Module, dtype: torch.dtype, shape: tuple[int, int] | None = None
               ) -> PlannedRunner:
        """Eager at each feed's shape; with ``shape`` (batch, length), as the server runs it (one CUDA graph)."""
        graphs = shape is not None and self.settings.cuda_graphs
        rows, length = shape or (1, 1)
        return PlannedRunner(model, self.input_names, self.checkpoint.config.pad_token_id, dtype,  # type: ignore[arg-type]
                             [rows], [length], graphs)

    def _score(self, outputs: np.ndarray, split: str) -> tuple[float, float | None]:
        evaluation = self.data.dev if split == "dev" else self.data.test
        reference = self.reference[split]
        cosine = evaluation.cosine_to_reference(outputs, reference) if self.checkpoint.head.task == "matching" \
            else None
        return evaluation.score(outputs, reference), cosine

    def metric(self, dtype: str, int8: frozenset[str], split: str = "dev") -> tuple[float, float | None]:
        evaluation = self.data.dev if split == "dev" else self.data.test
        run = self.runner(self.model(dtype, int8), DTYPES[dtype]).run
        return self._score(run_batched(run, evaluation.feeds), split)

    def within_budget(self, metric: float, cosine: float | None, split: str = "dev") -> bool:
        return keeps_budget(self.fp32_metric[split], metric, cosine, self.settings.max_drop, self.settings.min_cosine)

    def batch_check(self, dtype: str, int8: frozenset[str]) -> tuple[float, bool]:
        """Checked once per plan: all-INT8 is checked before the search and again as a candidate."""
        if (dtype, int8) not in self._batch_checks:
            self._batch_checks[(dtype, int8)] = self._batch_check(dtype, int8)
        return self._batch_checks[(dtype, int8)]

    def _batch_check(self, dtype: str, int8: frozenset[str]) -> tuple[float, bool]:
        run = self.runner(self.model(dtype, int8), DTYPES[dtype]).run
        return batch_invariance(run_batched(run, self.data.alone), run_batched(run, self.data.together),
                                self.checkpoint.head.task, self.settings.min_batch_cosine or DEFAULT_BATCH_COSINE)

    def time_plans(self, plans: dict[str, tuple[str, frozenset[str]]], batch: int
                   ) -> tuple[dict[str, Timing], Quietness]:
        """PyTorch eager FP32 (the reference) and FP16, and ``plans`` (name -> dtype, INT8 units) as the server
        runs them, on one fixed-shape batch, interleaved round by round."""
        embedding = self.checkpoint.config.embedding
        limit = embedding.max_position - (embedding.position_padding_idx or -1) - 1
        length = min(self.settings.sequence_length, limit)
        feed = self.data.latency(batch, length)
        shape = (batch, feed[self.input_names[0]].shape[1] if feed[self.input_names[0]].ndim == 2 else 1)
        if self._fp16 is None:
            self._fp16 = copy.deepcopy(self.fp32).half().eval()
        fp16 = self._fp16
        runners: dict[str, Callable[[], object]] = {
            EAGER_FP32: functools.partial(self.runner(self.fp32, torch.float32).run, feed),
            EAGER_FP16: functools.partial(self.runner(fp16, torch.float16).run, feed),
        }
        for name, (dtype, int8) in plans.items():
            runners[name] = functools.partial(self.runner(self.model(dtype, int8), DTYPES[dtype], shape).run, feed)
        return measure(runners, self.settings.timing)

    # -- the run --------------------------------------------------------------------------------

    def choose_dtype(self, notes: list[str]) -> str:
        s = self.settings
        big = max(s.latency_batches)
        fits = {}
        for dtype in s.dtypes:
            self._step(f"all-{dtype} on dev")
            metric, cosine = self.metric(dtype, frozenset())
            fits[dtype] = self.within_budget(metric, cosine)
            notes.append(f"all-{dtype}: {self._metric_name()} {metric:.4f} on dev (FP32 {self.fp32_metric['dev']:.4f})"
                         + ("" if fits[dtype] else ": over the budget"))
        admitted = [d for d in s.dtypes if fits[d]]
        if not admitted:
            notes.append("no body dtype keeps the budget: the body stays float32")
            return "float32"
        if len(admitted) == 1:
            return admitted[0]
        self._step(f"timing all-float bodies ({', '.join(admitted)}) at batch {big}")
        timings, _ = self.time_plans({d: (d, frozenset()) for d in admitted}, big)
        best = admitted[0]
        for dtype in admitted[1:]:
            if clearly_faster(timings[dtype], timings[best], s.timing):
                best = dtype
        notes.append(f"body dtype at batch {big}: " + ", ".join(f"{d} {timings[d].median_ms:.2f} ms" for d in admitted)
                     + f"; using {best}")
        return best

    def run(self) -> TorchSampResult:
        s = self.settings
        notes: list[str] = []
        if self.not_int8:
            notes.append(f"kept in the body dtype: {', '.join(self.not_int8)} (an int8 GEMM needs matrix dimensions "
                         "that are multiples of 8)")
        big = max(s.latency_batches)
        dtype = self.choose_dtype(notes)
        everything = frozenset(self.units)
        self._step("batch invariance and timing of all-float and all-INT8")
        all_int8_check = self.batch_check(dtype, everything)
        extremes, quiet = self.time_plans({"float": (dtype, frozenset()), "int8": (dtype, everything)}, big)
        admitted = s.min_batch_cosine is None or all_int8_check[1]
        saved = max(extremes["float"].median_ms - extremes["int8"].median_ms, 0.0) if admitted else 0.0
        notes.append(f"all-{dtype} {extremes['float'].median_ms:.2f} ms, all-INT8 {extremes['int8'].median_ms:.2f} ms "
                     f"at batch {big} (all-INT8 batch cosine {all_int8_check[0]:.6f})")
        if not quiet.quiet:
            notes.append(f"the extremes were timed on a busy machine ({quiet.reason}): the units' shares are uncertain")
        total = sum(self.flops.values()) or 1
        measurements: list[UnitMeasurement] = []
        rows: list[dict] = []
        for unit in self.units if admitted else []:
            self._step(f"sensitivity of {unit}")
            score, cosine = self.metric(dtype, frozenset({unit}))
            self.drop_model(dtype, frozenset({unit}))
            gain = saved * self.flops[unit] / total
            measurements.append(UnitMeasurement(unit, self.fp32_metric["dev"] - score, gain,
                                                1.0 - cosine if cosine is not None else 0.0))
            rows.append({"unit": unit, "drop": self.fp32_metric["dev"] - score, "gain_ms": gain, "cosine": cosine,
                         "flops_per_token": self.flops[unit]})
        if not admitted:
            notes.append(f"all-INT8 batch cosine {all_int8_check[0]:.6f} < {s.min_batch_cosine}: no INT8 unit")
            measurements = [UnitMeasurement(u, float("inf"), 0.0) for u in self.units]

        fastest = plan_from(measurements, {m.name for m in measurements if m.gain_ms > 0})
        if fastest.is_fp32:
            plan = fastest
        elif self.within_budget(*self.metric(dtype, fastest.int8)):
            plan = fastest
            notes.append("every unit that buys speed fits the budget together: no search needed")
        else:
            plan = search(measurements, s.max_drop, None if s.min_cosine is None else 1.0 - s.min_cosine)
        while not plan.is_fp32:
            self._step(f"verifying a plan with {len(plan.int8)} INT8 units")
            score, cosine = self.metric(dtype, plan.int8)
            if self.within_budget(score, cosine):
                break
            notes.append(f"plan with {len(plan.int8)} units measured drop {self.fp32_metric['dev'] - score:.4f} > "
                         "budget; backing off")
            plan = back_off(plan, measurements)

        candidates, eager, timing, timings = self._candidates(dtype, plan, measurements)
        searched = next(c for c in candidates if c.name == "samp")
        full = next(c for c in candidates if c.name == "all-int8")
        fits = self.within_budget(full.dev_metric, full.dev_cosine) and (s.min_batch_cosine is None
                                                                          or full.batch_invariant)
        if prefer_all_int8(clearly_faster(timings["all-int8"], timings["samp"], s.timing), fits,
                           set(full.int8) == set(searched.int8)):
            notes.append(f"all-INT8 keeps the budget on dev and measured faster beyond the noise at batch {big}: "
                         "chosen")
            candidates = [full.model_copy(update={"name": "samp"}) if c.name == "samp" else c for c in candidates]
            plan = plan_from(measurements, set(full.int8))
        chosen = next(c for c in candidates if c.name == "samp")
        result_plan = TorchPlan(compute_dtype=dtype,
                                forms={u: "int8" for u in sorted(plan.int8)}, measured_on=device_facts(self.device))
        speed = (f"{chosen.speedup_vs_eager_fp16:.2f}x PyTorch eager FP16 and {chosen.speedup_vs_eager_fp32:.2f}x "
                 f"eager FP32 at batch {big}" if chosen.speedup_vs_eager_fp16 is not None
                 and chosen.speedup_vs_eager_fp32 is not None
                 else f"speed ratios not published: the timings were not steady ({timing.reason})")
        verdict = (f"{dtype} body, {len(plan.int8)} of {len(self.units)} units in INT8 (W8A8, per-row activation "
                   f"scales): {self._metric_name()} drop {self.fp32_metric['dev'] - chosen.dev_metric:.4f} on dev, "
                   f"{self.fp32_metric['test'] - (chosen.test_metric or 0):.4f} on test; {speed}. Batch-invariant: "
                   f"{'yes' if chosen.batch_invariant else 'NO'} (lowest cosine alone vs batched "
                   f"{chosen.batch_cosine:.6f}).")
        report = TorchSampReport(
            task=self.checkpoint.head.task, metric=self._metric_name(),
            budget={"max_drop": s.max_drop, "min_cosine": s.min_cosine, "min_batch_cosine": s.min_batch_cosine},
            device=device_facts(self.device), sequence_length=s.sequence_length, units=rows, eager_ms=eager,
            candidates=candidates, chosen="samp", verdict=verdict, notes=notes, timing=timing, plan=result_plan)
        return TorchSampResult(report=report, plan=result_plan, workdir=self.workdir)

    def _candidates(self, dtype: str, plan: Plan, measurements: list[UnitMeasurement]
                    ) -> tuple[list[TorchCandidate], dict[str, dict[int, float]], Quietness, dict[str, Timing]]:
        s = self.settings
        everything = frozenset(self.units)
        named: list[tuple[str, frozenset[str]]] = [("float", frozenset()), ("all-int8", everything),
                                                   ("samp", plan.int8)]
        line = frontier(measurements)[1:-1]
        step = max(1, len(line) // max(1, s.max_candidates - 3))
        named += [(f"frontier-{len(p.int8)}", p.int8) for p in line[::step] if p.int8 != plan.int8]
        total = sum(self.flops.values()) or 1
        scores = {}
        for name, int8 in named:
            self._step(f"measuring candidate {name}")
            dev, cosine = self.metric(dtype, int8)
            test = self.metric(dtype, int8, "test")[0] if name in ("float", "all-int8", "samp") else None
            scores[name] = (dev, cosine, test, *self.batch_check(dtype, int8))
        timings: dict[int, dict[str, Timing]] = {}
        quiet: list[Quietness] = []
        for batch in s.latency_batches:
            self._step(f"timing {len(named)} candidates and PyTorch eager FP32/FP16 at batch {batch}, interleaved")
            timings[batch], condition = self.time_plans({n: (dtype, i) for n, i in named}, batch)
            quiet.append(condition)
        overall = combine(quiet, list(s.latency_batches))
        big = max(s.latency_batches)
        out = []
        for name, int8 in named:
            dev, cosine, test, batch_cosine, invariant = scores[name]
            out.append(TorchCandidate(
                name=name, dtype=dtype, int8=sorted(int8),
                quantization_rate=sum(self.flops[u] for u in int8) / total, dev_metric=dev, test_metric=test,
                dev_cosine=cosine, batch_cosine=batch_cosine, batch_invariant=invariant,
                latency_ms={b: timings[b][name].median_ms for b in s.latency_batches},
                speedup_vs_eager_fp32=paired_ratio(timings[big][EAGER_FP32], timings[big][name]) if overall.quiet
                else None,
                speedup_vs_eager_fp16=paired_ratio(timings[big][EAGER_FP16], timings[big][name]) if overall.quiet
                else None))
        eager = {label: {b: timings[b][label].median_ms for b in s.latency_batches}
                 for label in (EAGER_FP32, EAGER_FP16)}
        return out, eager, overall, timings[big]

    def _metric_name(self) -> str:
        return metric_name(self.checkpoint.head.task, self.settings.matching_metric)

    def _step(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[dim]·[/] {text}")
