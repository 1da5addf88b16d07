"""The PyTorch runtime and its plan forms, on this machine's CPU (a real torch model, real server, real
clients; nothing pretends to be a GPU). CUDA-only behaviour (graph capture and replay) is tested where a
device exists and skipped, with the reason, elsewhere."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from service.repository import (
    TORCH_CONFIG_FILE,
    TORCH_PLAN_FILE,
    TORCH_REPORT_FILE,
    TORCH_WEIGHTS_FILE,
    TorchPlan,
    TorchRuntimeConfig,
    load_torch_plan,
    publish,
    verify,
)
from service.runtimes import RUNTIMES, RuntimeSpec
from service.runtimes.pytorch import PlannedRunner, RuntimeUnavailable, bucket, buckets, pad_feed
from service.runtimes.torch_plan import CastLinear, Int8Linear, apply_plan, int8_units, unit_linears
from tests.servers import start_server
from training.checkpoint import load_checkpoint

NO_CUDA = not torch.cuda.is_available()


def test_int8_linear_is_close_to_float_and_each_row_ignores_its_batch_mates() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    q = Int8Linear(linear)
    x = torch.randn(9, 64) * torch.linspace(0.1, 10, 9)[:, None]  # rows of very different scales
    with torch.no_grad():
        exact, got = linear(x), q(x)
    relative = ((got - exact).norm(dim=1) / exact.norm(dim=1)).max()
    assert relative < 0.02, relative
    alone = torch.cat([q(x[i:i + 1]) for i in range(9)])
    assert torch.equal(alone, got)  # per-row scales and exact int32 sums: bit-identical
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (1, 32)


def test_matrices_int8_cannot_run_are_refused() -> None:
    with pytest.raises(ValueError, match="multiples of 8"):
        Int8Linear(nn.Linear(30, 32))


def test_a_plan_gives_each_unit_its_form_and_refuses_units_the_model_lacks(tiny_classifier: Path) -> None:
    model = load_checkpoint(tiny_classifier).model
    units = unit_linears(model)
    assert "layer0.attn_qkv" in units and len(units["layer0.attn_qkv"]) == 3 and "head" in units
    planned = apply_plan(copy.deepcopy(model), "bfloat16", {"layer0.ffn_in": "int8", "layer1.ffn_out": "float32"})
    assert isinstance(planned.encoder.layers[0].feed_forward.inner, Int8Linear)
    kept = planned.encoder.layers[1].feed_forward.outer
    assert isinstance(kept, CastLinear) and kept.linear.weight.dtype == torch.float32
    assert planned.encoder.layers[1].feed_forward.inner.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"does not have: layer9\.ffn_in"):
        apply_plan(copy.deepcopy(model), "float32", {"layer9.ffn_in": "int8"})
    assert set(int8_units(model)) <= set(units)


def test_buckets_cover_the_cap_and_padding_keeps_real_rows() -> None:
    assert buckets([1, 2, 4, 8, 16, 32, 64], 24) == [1, 2, 4, 8, 16, 24]
    assert bucket(5, [1, 2, 4, 8]) == 8 and bucket(8, [1, 2, 4, 8]) == 8
    with pytest.raises(ValueError):
        bucket(9, [1, 2, 4, 8])
    feed = {"input_ids": np.array([[5, 6, 7], [8, 9, 0]]), "attention_mask": np.array([[1, 1, 1], [1, 1, 0]])}
    padded = pad_feed(feed, 4, 5, pad_id=0)
    assert padded["input_ids"].shape == (4, 5) and (padded["input_ids"][2:] == [5, 6, 7, 0, 0]).all()
    assert (padded["attention_mask"][:, 3:] == 0).all() and (padded["input_ids"][:2, :3] == feed["input_ids"]).all()


def test_the_torch_plan_schema_is_strict(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        TorchPlan.model_validate({"compute_dtype": "float8"})
    with pytest.raises(ValueError):
        TorchPlan.model_validate({"compute_dtype": "float16", "forms": {"head": "int4"}})
    with pytest.raises(ValueError):
        TorchPlan.model_validate({"compute_dtype": "float16", "surprise": 1})
    plan = TorchPlan(compute_dtype="float16", forms={"head": "int8", "layer0.ffn_in": "float32"})
    assert TorchPlan.model_validate_json(plan.to_json()) == plan and plan.int8_units == ["head"]
    assert load_torch_plan(tmp_path) is None
    with pytest.raises(ValueError, match="strictly increasing"):
        TorchRuntimeConfig(batch_buckets=[4, 2])


@pytest.fixture(scope="module")
def torch_repo(tmp_path_factory: pytest.TempPathFactory, tiny_classifier: Path, topics_data: Path) -> Path:
    """The tiny classifier published through SAMP on the CPU (ONNX plan), then a PyTorch plan added by hand
    (INT8 in two units, one unit kept FP32 in a bfloat16 body) as version 2, served by runtime pytorch on
    the CPU."""
    from tests.conftest import samp_publish

    root = samp_publish(tiny_classifier, topics_data / "dev.jsonl", tmp_path_factory.mktemp("torchrepo"), "topics",
                        tmp_path_factory.mktemp("samp-topics"), max_drop=0.05)
    from safetensors.torch import save_model

    from quantizer.publish_torch import TORCH_FILES

    checkpoint = load_checkpoint(tiny_classifier)
    base = root / "topics" / "1"
    work = tmp_path_factory.mktemp("torchfiles")
    save_model(checkpoint.model, str(work / "model.safetensors"))
    plan = TorchPlan(compute_dtype="bfloat16", forms={"layer0.ffn_in": "int8", "layer1.attn_qkv": "int8",
                                                      "head": "float32"})
    files: dict[str, Path | bytes] = {name: base / name for name in verify(base).files}
    files.update({TORCH_CONFIG_FILE: checkpoint.config.to_json().encode(),
                  TORCH_WEIGHTS_FILE: work / "model.safetensors", TORCH_PLAN_FILE: plan.to_json(),
                  TORCH_REPORT_FILE: b"{}"})
    assert set(TORCH_FILES) <= set(files)
    publish(root / "topics", files, {"source": str(tiny_classifier)})
    config = root / "topics" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "runtime": "pytorch",
                                  "pytorch": {"device": "cpu"}, "version_policy": {"latest": 1}}))
    return root


def test_a_version_without_a_torch_plan_is_refused_by_the_pytorch_runtime(torch_repo: Path) -> None:
    spec = RuntimeSpec(torch_repo / "topics" / "1", torch=TorchRuntimeConfig(device="cpu"))
    with pytest.raises(RuntimeUnavailable, match=r"no torch/plan\.json"):
        RUNTIMES["pytorch"](spec)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: the refusal is for machines without it")
def test_cuda_asked_where_there_is_none_is_refused_with_the_way_out(torch_repo: Path) -> None:
    spec = RuntimeSpec(torch_repo / "topics" / "2", torch=TorchRuntimeConfig(device="cuda"))
    with pytest.raises(RuntimeUnavailable, match=r"no CUDA device.*runtime onnxruntime.*device to cpu"):
        RUNTIMES["pytorch"](spec)


def test_the_server_runs_the_pytorch_plan_and_says_so(torch_repo: Path, tiny_classifier: Path) -> None:
    import tritonclient.grpc as triton

    texts = ["failed to lock the ref", "the printer is out of paper", "could not open the file"]
    version = torch_repo / "topics" / "2"
    planned = apply_plan(copy.deepcopy(load_checkpoint(tiny_classifier).model), "bfloat16",
                         load_torch_plan(version).forms)  # type: ignore[union-attr]
    server = start_server(torch_repo)
    try:
        meta = server.http.get("/v2/models/topics").json()
        assert meta["platform"] == "pytorch_libtorch"
        params = meta["parameters"]
        assert (params["runtime"], params["device"], params["dtype"], params["int8_units"]) == \
            ("pytorch", "cpu", "bfloat16", "2")
        grpc_meta = triton.InferenceServerClient(server.grpc_target).get_model_metadata("topics")
        assert grpc_meta.platform == "pytorch_libtorch"
        metrics = server.http.get("/metrics").text
        assert 'sampserve_model_runtime_info{device="cpu",model="topics",runtime="pytorch",version="2"} 1.0' in metrics
        assert "topics version 2 loaded (2 instances, pytorch on cpu" in server.output()
        body = {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": texts}]}
        served = np.array(server.http.post("/v2/models/topics/infer", json=body).json()["outputs"][0]["data"])
    finally:
        assert server.stop() == 0
    # the same plan run directly, one text at a time (the server batches them by length): the same logits,
    # to bfloat16's precision
    from quantizer.export import input_names_for
    from quantizer.measure import tokenize

    checkpoint = load_checkpoint(tiny_classifier)
    names = input_names_for(checkpoint)
    assert checkpoint.tokenizer is not None
    runner = PlannedRunner(planned, list(names), 0, torch.bfloat16, [1], [1], graphs=False)
    direct = np.concatenate([runner.run(tokenize(checkpoint.tokenizer, [t], checkpoint.head.max_length, 0, names))
                             for t in texts])
    served = served.reshape(3, -1)
    np.testing.assert_allclose(served, direct, rtol=0, atol=2e-2)
    assert (served.argmax(1) == direct.argmax(1)).all()


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device (graphs are captured and replayed on the GPU only)")
def test_cuda_graph_replay_matches_eager(tiny_classifier: Path) -> None:  # pragma: no cover - GPU machines
    model = apply_plan(copy.deepcopy(load_checkpoint(tiny_classifier).model).cuda(), "float16",
                       {"layer0.ffn_in": "int8"})
    names = ["input_ids", "attention_mask", "token_type_ids"]
    graphs = PlannedRunner(model, names, 0, torch.float16, [4, 8], [16, 32], graphs=True)
    eager = PlannedRunner(model, names, 0, torch.float16, [4, 8], [16, 32], graphs=False)
    assert len(graphs.graphs) == 4
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(5, 500, (3, 20)), "attention_mask": np.ones((3, 20), np.int64),
            "token_type_ids": np.zeros((3, 20), np.int64)}
    np.testing.assert_allclose(graphs.run(feed), eager.run(feed), atol=2e-2)
