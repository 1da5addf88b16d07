"""SAMP end to end on real (small) models: measure, search, verify, report, publish, load back."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from quantizer.publish import publish_result
from quantizer.samp import FORMS, Samp
from quantizer.schemas import SampSettings
from quantizer.torch_module import load
from service.provenance import host_info
from service.repository import list_versions, load_head, load_model_config, verify
from training.checkpoint import load_checkpoint
from training.data.tasks import read_records
from training.tokenization import configured, encode
from tests.conftest import QUICK_TIMING

FAST = {"latency_batches": (1, 4), "timing": QUICK_TIMING, "sequence_length": 32,
        "max_examples": 96,
        "calibration_batches": 2, "threads": 1, "max_candidates": 4}


@pytest.fixture(scope="module")
def classifier_run(tiny_classifier, topics_data, tmp_path_factory):
    checkpoint = load_checkpoint(tiny_classifier)
    samp = Samp(checkpoint, read_records(topics_data / "dev.jsonl"), SampSettings(max_drop=0.05, **FAST),
                workdir=tmp_path_factory.mktemp("samp"))
    return samp, samp.run()


def test_report_holds_extremes_and_a_verified_plan(classifier_run):
    samp, result = classifier_run
    report = result.report
    names = [c.name for c in report.candidates]
    assert {"fp32", "all-int8", "samp"} <= set(names)
    assert len(report.units) == len(samp.units) >= 8
    chosen = next(c for c in report.candidates if c.name == "samp")
    fp32 = next(c for c in report.candidates if c.name == "fp32")
    assert fp32.dev_metric - chosen.dev_metric <= 0.05 + 1e-9
    assert set(chosen.int8) <= {u.name for u in samp.units}
    assert 0.0 <= chosen.quantization_rate <= 1.0
    for candidate in report.candidates:
        assert set(candidate.latency_ms) == {1, 4} and all(v > 0 for v in candidate.latency_ms.values())
    assert report.metric == "accuracy" and report.torch_eager_ms[4] > 0
    assert report.export_max_abs_diff <= 1e-4
    # a unit's sensitivity plan is deleted once measured: what stays on disk is the plans still referenced
    plans = set(result.workdir.glob("plan-*.onnx"))
    assert result.model_path in plans and plans == {p for p in samp._built.values() if p.name.startswith("plan-")}
    assert len(plans) < len(samp.units), [p.name for p in plans]


def test_publish_writes_a_verified_version_and_the_torch_module_is_a_drop_in(classifier_run, tmp_path, topics_data):
    samp, result = classifier_run
    version = publish_result(samp, result, tmp_path / "repo", "topics")
    assert version.name == "1" and list_versions(tmp_path / "repo/topics") == [1]
    manifest = verify(version)
    assert {"model.onnx", "tokenizer.json", "head.json", "samp_report.json", "samp_report.png"} <= set(manifest.files)
    assert (version / "samp_report.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((version / "samp_report.json").read_text())
    assert report["chosen"] == "samp"
    # provenance: the machine the plan was measured on, in the report and the manifest alike
    here = host_info(1)
    assert report["provenance"]["cpu"] == here.cpu and report["provenance"]["int8_class"] == here.int8_class
    assert manifest.metadata["provenance"] == report["provenance"]
    assert report["provenance"]["threads"] == 1 and report["provenance"]["onnxruntime"] == here.onnxruntime
    assert report["timing"]["attempts"] >= 2  # one measurement per batch size at least
    # the fusions SAMP measured the plan faster without are the ones the server's sessions leave out
    assert any(note.startswith("fusions at batch 4:") for note in report["notes"])
    assert (load_head(version).disabled_optimizers or []) == report["disabled_optimizers"]
    config = load_model_config(tmp_path / "repo/topics")
    assert config.task == "classification" and config.max_drop == 0.05

    # A PyTorch eval loop, FP32 model swapped for the published plan.
    module = load(version, threads=1)
    fp32 = samp.checkpoint.model.eval()
    labels = samp.checkpoint.head.labels
    records = read_records(topics_data / "test.jsonl")[:128]
    tokenizer = configured(samp.checkpoint.tokenizer, 32, 0)

    def accuracy(model) -> float:
        hits = 0
        for i in range(0, len(records), 32):
            chunk = records[i : i + 32]
            batch = encode(tokenizer, [r["text"] for r in chunk])
            with torch.no_grad():
                logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            assert isinstance(logits, torch.Tensor)
            hits += int((logits.argmax(-1) == torch.tensor([labels.index(r["label"]) for r in chunk])).sum())
        return hits / len(records)

    assert abs(accuracy(module) - accuracy(fp32)) <= 0.1
    by_text = module(texts=["could not open file", "commit the changes"])
    assert by_text.shape == (2, len(labels))

    # publishing again makes version 2 beside version 1
    assert publish_result(samp, result, tmp_path / "repo", "topics").name == "2"


def test_the_default_plan_is_batch_invariant_and_measured_so(classifier_run):
    _, result = classifier_run
    report = result.report
    assert report.budget["min_batch_cosine"] == 0.9999
    # every form was measured; whichever was chosen met the tolerance (tiny-bert's dynamic form may: what
    # is measured decides, not the form's name)
    forms = [n for n in report.notes if n.startswith("all-INT8 at batch 4:")]  # a busy-timing note may come first
    assert len(forms) == 1 and forms[0].count("batch cosine") == 3
    for candidate in report.candidates:
        assert candidate.batch_cosine is not None and candidate.batch_cosine <= 1.0 + 1e-9
    chosen = next(c for c in report.candidates if c.name == "samp")
    assert chosen.batch_invariant and chosen.batch_cosine >= 0.9999
    assert "Batch-invariant: yes" in report.verdict


def test_dynamic_int8_depends_on_batch_mates_and_the_other_forms_do_not(minilm_checkpoint, topics_data, tmp_path):
    """On a real model (all-MiniLM-L6-v2) one activation scale per batch moves an output measurably."""
    settings = SampSettings(**{**FAST, "max_examples": 48})
    samp = Samp(load_checkpoint(minilm_checkpoint), read_records(topics_data / "dev.jsonl"), settings,
                workdir=tmp_path)
    everything = frozenset(u.name for u in samp.units)
    checks = {form: samp.batch_check(samp.build(everything, form)) for form in FORMS}
    assert checks["dynamic"][0] < 0.999 and not checks["dynamic"][1], checks
    for form in ("static", "blockwise"):
        assert checks[form][0] >= 0.99999 and checks[form][1], checks
    assert samp.batch_check(samp.info.path)[1]  # FP32 itself


def test_a_form_outside_the_tolerance_is_refused_unless_the_user_relaxes_it(tiny_embedder, topics_data, tmp_path):
    checkpoint, records = load_checkpoint(tiny_embedder), read_records(topics_data / "dev.jsonl")
    fast = {**FAST, "mode": "dynamic"}
    strict = Samp(checkpoint, records, SampSettings(max_drop=0.05, min_batch_cosine=1.0, **fast),
                  workdir=tmp_path / "a").run().report
    full = next(c for c in strict.candidates if c.name == "all-int8")
    assert full.batch_cosine < 1.0 and not full.batch_invariant
    assert strict.verdict.startswith("No INT8 form keeps") and next(
        c for c in strict.candidates if c.name == "samp").int8 == []
    samp = Samp(checkpoint, records, SampSettings(max_drop=0.05, min_batch_cosine=None, **fast), workdir=tmp_path / "b")
    relaxed = samp.run()
    chosen = next(c for c in relaxed.report.candidates if c.name == "samp")
    assert not relaxed.report.verdict.startswith("No INT8 form keeps") and "not required" in relaxed.report.verdict
    assert any("not required" in note for note in relaxed.report.notes)
    version = publish_result(samp, relaxed, tmp_path / "repo", "emb")
    invariance = verify(version).metadata["batch_invariance"]
    assert invariance["required"] is None and invariance["batch_cosine"] == chosen.batch_cosine  # shown to clients


def test_retune_quantizes_a_published_version_again_here_as_a_new_version(classifier_run, tmp_path, topics_data):
    samp, result = classifier_run
    repo = tmp_path / "repo"
    publish_result(samp, result, repo, "topics")
    done = subprocess.run(
        [sys.executable, "-m", "sampserve.cli", "quantize", "--retune", "--repo", str(repo), "--model", "topics",
         "--data", str(topics_data / "dev.jsonl"), "--threads", "1", "--rounds", "2", "--max-rounds", "2",
         "--max-examples", "48"],
        capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert list_versions(repo / "topics") == [1, 2]
    first, second = (json.loads((repo / "topics" / v / "samp_report.json").read_text()) for v in ("1", "2"))
    assert second["budget"] == first["budget"] and second["provenance"]["threads"] == 1
    assert verify(repo / "topics" / "2").metadata["source"] == str(samp.checkpoint.path)
    refused = subprocess.run([sys.executable, "-m", "sampserve.cli", "quantize", "--repo", str(repo), "--data",
                              str(topics_data / "dev.jsonl")], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--checkpoint" in refused.stderr  # neither a checkpoint nor --retune


def test_impossible_budget_gives_the_fp32_plan_said_plainly(tiny_embedder, topics_data, tmp_path):
    checkpoint = load_checkpoint(tiny_embedder)
    settings = SampSettings(max_drop=0.0, min_cosine=1.0, **FAST)
    result = Samp(checkpoint, read_records(topics_data / "dev.jsonl"), settings, workdir=tmp_path).run()
    chosen = next(c for c in result.report.candidates if c.name == "samp")
    assert chosen.int8 == [] and chosen.mode == "fp32"
    assert result.report.verdict.startswith("No INT8 unit fits")
    assert result.report.metric == "spearman_vs_fp32"


def test_matching_plan_keeps_embedding_cosine(tiny_embedder, topics_data, tmp_path):
    checkpoint = load_checkpoint(tiny_embedder)
    settings = SampSettings(max_drop=0.01, min_cosine=0.99, mode="dynamic", min_batch_cosine=None, **FAST)
    result = Samp(checkpoint, read_records(topics_data / "dev.jsonl"), settings, workdir=tmp_path).run()
    chosen = next(c for c in result.report.candidates if c.name == "samp")
    assert chosen.dev_cosine is not None and chosen.dev_cosine >= 0.99
    assert 1.0 - chosen.dev_metric <= 0.01 + 1e-9


@pytest.mark.slow
def test_minilm_plan_keeps_one_point_on_dev_and_unseen_test(minilm_checkpoint, topics_data, tmp_path):
    """The acceptance run at small scale: all-MiniLM-L6-v2, Spearman of pair scores vs FP32."""
    settings = SampSettings(max_drop=0.01, latency_batches=(1, 8), max_examples=128, max_candidates=3)
    result = Samp(load_checkpoint(minilm_checkpoint), read_records(topics_data / "train.jsonl"), settings,
                  workdir=tmp_path).run()
    chosen = next(c for c in result.report.candidates if c.name == "samp")
    assert chosen.int8 != [] and chosen.batch_invariant  # the default: INT8 that does not depend on batch-mates
    assert 1.0 - chosen.dev_metric <= 0.01 and 1.0 - chosen.test_metric <= 0.01
    timing = result.report.timing
    assert timing is not None
    if timing.quiet:
        assert np.isfinite(chosen.speedup_vs_torch)
    else:  # a busy machine: no ratio, and the verdict says why
        assert chosen.speedup_vs_torch is None and "not published" in result.report.verdict


def test_retrieval_metric_scores_both_directions_and_falls_when_rows_are_confused() -> None:
    from quantizer.measure import TaskEval, retrieval_accuracy

    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8))
    b = a + 0.01 * rng.normal(size=(20, 8))
    assert retrieval_accuracy(a, b) == 1.0
    confused = b.copy()
    confused[[0, 1]] = b[[1, 0]]  # two translations swapped: both lose in both directions
    assert retrieval_accuracy(a, confused) == pytest.approx(18 / 20)
    evaluation = TaskEval(name="dev", feeds=[], pair_split=20, retrieval=True)
    assert evaluation.score(np.concatenate([a, confused]), np.concatenate([a, b])) == pytest.approx(0.9)


def test_retrieval_metric_needs_pairs(tiny_embedder, topics_data, tmp_path) -> None:
    records = read_records(topics_data / "dev.jsonl")  # single texts: nothing to retrieve
    with pytest.raises(ValueError, match="text_a and text_b"):
        Samp(load_checkpoint(tiny_embedder), records, SampSettings(matching_metric="retrieval", **FAST),
             workdir=tmp_path)
