"""Publish a SAMP result as the next version of a model in the repository (atomically)."""

from __future__ import annotations

import json
from pathlib import Path

from quantizer.engines import build_tensorrt_engine, tensorrt_available
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
from training.checkpoint import raw_tokenizer

SERVED_TASKS = {"matching": "matching", "classification": "classification", "lm": "generation"}
TENSORRT_FILE = "model.plan"


def ensure_model_config(model_dir: Path, samp: Samp) -> RepoModelConfig:
    """The model's committed config.json: created with defaults on first publish, else validated."""
    if (model_dir / MODEL_CONFIG_FILE).exists():
        return load_model_config(model_dir)
    task = SERVED_TASKS.get(samp.checkpoint.head.task)
    if task is None:
        raise ValueError(f"task {samp.checkpoint.head.task!r} is not served; serve matching or classification heads")
    config = RepoModelConfig(name=model_dir.name, task=task, source=str(samp.checkpoint.path),
                             max_drop=samp.settings.max_drop, max_length=samp.checkpoint.head.max_length)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / MODEL_CONFIG_FILE).write_text(config.model_dump_json(indent=2, exclude_none=True) + "\n")
    return config


def served_head(samp: Samp) -> dict:
    """head.json of a version: the training head plus the graph's input/output names."""
    return {
        **samp.checkpoint.head.model_dump(exclude={"source_dir"}),
        "input_names": list(samp.info.input_names),
        "output_name": samp.info.output_name,
        "normalized": bool(samp.checkpoint.config.target.normalize),
        "pad_token_id": samp.checkpoint.config.pad_token_id,
    }


def publish_result(samp: Samp, result: SampResult, repo: Path, model: str) -> tuple[Path, list[str]]:
    """Write ``repo/model/<next>/``; returns its path and notes (such as a skipped TensorRT build)."""
    model_dir = Path(repo) / model
    ensure_model_config(model_dir, samp)
    work = result.workdir
    files: dict[str, Path | bytes] = {
        ONNX_FILE: result.model_path,
        TOKENIZER_FILE: raw_tokenizer(samp.checkpoint.tokenizer).to_str().encode(),
        HEAD_FILE: json.dumps(served_head(samp), indent=2).encode(),
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
