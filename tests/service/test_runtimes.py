"""The onnxruntime engine: sessions open as head.json says (a fusion SAMP measured slower is left out),
and a server loads such a version and answers as it does with every fusion."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.metrics import Metrics
from service.models import ModelManager
from service.repository import HEAD_FILE, MANIFEST_FILE, Manifest, load_head, publish
from service.runtimes.onnxruntime import OnnxRuntime, open_session
from service.settings import Settings

FUSION = "SkipLayerNormFusion"


def _residual_norm_graph(path: Path, width: int = 8) -> Path:
    """x + y -> LayerNormalization: the pattern onnxruntime fuses into SkipLayerNormalization."""
    tensor = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["sum"]),
         helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["out"], axis=-1, epsilon=1e-5)],
        "residual_norm",
        [tensor("x", TensorProto.FLOAT, ["b", "s", width]), tensor("y", TensorProto.FLOAT, ["b", "s", width])],
        [tensor("out", TensorProto.FLOAT, ["b", "s", width])],
        [numpy_helper.from_array(np.linspace(0.5, 1.5, width, dtype=np.float32), "gamma"),
         numpy_helper.from_array(np.linspace(-0.1, 0.1, width, dtype=np.float32), "beta")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_disabled_fusion_is_left_out_of_the_graph_onnxruntime_runs(tmp_path: Path) -> None:
    model = _residual_norm_graph(tmp_path / "model.onnx")
    ran: dict[str, list[str]] = {}
    for label, disabled in (("default", []), ("without", [FUSION])):
        optimized = tmp_path / f"{label}.onnx"
        open_session(model, 1, disabled_optimizers=disabled, optimized_model_path=optimized)
        ran[label] = [node.op_type for node in onnx.load(optimized).graph.node]
    assert ran == {"default": ["SkipLayerNormalization"], "without": ["Add", "LayerNormalization"]}
    rng = np.random.default_rng(0)
    feed = {"x": rng.normal(size=(2, 3, 8)).astype(np.float32), "y": rng.normal(size=(2, 3, 8)).astype(np.float32)}
    fused, unfused = (OnnxRuntime(model, 1, disabled_optimizers=d).run(feed) for d in ([], [FUSION]))
    np.testing.assert_allclose(fused, unfused, atol=1e-5)


async def test_the_server_opens_a_version_without_the_fusions_its_head_json_names(repo: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "emb"
    shutil.copytree(repo / "emb", model_dir)
    source = model_dir / "1"
    metadata = Manifest.model_validate_json((source / MANIFEST_FILE).read_text()).metadata
    # version 1's head.json says what SAMP measured on this machine (either setting); 2 and 3 say each outright
    for disabled in (None, [FUSION]):
        head = load_head(source).model_copy(update={"disabled_optimizers": disabled})
        files: dict[str, Path | bytes] = {p.name: p for p in source.iterdir()
                                          if p.name not in (MANIFEST_FILE, HEAD_FILE)}
        files[HEAD_FILE] = head.to_json()
        publish(model_dir, files, metadata)
    config = model_dir / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "version_policy": {"all": True}}))

    manager = ModelManager(Settings(repo=tmp_path, instances=1, threads=1), Metrics())
    await manager.refresh()
    try:
        first, second = manager.get("emb", 2), manager.get("emb", 3)
        assert second.pool.runtimes[0].disabled_optimizers == (FUSION,)
        assert first.pool.runtimes[0].disabled_optimizers == ()
        texts = ["the file could not be opened", "commit the staged changes"]
        rows = await asyncio.gather(*(v.run(v.head.encode(texts), None) for v in (first, second)))
        np.testing.assert_allclose(rows[0], rows[1], atol=1e-4)
    finally:
        await manager.close()


def test_providers_follow_the_asked_order_skip_what_the_build_lacks_and_end_with_the_cpu(tmp_path: Path) -> None:
    from service.repository import OrtRuntimeConfig
    from service.runtimes.onnxruntime import choose_providers

    cpu_only = ["CPUExecutionProvider"]
    chosen, skipped = choose_providers(["tensorrt", "cuda", "cpu"], cpu_only, OrtRuntimeConfig())
    assert chosen == ["CPUExecutionProvider"]
    assert [line.split()[0] for line in skipped] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    # a build with both GPU providers (the list onnxruntime-gpu reports): TensorRT first with its options
    gpu_build = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    chosen, skipped = choose_providers(["cuda", "tensorrt"], gpu_build, OrtRuntimeConfig(tensorrt_int8=False),
                                       tmp_path, ["input_ids", "attention_mask"], max_batch_size=16, max_length=256)
    assert not skipped and chosen[0] == "CUDAExecutionProvider" and chosen[-1] == "CPUExecutionProvider"
    name, options = chosen[1]
    assert name == "TensorrtExecutionProvider"
    assert options["trt_fp16_enable"] is True and options["trt_int8_enable"] is False
    assert options["trt_engine_cache_enable"] is True and options["trt_engine_cache_path"] == str(tmp_path)
    assert options["trt_profile_max_shapes"] == "input_ids:16x256,attention_mask:16x256"
    assert options["trt_profile_min_shapes"] == "input_ids:1x1,attention_mask:1x1"


def test_engine_caches_are_one_folder_per_graph(tmp_path: Path) -> None:
    from service.runtimes.onnxruntime import engine_cache_dir

    for version in ("1", "2"):
        (tmp_path / "m" / version).mkdir(parents=True)
    first = _residual_norm_graph(tmp_path / "m" / "1" / "model.onnx")
    second = _residual_norm_graph(tmp_path / "m" / "2" / "model.onnx", width=16)
    a, b = engine_cache_dir(tmp_path / "cache", first), engine_cache_dir(tmp_path / "cache", second)
    assert a.name.startswith("m-1-") and b.name.startswith("m-2-") and a != b
    assert engine_cache_dir(tmp_path / "cache", first) == a  # stable: a restart finds its engines


async def test_the_server_reports_the_providers_it_runs_and_refuses_none_it_lacks(repo: Path, tmp_path: Path) -> None:
    """Asking for TensorRT and CUDA on a CPU-only onnxruntime still serves (on the CPU), and says so."""
    model_dir = tmp_path / "emb"
    shutil.copytree(repo / "emb", model_dir)
    config = model_dir / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "onnxruntime": {"providers": ["tensorrt", "cuda", "cpu"]}}))
    from service.dataplane import DataPlane

    settings, metrics = Settings(repo=tmp_path, instances=1, threads=1), Metrics()
    plane = DataPlane(ModelManager(settings, metrics), settings, metrics)
    await plane.models.refresh()
    try:
        meta = plane.model_metadata("emb", None)
        assert meta.platform == "onnxruntime_onnx"
        assert meta.parameters["runtime"] == "onnxruntime" and meta.parameters["device"] == "cpu"
        assert meta.parameters["providers"] == "CPUExecutionProvider"
    finally:
        await plane.models.close()
