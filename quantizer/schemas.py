"""SAMP's artifacts and settings: what the user asks for, each measured candidate, the report.

The report is what samp_report.json holds and what the server's model metadata and the benchmark
read; its timing and provenance fields say how far each speed figure can be trusted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from quantizer.timing import Quietness, TimingPolicy
from service.provenance import HostInfo
from service.repository import OrtFusion


DEFAULT_BATCH_COSINE = 0.9999
"""The batch-invariance tolerance: an output alone and inside a batch must have at least this cosine."""


class SampSettings(BaseModel):
    """What the user asks of SAMP; validated before any work starts."""

    model_config = ConfigDict(extra="forbid")

    max_drop: float = Field(0.01, ge=0, description="Largest allowed drop of the task metric (0.01 = 1 point).")
    min_cosine: float | None = Field(None, gt=0, le=1, description="Embeddings: lowest mean cosine to FP32.")
    mode: Literal["auto", "dynamic", "static", "blockwise"] = Field(
        "auto", description="INT8 form; auto measures every form's all-INT8 graph and keeps the fastest of those "
        "that meet min_batch_cosine (a tie within the timing noise goes to the more batch-invariant one).")
    min_batch_cosine: float | None = Field(
        DEFAULT_BATCH_COSINE, gt=0, le=1, description="Batch invariance: the lowest cosine allowed between an "
        "input's output computed alone and inside a batch of other inputs (classification also needs the same "
        "top-1). None admits forms whose outputs depend on batch-mates (dynamic INT8): the user's explicit "
        "choice, shown in the report and the served model's metadata.")
    calibration_method: Literal["minmax", "percentile", "entropy"] = "minmax"
    calibration_batches: int = Field(8, ge=1)
    sequence_length: int = Field(128, ge=8, description="Sequence length of the latency measurements.")
    latency_batches: tuple[int, ...] = (1, 8, 32)
    threads: int | None = Field(None, ge=1, description="onnxruntime intra-op threads (default: all cores).")
    timing: TimingPolicy = Field(default_factory=TimingPolicy, description="How candidates are timed (interleaved "
                                 "rounds) and when the machine counts as quiet enough to publish a speed ratio.")
    max_candidates: int = Field(6, ge=2, description="Frontier plans measured for the report's plot.")
    max_examples: int = Field(256, ge=8, description="Records in each of calibration, dev and test.")
    matching_metric: Literal["spearman_vs_fp32", "retrieval"] = Field(
        "spearman_vs_fp32", description="Matching: Spearman of the pairs' cosines against FP32's, or translation "
        "retrieval accuracy@1 (text_a <-> text_b among the split's pairs, both directions; needs text_b).")


class MeasuredPlan(BaseModel):
    """What every SAMP candidate records, for the ONNX and the PyTorch plan alike."""

    name: str
    int8: list[str]
    quantization_rate: float
    dev_metric: float
    test_metric: float | None = None
    dev_cosine: float | None = None


class Candidate(MeasuredPlan):
    mode: str
    latency_ms: dict[int, float]
    """Median milliseconds per batch size, timed interleaved with every other candidate and PyTorch eager."""
    latency_spread: dict[int, float] | None = None
    """Interquartile range / median of those timings, per batch size."""
    speedup_vs_torch: float | None
    """PyTorch eager's median over this candidate's at the largest batch; None when the machine was too busy
    for the timings to be trusted (see SampReport.timing)."""
    size_bytes: int
    perplexity_increase: dict[str, float] | None = None
    """Generators: relative perplexity change against FP32 on dev and test."""
    batch_invariant: bool | None = None
    """Encoders: batch_cosine meets the tolerance (and top-1 is unchanged for classification). Generators:
    greedy tokens of a prompt alone equal its tokens inside a mixed batch."""
    batch_cosine: float | None = None
    """Encoders: the lowest cosine between an input's output alone and inside a batch of mixed lengths."""


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
    timing: Quietness | None = None
    """How quiet the machine was while the candidates were timed (None: a report from before timing checks)."""
    provenance: HostInfo | None = None
    """The machine the plan was measured on: CPU, INT8 instructions, onnxruntime, threads."""
    disabled_optimizers: list[OrtFusion] = Field(default_factory=list)
    """onnxruntime fusions the plan runs without, because it measured faster without them (head.json)."""


@dataclass
class SampResult:
    report: SampReport
    model_path: Path  # the chosen plan's ONNX file
    workdir: Path


