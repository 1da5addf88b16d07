"""Publish a SAMP result as the next version of a model in the repository (atomically)."""

from __future__ import annotations

import json
from pathlib import Path

from quantizer.engines import build_tensorrt_engine, tensorrt_available
from quantizer.export import ExportInfo, export_onnx
from quantizer.report import REPORT_JSON, REPORT_PNG, write_json, write_plot
from quantizer.samp import Samp, SampResult
from service.repository import (
    HEAD_FILE,
    MODEL_CONFIG_FILE,
    ONNX_FILE,
    TOKENIZER_FILE,
    RepoModelConfig,
    load_model_config,
    publish,
)
from training.checkpoint import Checkpoint, raw_tokenizer

SERVED_TASKS = {"matching": "matching", "classification": "classification", "lm": "generation"}
TENSORRT_FILE = "model.plan"


def ensure_model_config(model_dir: Path, checkpoint: Checkpoint, max_drop: float) -> RepoModelConfig:
    """The model's committed config.json: created with defaults on first publish, else validated."""
    if (model_dir / MODEL_CONFIG_FILE).exists():
        return load_model_config(model_dir)
    task = SERVED_TASKS.get(checkpoint.head.task)
    if task is None:
        raise ValueError(f"task {checkpoint.head.task!r} is not served; serve matching or classification heads")
    config = RepoModelConfig(name=model_dir.name, task=task, source=str(checkpoint.path),
                             max_drop=max_drop, max_length=checkpoint.head.max_length)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / MODEL_CONFIG_FILE).write_text(config.model_dump_json(indent=2, exclude_none=True) + "\n")
    return config


def served_head(checkpoint: Checkpoint, info: ExportInfo) -> dict:
    """head.json of a version: the training head plus the graph's input/output names."""
    return {
        **checkpoint.head.model_dump(exclude={"source_dir"}),
        "input_names": list(info.input_names),
        "output_name": info.output_name,
        "normalized": bool(checkpoint.config.target.normalize),
        "pad_token_id": checkpoint.config.pad_token_id,
    }


def publish_fp32(checkpoint: Checkpoint, repo: Path, model: str, workdir: Path) -> Path:
    """Publish the exported FP32 graph as it is (no SAMP): the baseline a benchmark compares with."""
    info = export_onnx(checkpoint, Path(workdir) / "fp32.onnx")
    model_dir = Path(repo) / model
    ensure_model_config(model_dir, checkpoint, max_drop=0.0)
    return publish(model_dir, {
        ONNX_FILE: info.path,
        TOKENIZER_FILE: raw_tokenizer(checkpoint.tokenizer).to_str().encode(),
        HEAD_FILE: json.dumps(served_head(checkpoint, info), indent=2).encode(),
    }, {"source": str(checkpoint.path), "verdict": "FP32, not quantized"})


def publish_result(samp: Samp, result: SampResult, repo: Path, model: str) -> tuple[Path, list[str]]:
    """Write ``repo/model/<next>/``; returns its path and notes (such as a skipped TensorRT build)."""
    model_dir = Path(repo) / model
    ensure_model_config(model_dir, samp.checkpoint, samp.settings.max_drop)
    work = result.workdir
    files: dict[str, Path | bytes] = {
        ONNX_FILE: result.model_path,
        TOKENIZER_FILE: raw_tokenizer(samp.checkpoint.tokenizer).to_str().encode(),
        HEAD_FILE: json.dumps(served_head(samp.checkpoint, samp.info), indent=2).encode(),
        REPORT_JSON: write_json(result.report, work / REPORT_JSON),
        REPORT_PNG: write_plot(result.report, work / REPORT_PNG),
    }
    notes = []
    available, reason = tensorrt_available()
    if available:
        files[TENSORRT_FILE] = build_tensorrt_engine(result.model_path, work / TENSORRT_FILE)
    else:
        notes.append(reason)
    metadata = {"source": str(samp.checkpoint.path), "verdict": result.report.verdict, "mode": result.report.mode}
    return publish(model_dir, files, metadata), notes
