"""A generation version in the model manager: loaded with an engine (caps from config.json's
generation block), served through ``generator``, its metric series gone when it is unloaded, drained
on close; and the config block's validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.errors import InvalidInput
from service.generation import SamplingParams
from service.metrics import Metrics
from service.models import GenerationVersion, ModelManager
from service.repository import (
    HEAD_FILE,
    MODEL_CONFIG_FILE,
    ONNX_FILE,
    TOKENIZER_FILE,
    RepoModelConfig,
    publish,
)
from service.settings import Settings
from tests.service.generation_repo import CONTEXT


def _repo(tmp_path: Path, version_dir: Path, generation: dict[str, object] | None = None, versions: int = 1) -> Path:
    model = tmp_path / "repo" / "tiny"
    model.mkdir(parents=True)
    config: dict[str, object] = {"name": "tiny", "task": "generation", "source": "tests"}
    if generation is not None:
        config["generation"] = generation
    (model / MODEL_CONFIG_FILE).write_text(json.dumps(config))
    for _ in range(versions):
        publish(model, {name: version_dir / name for name in (ONNX_FILE, TOKENIZER_FILE, HEAD_FILE)})
    return model.parent


def _value(metrics: Metrics, name: str, version: int) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": "tiny", "version": str(version)})


async def test_a_generation_version_loads_serves_and_unloads(tmp_path: Path, version_dir: Path) -> None:
    repo = _repo(tmp_path, version_dir, {"max_num_seqs": 4, "max_kv_tokens": 3 * CONTEXT, "max_waiting": 8})
    metrics = Metrics()
    manager = ModelManager(Settings(repo=repo, threads=1, instances=1), metrics)
    await manager.refresh()
    assert manager.readiness("tiny") == (True, "")
    loaded = manager.generator("tiny")
    assert isinstance(loaded, GenerationVersion) and manager.served("tiny") is loaded
    limits = loaded.engine.limits
    assert (limits.max_num_seqs, limits.max_kv_tokens, limits.max_model_len, limits.max_waiting) == (
        4, 3 * CONTEXT, CONTEXT, 8)
    with pytest.raises(InvalidInput, match="generates text"):
        manager.get("tiny")

    ids = loaded.head.encode_prompt(loaded.head.render_chat([{"role": "user", "content": "Paris?"}]))
    deltas = [d async for d in loaded.engine.generate(ids, SamplingParams(max_tokens=5, ignore_eos=True))]
    assert deltas[-1].completion_tokens == 5 and deltas[-1].finish_reason == "length"
    assert _value(metrics, "sampserve_generation_tokens_total", 1) == 5
    assert _value(metrics, "sampserve_kv_cache_capacity_tokens", 1) == 3 * CONTEXT
    assert _value(metrics, "sampserve_queue_capacity", 1) == 8

    publish(repo / "tiny", {name: version_dir / name for name in (ONNX_FILE, TOKENIZER_FILE, HEAD_FILE)})
    await manager.refresh()  # version 2 replaces version 1 (latest: 1)
    assert sorted(manager.state("tiny").versions) == [2] and not loaded.engine.alive
    assert _value(metrics, "sampserve_generation_tokens_total", 1) is None
    assert _value(metrics, "sampserve_kv_cache_tokens", 1) is None
    assert _value(metrics, "sampserve_kv_cache_tokens", 2) == 0
    assert manager.wedged() == []
    await manager.close()


async def test_close_drains_the_streams_in_flight(tmp_path: Path, version_dir: Path) -> None:
    manager = ModelManager(Settings(repo=_repo(tmp_path, version_dir), threads=1, instances=1), Metrics())
    await manager.refresh()
    engine = manager.generator("tiny").engine
    stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=40, ignore_eos=True))
    first = await anext(stream)
    await manager.close()
    rest = [d async for d in stream]
    assert 1 + len(rest) == 40 and rest[-1].finish_reason == "length" and first.finish_reason is None


async def test_caps_a_long_sequence_could_never_meet_fail_the_load_naming_the_setting(
        tmp_path: Path, version_dir: Path) -> None:
    too_long = {"max_model_len": CONTEXT + 1, "max_batch_prefill_tokens": 2 * CONTEXT}
    manager = ModelManager(Settings(repo=_repo(tmp_path, version_dir, too_long), threads=1, instances=1), Metrics())
    await manager.refresh()
    ready, reason = manager.readiness("tiny")
    assert not ready and f"generation.max_model_len={CONTEXT + 1} is above the model's max_length" in reason
    await manager.close()
    manager = ModelManager(Settings(repo=_repo(tmp_path / "b", version_dir, {"max_batch_prefill_tokens": 64}),
                                    threads=1, instances=1), Metrics())
    await manager.refresh()
    ready, reason = manager.readiness("tiny")
    assert not ready and f"generation.max_batch_prefill_tokens=64 is below max_model_len={CONTEXT}" in reason
    await manager.close()


def test_the_generation_block_is_validated() -> None:
    base = {"name": "m", "task": "generation", "source": "x"}
    config = RepoModelConfig.model_validate({**base, "generation": {}})
    assert config.generation is not None and config.generation.max_num_seqs == 16
    assert config.generation.continuous_batching and config.generation.max_waiting == 256
    with pytest.raises(ValidationError, match="max_kv_tokens=100 is below max_model_len=200"):
        RepoModelConfig.model_validate({**base, "generation": {"max_model_len": 200, "max_kv_tokens": 100}})
    with pytest.raises(ValidationError, match="max_num_seqs"):
        RepoModelConfig.model_validate({**base, "generation": {"max_num_seqs": 0}})
    with pytest.raises(ValidationError, match="only for task 'generation'"):
        RepoModelConfig.model_validate({**base, "task": "matching", "generation": {}})
    with pytest.raises(ValidationError, match="max_batch"):
        RepoModelConfig.model_validate({**base, "generation": {"max_batch": 3}})  # a typo is refused


async def test_a_graph_with_a_fixed_batch_is_refused_naming_the_setting(tmp_path: Path, version_dir: Path) -> None:
    """An export that fixed the batch axis would load, warm up with one sequence and fail the first
    step that batches two: the loader refuses it up front, naming max_num_seqs."""
    import onnx

    fixed = tmp_path / "fixed"
    fixed.mkdir()
    for name in (TOKENIZER_FILE, HEAD_FILE):
        (fixed / name).write_bytes((version_dir / name).read_bytes())
    model = onnx.load(str(version_dir / ONNX_FILE))
    for tensor in model.graph.input:
        tensor.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, str(fixed / ONNX_FILE))
    repo = _repo(tmp_path, fixed, {"max_num_seqs": 4})
    manager = ModelManager(Settings(repo=repo, threads=1, instances=1, retry_failed_s=3600), Metrics())
    await manager.refresh()
    ready, reason = manager.readiness("tiny")
    assert not ready and "batches of exactly 1 rows" in reason and "max_num_seqs=4" in reason
    await manager.close()
