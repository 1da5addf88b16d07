"""Export, units and INT8 plans on tiny real graphs: op counts and closeness to FP32."""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from quantizer.engines import ort_session
from quantizer.export import export_onnx, sample_inputs
from quantizer.measure import cosine_rows
from quantizer.quantize import apply_plan
from quantizer.units import find_units, quantization_rate
from training.checkpoint import load_checkpoint

LAYERS = 2  # tiny-bert


def _ops(path):
    return Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def _run(path, inputs):
    session = ort_session(path, threads=1)
    return session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_classifier):
    checkpoint = load_checkpoint(tiny_classifier)
    return checkpoint, export_onnx(checkpoint, tmp_path_factory.mktemp("onnx") / "fp32.onnx")


def test_export_has_stable_names_and_matches_pytorch(exported):
    _, info = exported
    assert info.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert info.output_name == "logits"
    assert info.max_abs_diff <= 1e-4
    graph = onnx.load(str(info.path)).graph
    assert [i.name for i in graph.input] == list(info.input_names)
    assert [o.name for o in graph.output] == ["logits"]


@pytest.mark.parametrize(("batch", "length"), [(1, 5), (7, 40)])
def test_export_has_dynamic_batch_and_sequence(exported, batch, length):
    checkpoint, info = exported
    inputs = sample_inputs(checkpoint, batch=batch, length=length, seed=batch)
    with torch.no_grad():
        expected = checkpoint.model(*(torch.from_numpy(inputs[n]) for n in info.input_names)).numpy()
    assert np.abs(_run(info.path, inputs) - expected).max() <= 1e-4


def test_export_of_embedder_outputs_normalized_embeddings(tmp_path, tiny_embedder):
    checkpoint = load_checkpoint(tiny_embedder)
    info = export_onnx(checkpoint, tmp_path / "emb.onnx")
    assert info.output_name == "embeddings"
    out = _run(info.path, sample_inputs(checkpoint))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_units_cover_every_weight_matmul(exported):
    _, info = exported
    units = find_units(info.path)
    names = {u.name for u in units}
    for layer in range(LAYERS):
        assert {f"layer{layer}.{k}" for k in ("attn_qkv", "attn_out", "ffn_in", "ffn_out")} <= names
    qkv = next(u for u in units if u.name == "layer0.attn_qkv")
    assert len(qkv.nodes) == 3 and qkv.flops_per_token == 3 * 2 * 64 * 64
    weight_matmuls = sum(len(u.nodes) for u in units if u.name.startswith("layer"))
    assert weight_matmuls == LAYERS * 6
    assert quantization_rate(units, set()) == 0.0
    assert quantization_rate(units, names) == pytest.approx(1.0)


def test_dynamic_plan_quantizes_exactly_the_chosen_units(tmp_path, exported):
    checkpoint, info = exported
    units = find_units(info.path)
    chosen = {"layer0.ffn_in", "layer1.attn_qkv"}
    out = apply_plan(info.path, tmp_path / "dyn.onnx", units, chosen, "dynamic")
    before, after = _ops(info.path), _ops(out)
    assert after["MatMulInteger"] == 4  # ffn_in (1) + q, k, v (3)
    # the quantizer rewrites Gemm as MatMul + Add, so count both
    assert after["MatMul"] + after["Gemm"] == before["MatMul"] + before["Gemm"] - 4
    inputs = sample_inputs(checkpoint, batch=6, length=24)
    fp32, int8 = _run(info.path, inputs), _run(out, inputs)
    assert np.abs(fp32 - int8).max() < 0.05 * np.abs(fp32).max()
    assert (fp32.argmax(-1) == int8.argmax(-1)).mean() >= 5 / 6


def _static_plan(tmp_path, exported, fold: bool):
    checkpoint, info = exported
    calibration = [sample_inputs(checkpoint, batch=4, length=16, seed=s) for s in range(3)]
    for feed in calibration:
        feed["attention_mask"][:] = 1  # fixed-length calibration batches
    name = "folded.onnx" if fold else "qdq.onnx"
    return apply_plan(info.path, tmp_path / name, find_units(info.path), {"layer1.ffn_out"}, "static", calibration,
                      "minmax", fold=fold)


def test_portable_static_plan_is_qdq_on_the_chosen_matmuls_only(tmp_path, exported):
    checkpoint, info = exported
    out = _static_plan(tmp_path, exported, fold=False)
    ops = _ops(out)
    assert ops["QuantizeLinear"] >= 1 and ops["DequantizeLinear"] >= 2  # activation Q/DQ + weight DQ
    graph = onnx.load(str(out)).graph
    outer = next(n for n in graph.node if n.name == "/encoder/layers.1/feed_forward/outer/MatMul")
    producers = {o: n.op_type for n in graph.node for o in n.output}
    assert producers.get(outer.input[0]) == "DequantizeLinear"
    untouched = next(n for n in graph.node if n.name == "/encoder/layers.0/feed_forward/outer/MatMul")
    assert producers.get(untouched.input[0]) != "DequantizeLinear"
    inputs = sample_inputs(checkpoint, batch=5, length=16)
    assert cosine_rows(_run(info.path, inputs), _run(out, inputs)).min() > 0.99


def test_static_plan_folds_into_integer_matmuls_with_their_bias(tmp_path, exported):
    checkpoint, info = exported
    qdq, folded = _static_plan(tmp_path, exported, fold=False), _static_plan(tmp_path, exported, fold=True)
    ops = _ops(folded)
    assert ops["MatMulIntegerToFloat"] == 1 and ops["DequantizeLinear"] == 0 and ops["QuantizeLinear"] == 1
    graph = onnx.load(str(folded)).graph
    outer = next(n for n in graph.node if n.name == "/encoder/layers.1/feed_forward/outer/MatMul")
    assert outer.op_type == "MatMulIntegerToFloat" and len(outer.input) == 7  # the bias is an input
    assert outer.input[6] == "encoder.layers.1.feed_forward.outer.bias"
    assert not any(n.name == "/encoder/layers.1/feed_forward/outer/Add" for n in graph.node)
    assert len(graph.node) == len(onnx.load(str(qdq)).graph.node) - 3  # the bias Add and two DQs
    # Same result as the QDQ graph except that the residual connection no longer carries rounded values.
    inputs = sample_inputs(checkpoint, batch=5, length=16)
    assert cosine_rows(_run(qdq, inputs), _run(folded, inputs)).min() > 0.999
    assert cosine_rows(_run(info.path, inputs), _run(folded, inputs)).min() > 0.99
    # Fixed activation scales: a row's output does not depend on the rows batched with it.
    alone = np.concatenate([_run(folded, {k: v[i:i + 1] for k, v in inputs.items()}) for i in range(5)])
    assert cosine_rows(alone, _run(folded, inputs)).min() > 0.99999


def test_empty_plan_is_the_fp32_graph(tmp_path, exported):
    _, info = exported
    out = apply_plan(info.path, tmp_path / "same.onnx", find_units(info.path), set(), "dynamic")
    assert out.read_bytes() == info.path.read_bytes()


def test_unknown_unit_is_refused(tmp_path, exported):
    _, info = exported
    with pytest.raises(ValueError, match="does not have"):
        apply_plan(info.path, tmp_path / "x.onnx", find_units(info.path), {"layer9.ffn_out"}, "dynamic")
