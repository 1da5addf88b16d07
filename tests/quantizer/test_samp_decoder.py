"""SAMP for generators on a tiny real Llama: sensitivity finds an outlier unit, the forms build what
they say, the blockwise form is batch-invariant, and a run ends with a plan within its budget."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from quantizer.decoder_export import OrtDecoder
from quantizer.engines import ort_session
from service.generation.cache import left_pad
from quantizer.quantize import apply_plan
from quantizer.samp_decoder import DecoderSamp, DecoderSampSettings
from tests.tiny_llama import tiny_llama
from training.data.gettext_topics import load_gettext_topics
from tests.conftest import QUICK_TIMING

SETTINGS = DecoderSampSettings(sequences=8, length=32, min_agreement=0.9, max_perplexity_increase=0.05,
                               batch_invariant=False,
                               timing=QUICK_TIMING)


@pytest.fixture(scope="module")
def texts():
    return [r["text"] for r in load_gettext_topics(max_per_topic=60)]


@pytest.fixture(scope="module")
def samp(tmp_path_factory, texts):
    work = tmp_path_factory.mktemp("samp-lm")
    checkpoint = tiny_llama(work)
    # A massive activation, as SmolLM2 has: one FFN channel of layer 1 a thousand times larger, so the
    # input of layer1.ffn_out carries one huge value beside small ones (per-tensor INT8 then rounds
    # every other channel to zero), with the output scaled back so that FP32 behaves as before.
    ffn = checkpoint.model.encoder.layers[1].feed_forward
    with torch.no_grad():
        ffn.inner.weight[7] *= 1000
        ffn.outer.weight[:, 7] /= 1000
    return DecoderSamp(checkpoint, texts, SETTINGS, workdir=work / "run")


def test_sensitivity_finds_the_unit_with_massive_activations(samp):
    dynamic = samp.sensitivity("dynamic")
    worst = min(dynamic, key=lambda unit: dynamic[unit][0])
    assert worst == "layer1.ffn_out"
    assert dynamic[worst][0] < 0.9
    # Blockwise rounding scales each block of 32 inputs on its own: the outlier spoils only its block.
    assert samp.sensitivity("blockwise")[worst][0] > dynamic[worst][0]


def test_blockwise_builds_only_the_chosen_units_and_is_batch_invariant(samp, tmp_path):
    path = apply_plan(samp.info.path, tmp_path / "b.onnx", samp.units, {"head", "layer0.ffn_in"}, "blockwise")
    graph = onnx.load(str(path)).graph
    nbits = sorted(n.name for n in graph.node if n.op_type == "MatMulNBits")
    assert nbits == sorted(f"{n}_Q8" for u in samp.units if u.name in {"head", "layer0.ffn_in"} for n in u.nodes)
    everything = apply_plan(samp.info.path, tmp_path / "all.onnx", samp.units, {u.name for u in samp.units},
                            "blockwise")
    assert samp.batch_invariant(everything)


def test_agreement_is_measured_against_fp32(samp):
    assert samp.evaluate(samp.info.path) == (1.0, 0.0)
    decoder = OrtDecoder.for_checkpoint(ort_session(samp.info.path), samp.checkpoint)
    ids, mask = left_pad([samp.dev.ids[0, :8].tolist()], samp.checkpoint.config.pad_token_id)
    logits, _ = decoder.run(ids, mask, None)
    assert logits.shape[-1] == samp.checkpoint.config.vocab_size


def test_run_reports_a_plan_within_budget(samp):
    report = samp.run().report
    chosen = next(c for c in report.candidates if c.name == "samp")
    assert chosen.dev_metric >= SETTINGS.min_agreement
    assert chosen.perplexity_increase["dev"] <= SETTINGS.max_perplexity_increase
    assert set(report.kept_fp32) | set(chosen.int8) == {u.name for u in samp.units}
    assert "kept FP32" in report.verdict
    assert np.isfinite(chosen.latency_ms[1])
