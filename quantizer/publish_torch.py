"""Publish a PyTorch (GPU) plan: the next version holds the model's current ONNX plan unchanged, plus the
PyTorch plan in ``torch/`` (the toolkit's config and FP32 safetensors weights, plan.json, SAMP's report).

One version then serves on both kinds of node: ``runtime: onnxruntime`` reads its ONNX plan (CPU), and
``runtime: pytorch`` its PyTorch plan (GPU). A model with no version yet gets its FP32 graph as the ONNX
plan (SAMP's CPU plan can be published over it later with ``sampserve quantize``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_model

from quantizer.export import export_onnx
from quantizer.publish import ensure_model_config, input_files, served_head, served_task
from quantizer.samp_torch import TorchSamp, TorchSampResult
from service.repository import (
    HEAD_FILE,
    ONNX_FILE,
    TORCH_CONFIG_FILE,
    TORCH_PLAN_FILE,
    TORCH_REPORT_FILE,
    TORCH_WEIGHTS_FILE,
    list_versions,
    publish,
    verify,
)

TORCH_FILES = (TORCH_CONFIG_FILE, TORCH_WEIGHTS_FILE, TORCH_PLAN_FILE, TORCH_REPORT_FILE)


def publish_torch_result(samp: TorchSamp, result: TorchSampResult, repo: Path, model: str) -> Path:
    """Write ``repo/model/<next>/``: the newest version's files (its PyTorch plan replaced) with this plan
    added; returns its path. Refuses a checkpoint the server could not serve before writing anything."""
    model_dir = Path(repo) / model
    served_task(model_dir, samp.checkpoint)
    ensure_model_config(model_dir, samp.checkpoint, samp.settings.max_drop)
    with tempfile.TemporaryDirectory(prefix="publish-torch-") as tmp:
        work = Path(tmp)
        files: dict[str, Path | bytes] = {}
        metadata: dict[str, Any] = {}
        versions = list_versions(model_dir)
        if versions:
            base = model_dir / str(versions[-1])
            manifest = verify(base)
            files.update({name: base / name for name in manifest.files if name not in TORCH_FILES})
            metadata.update(manifest.metadata)
            metadata["onnx_plan_from_version"] = versions[-1]
        else:
            info = export_onnx(samp.checkpoint, work / "fp32.onnx")
            files.update({ONNX_FILE: info.path, **input_files(samp.checkpoint),
                          HEAD_FILE: served_head(samp.checkpoint, info).to_json()})
            metadata.update({"source": str(samp.checkpoint.path), "verdict": "FP32, not quantized",
                             "quantized": False})
        weights = work / "model.safetensors"
        save_model(samp.checkpoint.model.float(), str(weights))
        files[TORCH_CONFIG_FILE] = samp.checkpoint.config.to_json().encode()
        files[TORCH_WEIGHTS_FILE] = weights
        files[TORCH_PLAN_FILE] = result.plan.to_json()
        files[TORCH_REPORT_FILE] = result.report.model_dump_json(indent=2).encode()
        chosen = next(c for c in result.report.candidates if c.name == result.report.chosen)
        metadata["torch_plan"] = {"verdict": result.report.verdict, "device": result.report.device.model_dump(),
                                  "batch_invariance": {"invariant": chosen.batch_invariant,
                                                       "batch_cosine": chosen.batch_cosine,
                                                       "required": result.report.budget.get("min_batch_cosine")}}
        return publish(model_dir, files, metadata)
