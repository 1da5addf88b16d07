"""SAMP for the PyTorch plan, run end to end on this machine's CPU (device "cpu": the procedure and the
artifact are what is tested; the speed decisions are a GPU's to make) and published beside the ONNX plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantizer.publish_torch import publish_torch_result
from quantizer.samp_torch import EAGER_FP16, EAGER_FP32, TorchSamp, TorchSampReport, TorchSampSettings
from service.repository import (
    ONNX_FILE,
    TORCH_CONFIG_FILE,
    TORCH_PLAN_FILE,
    TORCH_REPORT_FILE,
    TORCH_WEIGHTS_FILE,
    load_torch_plan,
    verify,
)
from tests.conftest import QUICK_TIMING
from training.checkpoint import load_checkpoint
from training.data.tasks import read_records

SETTINGS = {"device": "cpu", "dtypes": ["bfloat16", "float16"], "max_drop": 0.05, "latency_batches": (1,),
            "sequence_length": 32, "max_examples": 48, "timing": QUICK_TIMING}


@pytest.fixture(scope="module")
def torch_samp(tiny_classifier: Path, topics_data: Path) -> tuple[TorchSamp, object]:
    samp = TorchSamp(load_checkpoint(tiny_classifier), read_records(topics_data / "dev.jsonl"),
                     TorchSampSettings(**SETTINGS))
    return samp, samp.run()


def test_every_unit_is_measured_and_the_plan_keeps_the_budget_and_batch_invariance(torch_samp) -> None:
    samp, result = torch_samp
    report = result.report
    assert [row["unit"] for row in report.units] == samp.units and len(samp.units) == 8  # 2 layers x 4 units
    assert samp.not_int8 == ["head"] and any(n.startswith("kept in the body dtype: head") for n in report.notes)
    assert report.plan.compute_dtype in ("bfloat16", "float16")
    chosen = next(c for c in report.candidates if c.name == "samp")
    assert samp.fp32_metric["dev"] - chosen.dev_metric <= 0.05 + 1e-9
    assert chosen.batch_invariant and set(chosen.int8) == set(report.plan.int8_units)
    full = next(c for c in report.candidates if c.name == "all-int8")
    assert full.int8 == sorted(samp.units) and full.batch_invariant  # W8A8 per-row: batch-mates change nothing
    assert set(report.eager_ms) == {EAGER_FP32, EAGER_FP16} and report.eager_ms[EAGER_FP32][1] > 0
    assert report.device.capability is None and report.device.torch.startswith("2.")
    assert "Batch-invariant: yes" in report.verdict


def test_the_plan_is_published_beside_the_unchanged_onnx_plan(torch_samp, tiny_classifier: Path, topics_data: Path,
                                                             tmp_path: Path) -> None:
    from tests.conftest import samp_publish

    samp, result = torch_samp
    root = samp_publish(tiny_classifier, topics_data / "dev.jsonl", tmp_path, "topics", tmp_path / "work",
                        max_drop=0.05)
    onnx_plan = verify(root / "topics" / "1").files[ONNX_FILE]
    version = publish_torch_result(samp, result, root, "topics")
    manifest = verify(version)
    assert version.name == "2" and manifest.files[ONNX_FILE] == onnx_plan  # the CPU plan as it was
    for name in (TORCH_CONFIG_FILE, TORCH_WEIGHTS_FILE, TORCH_PLAN_FILE, TORCH_REPORT_FILE):
        assert name in manifest.files, name
    assert load_torch_plan(version) == result.plan
    TorchSampReport.model_validate_json((version / TORCH_REPORT_FILE).read_text())
    assert manifest.metadata["torch_plan"]["batch_invariance"]["invariant"] is True
    assert manifest.metadata["onnx_plan_from_version"] == 1 and "provenance" in manifest.metadata
    # a second PyTorch plan replaces the first, never piles up beside it
    again = publish_torch_result(samp, result, root, "topics")
    assert sorted(n for n in verify(again).files if n.startswith("torch/")) == sorted(
        n for n in manifest.files if n.startswith("torch/"))


def test_a_model_without_versions_gets_its_fp32_graph_as_the_onnx_plan(torch_samp, tmp_path: Path) -> None:
    samp, result = torch_samp
    version = publish_torch_result(samp, result, tmp_path, "fresh")
    manifest = verify(version)
    assert ONNX_FILE in manifest.files and manifest.metadata["quantized"] is False
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["task"] == "classification"


def test_settings_are_validated_before_any_work() -> None:
    with pytest.raises(ValueError):
        TorchSampSettings(dtypes=["float8"])
    with pytest.raises(ValueError):
        TorchSampSettings(device="tpu")
    with pytest.raises(ValueError):
        TorchSampSettings(dtypes=[])
