"""SAMP end to end: export, measure extremes, measure each unit, search, verify, report.

The steps are fixed (as in onnxruntime's calibrate.py: augment / collect / compute); the decision
is ``quantizer.search.search``, a pure function. Every number in the report is measured in this
run except each unit's latency gain, which is the measured FP32 -> all-INT8 saving apportioned by
the unit's share of matrix FLOPs (one unit alone moves latency less than run-to-run noise).
"""

from __future__ import annotations

import itertools
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import Progress

from quantizer.engines import ort_session
from quantizer.export import ExportInfo, export_onnx
from quantizer.measure import (
    Feed,
    TaskEval,
    fixed_shape_feed,
    median_ms,
    run_batched,
    session_runner,
    tokenize,
    torch_runner,
)
from quantizer.quantize import apply_plan
from quantizer.search import Plan, UnitMeasurement, back_off, frontier, plan_from, prefer_all_int8, search
from quantizer.units import Unit, find_units, quantization_rate
from training.checkpoint import Checkpoint


class SampSettings(BaseModel):
    """What the user asks of SAMP; validated before any work starts."""

    model_config = ConfigDict(extra="forbid")

    max_drop: float = Field(0.01, ge=0, description="Largest allowed drop of the task metric (0.01 = 1 point).")
    min_cosine: float | None = Field(None, gt=0, le=1, description="Embeddings: lowest mean cosine to FP32.")
    mode: Literal["auto", "dynamic", "static"] = Field(
        "auto", description="INT8 form; auto measures both all-INT8 forms and keeps the faster.")
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    calibration_batches: int = Field(8, ge=1)
    sequence_length: int = Field(128, ge=8, description="Sequence length of the latency measurements.")
    latency_batches: tuple[int, ...] = (1, 8, 32)
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads (default: all cores).")
    repeats: int = Field(5, ge=1)
    max_candidates: int = Field(6, ge=2, description="Frontier plans measured for the report's plot.")
    max_examples: int = Field(256, ge=8, description="Records in each of calibration, dev and test.")
    matching_metric: Literal["spearman_vs_fp32", "retrieval"] = Field(
        "spearman_vs_fp32", description="Matching: Spearman of the pairs' cosines against FP32's, or translation "
        "retrieval accuracy@1 (text_a <-> text_b among the split's pairs, both directions; needs text_b).")


class Candidate(BaseModel):
    name: str
    mode: str
    int8: list[str]
    quantization_rate: float
    dev_metric: float
    test_metric: float | None = None
    dev_cosine: float | None = None
    latency_ms: dict[int, float]
    speedup_vs_torch: float
    size_bytes: int
    perplexity_increase: dict[str, float] | None = None
    """Generators: relative perplexity change against FP32 on dev and test."""
    batch_invariant: bool | None = None
    """Generators: greedy tokens of a prompt alone equal its tokens inside a mixed batch."""


class SampReport(BaseModel):
    task: str
    metric: str
    budget: dict[str, float | None]
    units: list[dict]
    torch_eager_ms: dict[int, float]
    candidates: list[Candidate]
    chosen: str
    verdict: str
    export_max_abs_diff: float
    mode: str
    notes: list[str]
    kept_fp32: list[str] | None = None
    """Units the chosen plan keeps in FP32."""


@dataclass
class SampData:
    """Texts for calibration, dev (plan choice) and test (never seen by the search)."""

    dev: TaskEval
    test: TaskEval
    calibration: list[Feed]
    latency_texts: list[str]


def build_data(checkpoint: Checkpoint, records: list[dict], input_names: tuple[str, ...], settings: SampSettings,
               seed: int = 0, batch: int = 32) -> SampData:
    """Split ``records`` into disjoint calibration, dev and test parts and tokenize them.

    Matching uses pairs (``text_a``/``text_b``, or random pairs of ``text``); classification uses
    ``text`` (+ ``text_pair``) with ``label``."""
    rows = list(records)
    random.Random(seed).shuffle(rows)
    head = checkpoint.head
    max_length = min(head.max_length, settings.sequence_length)
    pad = checkpoint.config.pad_token_id
    third = min(len(rows) // 3, settings.max_examples)
    if third < 8:
        raise ValueError(f"SAMP needs at least 24 records to split into calibration/dev/test, got {len(rows)}")
    calib_rows, dev_rows, test_rows = rows[:third], rows[third : 2 * third], rows[2 * third : 3 * third]

    prefix = head.text_prefix  # e5-style models expect "query: " before every text

    def texts(part: list[dict]) -> list[str]:
        return [prefix + (r.get("text") or r.get("text_a") or "") for r in part]

    def task_eval(part: list[dict], name: str) -> TaskEval:
        if head.task == "classification":
            labels = np.array([head.labels.index(str(r["label"])) for r in part])  # type: ignore[union-attr]
            pairs = [r["text_pair"] for r in part] if "text_pair" in part[0] else None
            feeds = [tokenize(checkpoint.tokenizer, texts(part[i:i + batch]), max_length, pad, input_names,
                              pairs[i:i + batch] if pairs else None) for i in range(0, len(part), batch)]
            return TaskEval(name=name, feeds=feeds, labels=labels)
        retrieval = settings.matching_metric == "retrieval"
        if retrieval and "text_b" not in part[0]:
            raise ValueError("the retrieval metric needs pairs: records with text_a and text_b")
        if "text_b" in part[0]:
            side_a, side_b = texts(part), [prefix + r["text_b"] for r in part]
        else:
            pool = texts(part)
            rng = random.Random(f"{seed}/{name}")
            side_a, side_b = pool, [pool[rng.randrange(len(pool))] for _ in pool]
        feeds = [tokenize(checkpoint.tokenizer, side_a[i:i + batch], max_length, pad, input_names)
                 for i in range(0, len(side_a), batch)]
        feeds += [tokenize(checkpoint.tokenizer, side_b[i:i + batch], max_length, pad, input_names)
                  for i in range(0, len(side_b), batch)]
        return TaskEval(name=name, feeds=feeds, pair_split=len(side_a), retrieval=retrieval)

    calib_texts = texts(calib_rows)
    per_batch = max(1, len(calib_texts) // settings.calibration_batches)
    calibration = [
        fixed_shape_feed(checkpoint.tokenizer, calib_texts[i * per_batch:(i + 1) * per_batch], per_batch,
                         max_length, pad, input_names)
        for i in range(settings.calibration_batches)
    ]
    return SampData(dev=task_eval(dev_rows, "dev"), test=task_eval(test_rows, "test"),
                    calibration=calibration, latency_texts=calib_texts)


@dataclass
class SampResult:
    report: SampReport
    model_path: Path  # the chosen plan's ONNX file
    workdir: Path


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
        self._plan_ids = itertools.count()  # file names never reused, though plans are discarded

    # -- building and measuring plans -------------------------------------------------------

    def build(self, int8: frozenset[str], mode: str) -> Path:
        key = (mode, int8)
        if key not in self._built:
            path = self.workdir / f"plan-{next(self._plan_ids)}.onnx"
            apply_plan(self.info.path, path, self.units, set(int8), mode,  # type: ignore[arg-type]
                       self.data.calibration, self.settings.calibration_method)
            self._built[key] = path
        return self._built[key]

    def discard(self, int8: frozenset[str], mode: str) -> None:
        """Delete a plan that is measured once (a unit's sensitivity): kept, one full-size ONNX file per
        unit would fill the disk (49 x 214 MB for a 12-layer model with a 250k-word table)."""
        path = self._built.pop((mode, int8), None)
        if path is not None:
            path.unlink(missing_ok=True)

    def metric(self, path: Path, split: str = "dev") -> tuple[float, float | None]:
        evaluation = self.data.dev if split == "dev" else self.data.test
        outputs = run_batched(session_runner(ort_session(path, self.settings.threads)), evaluation.feeds)
        score = evaluation.score(outputs, self.reference[split])
        cosine = evaluation.cosine_to_reference(outputs, self.reference[split]) if self.is_embedding else None
        return score, cosine

    def latency(self, run: Callable[[Feed], np.ndarray], batches: tuple[int, ...]) -> dict[int, float]:
        pad = self.checkpoint.config.pad_token_id
        # Timed at the asked length even when the head truncates shorter: the graph takes any
        # length its position table holds, and benchmarks compare plans at one shape.
        embedding = self.checkpoint.config.embedding
        limit = embedding.max_position - (embedding.position_padding_idx or -1) - 1
        length = min(self.settings.sequence_length, limit)
        return {
            b: median_ms(run, fixed_shape_feed(self.checkpoint.tokenizer, self.data.latency_texts, b, length, pad,
                                               self.info.input_names), self.settings.repeats)
            for b in batches
        }

    def ort_latency(self, path: Path, batches: tuple[int, ...]) -> dict[int, float]:
        return self.latency(session_runner(ort_session(path, self.settings.threads)), batches)

    def within_budget(self, metric: float, cosine: float | None, split: str = "dev") -> bool:
        ok = self.fp32_metric[split] - metric <= self.settings.max_drop + 1e-12
        if self.settings.min_cosine is not None and cosine is not None:
            ok = ok and cosine >= self.settings.min_cosine
        return ok

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> SampResult:
        s = self.settings
        notes: list[str] = []
        everything = frozenset(u.name for u in self.units)
        big = (max(s.latency_batches),)
        self._step("timing PyTorch eager FP32")
        torch_ms = self.latency(torch_runner(self.checkpoint.model, self.info.input_names), s.latency_batches)

        modes = ["dynamic", "static"] if s.mode == "auto" else [s.mode]
        all_int8 = {}
        for mode in modes:
            self._step(f"all-INT8 ({mode})")
            all_int8[mode] = self.ort_latency(self.build(everything, mode), big)[big[0]]
        mode = min(all_int8, key=all_int8.get)  # type: ignore[arg-type]
        if s.mode == "auto":
            timings = ", ".join(f"{m} {v:.1f} ms" for m, v in all_int8.items())
            notes.append(f"all-INT8 at batch {big[0]}: {timings}; using {mode}")
        fp32_ms = self.ort_latency(self.info.path, big)[big[0]]
        saved = max(fp32_ms - all_int8[mode], 0.0)
        total_flops = sum(u.flops_per_token for u in self.units) or 1

        measurements: list[UnitMeasurement] = []
        unit_rows: list[dict] = []
        for unit in self.units:
            self._step(f"sensitivity of {unit.name}")
            score, cosine = self.metric(self.build(frozenset({unit.name}), mode))
            self.discard(frozenset({unit.name}), mode)
            gain = saved * unit.flops_per_token / total_flops
            cosine_loss = 1.0 - cosine if cosine is not None else 0.0
            measurements.append(UnitMeasurement(unit.name, self.fp32_metric["dev"] - score, gain, cosine_loss))
            unit_rows.append({"unit": unit.name, "drop": self.fp32_metric["dev"] - score, "gain_ms": gain,
                              "cosine": cosine, "flops_per_token": unit.flops_per_token})

        # Per-unit drops are noisy and need not add up: when every unit that buys speed fits the
        # budget measured together, that is the fastest plan and the search is not needed.
        fastest = plan_from(measurements, {m.name for m in measurements if m.gain_ms > 0})
        self._step("verifying every speed-buying unit in INT8")
        if self.within_budget(*self.metric(self.build(fastest.int8, mode))):
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

        candidates = self._candidates(plan, measurements, mode, torch_ms)
        plan, candidates = self._prefer_measured_all_int8(plan, candidates, measurements, big[0], notes)
        chosen = next(c for c in candidates if c.name == "samp")
        if plan.is_fp32:
            verdict = (f"No INT8 unit fits a max drop of {s.max_drop}: the FP32 plan is chosen "
                       f"({chosen.speedup_vs_torch:.2f}x PyTorch eager at batch {big[0]}).")
        else:
            verdict = (f"{len(plan.int8)} of {len(self.units)} units in INT8 ({mode}), quantization rate "
                       f"{chosen.quantization_rate:.0%}: {self._metric_name()} drop "
                       f"{self.fp32_metric['dev'] - chosen.dev_metric:.4f} on dev, "
                       f"{self.fp32_metric['test'] - (chosen.test_metric or 0):.4f} on test; "
                       f"{chosen.speedup_vs_torch:.2f}x PyTorch eager at batch {big[0]}.")
        report = SampReport(
            task=self.checkpoint.head.task, metric=self._metric_name(),
            budget={"max_drop": s.max_drop, "min_cosine": s.min_cosine}, units=unit_rows,
            torch_eager_ms=torch_ms, candidates=candidates, chosen="samp", verdict=verdict,
            export_max_abs_diff=self.info.max_abs_diff, mode=mode, notes=notes,
        )
        return SampResult(report=report, model_path=self.build(plan.int8, mode), workdir=self.workdir)

    def _prefer_measured_all_int8(self, plan: Plan, candidates: list[Candidate], measurements: list[UnitMeasurement],
                                  batch: int, notes: list[str]) -> tuple[Plan, list[Candidate]]:
        searched = next(c for c in candidates if c.name == "samp")
        full = next(c for c in candidates if c.name == "all-int8")
        fits = self.within_budget(full.dev_metric, full.dev_cosine)
        same = set(full.int8) == set(searched.int8)
        if not prefer_all_int8(searched.latency_ms[batch], full.latency_ms[batch], fits, same):
            return plan, candidates
        notes.append(f"all-INT8 also keeps the budget on dev and measured faster at batch {batch} "
                     f"({full.latency_ms[batch]:.1f} vs {searched.latency_ms[batch]:.1f} ms): chosen")
        chosen = full.model_copy(update={"name": "samp"})
        return plan_from(measurements, set(full.int8)), [chosen if c.name == "samp" else c for c in candidates]

    def _candidates(self, plan: Plan, measurements: list[UnitMeasurement], mode: str,
                    torch_ms: dict[int, float]) -> list[Candidate]:
        s = self.settings
        everything = frozenset(u.name for u in self.units)
        named: list[tuple[str, Plan]] = [("fp32", plan_from(measurements, set())),
                                         ("all-int8", plan_from(measurements, everything)),
                                         ("samp", plan)]
        line = frontier(measurements)[1:-1]
        step = max(1, len(line) // max(1, s.max_candidates - 3))
        named += [(f"frontier-{len(p.int8)}", p) for p in line[::step] if p.int8 != plan.int8]
        out = []
        big = max(s.latency_batches)
        for name, candidate in named:
            self._step(f"measuring candidate {name}")
            path = self.info.path if candidate.is_fp32 else self.build(candidate.int8, mode)
            dev, cosine = self.metric(path)
            test = self.metric(path, "test")[0] if name in ("fp32", "all-int8", "samp") else None
            latency = self.ort_latency(path, s.latency_batches)
            out.append(Candidate(
                name=name, mode="fp32" if candidate.is_fp32 else mode, int8=sorted(candidate.int8),
                quantization_rate=quantization_rate(self.units, set(candidate.int8)), dev_metric=dev,
                test_metric=test, dev_cosine=cosine, latency_ms=latency,
                speedup_vs_torch=torch_ms[big] / latency[big], size_bytes=path.stat().st_size,
            ))
        return out

    def _metric_name(self) -> str:
        if self.checkpoint.head.task == "classification":
            return "accuracy"
        return "retrieval_acc@1" if self.settings.matching_metric == "retrieval" else "spearman_vs_fp32"

    def _step(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(f"[dim]·[/] {text}")
