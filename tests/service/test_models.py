"""The model manager in-process: instances per version from config.json (each a real onnxruntime
session), load-time checks, retries with back-off, and the metric labels it allows."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
from prometheus_client import generate_latest

from service.metrics import Metrics
from service.models import ModelManager
from service.repository import MODEL_CONFIG_FILE
from service.settings import Settings


async def test_config_instances_override_the_setting_and_all_serve(repo: Path, tmp_path: Path) -> None:
    shutil.copytree(repo / "emb", tmp_path / "emb")
    config = json.loads((tmp_path / "emb" / MODEL_CONFIG_FILE).read_text())
    config["batching"].update(instances=3, max_batch_size=1)
    (tmp_path / "emb" / MODEL_CONFIG_FILE).write_text(json.dumps(config))
    manager = ModelManager(Settings(repo=tmp_path, instances=1, threads=1), Metrics())
    await manager.refresh()
    loaded = manager.get("emb")
    assert len(loaded.pool.runtimes) == 3 and loaded.batcher.concurrency == 3
    texts = [f"message number {i} could not be opened" for i in range(9)]
    head = loaded.head
    rows = await asyncio.gather(*(loaded.run(head.encode([t]), None) for t in texts))
    alone = np.concatenate([loaded.pool.runtimes[0].run(head.collate(head.encode([t]))) for t in texts])
    np.testing.assert_allclose(np.concatenate(rows), alone, atol=1e-5)  # every instance computes the same
    await manager.close()


async def test_setting_gives_the_default_instance_count(repo: Path) -> None:
    manager = ModelManager(Settings(repo=repo, instances=1, threads=1), Metrics())
    await manager.refresh()
    assert len(manager.get("topics").pool.runtimes) == 1
    await manager.close()


def _copy_model(repo: Path, tmp_path: Path, name: str = "emb") -> Path:
    shutil.copytree(repo / name, tmp_path / name)
    return tmp_path / name


async def test_a_token_budget_below_the_models_length_is_refused_at_load_with_the_setting(repo, tmp_path):
    model = _copy_model(repo, tmp_path)
    config = json.loads((model / MODEL_CONFIG_FILE).read_text())
    config["batching"]["max_batch_tokens"] = 16  # the model takes up to 128 tokens per input
    (model / MODEL_CONFIG_FILE).write_text(json.dumps(config))
    manager = ModelManager(Settings(repo=tmp_path, instances=1, threads=1), Metrics())
    await manager.refresh()
    ready, reason = manager.readiness("emb")
    assert not ready and "max_batch_tokens=16 is below the model's max_length=128" in reason
    await manager.close()


async def test_a_failed_version_is_tried_again_with_back_off_and_loads_once_fixed(repo, tmp_path):
    model = _copy_model(repo, tmp_path)
    onnx = model / "1" / "model.onnx"
    original = onnx.read_bytes()
    onnx.write_bytes(original[:-16] + b"\0" * 16)  # no longer matches its manifest
    manager = ModelManager(Settings(repo=tmp_path, instances=1, threads=1, retry_failed_s=0.3), Metrics())
    await manager.refresh()
    state = manager.models["emb"]
    assert not state.versions and state.failed[1].attempts == 1 and "sha256" in state.reason()
    await manager.refresh()  # before the retry is due: not tried again
    assert state.failed[1].attempts == 1
    await asyncio.sleep(0.35)
    await manager.refresh()  # due, still broken: the wait doubles
    assert state.failed[1].attempts == 2
    onnx.write_bytes(original)
    await manager.refresh()  # fixed, but the doubled wait (0.6 s) has not passed
    assert not state.versions
    await asyncio.sleep(0.65)
    await manager.refresh()
    assert list(state.versions) == [1] and not state.failed and manager.readiness("emb") == (True, "")
    await manager.close()


async def test_metrics_label_only_served_models_and_drop_unloaded_versions(repo, tmp_path):
    from service.repository import publish

    model = _copy_model(repo, tmp_path)
    metrics = Metrics()
    manager = ModelManager(Settings(repo=tmp_path, instances=1, threads=1), metrics)
    await manager.refresh()
    assert metrics.labels("emb", 1) == ("emb", "1") and metrics.labels("emb", None) == ("emb", "")
    assert metrics.labels("x" * 10_000, "7") == ("_unknown", "_unknown")
    assert metrics.labels("emb", "9" * 1000) == ("emb", "_unknown")
    metrics.observe_request("emb", 1, "infer", "ok", 0.0)
    publish(model, {p.name: p for p in (model / "1").iterdir() if p.name != "manifest.json"})  # version 2
    await manager.refresh()
    exposed = generate_latest(metrics.registry).decode()
    assert 'version="2"' in exposed and 'version="1"' not in exposed  # every series of version 1 is gone
    await manager.close()


async def test_a_model_without_versions_is_logged_once_not_at_every_poll(repo, tmp_path, caplog):
    import logging
    import shutil

    from service.metrics import Metrics
    from service.models import ModelManager
    from service.settings import Settings

    (tmp_path / "emb").mkdir()
    shutil.copy(repo / "emb" / "config.json", tmp_path / "emb" / "config.json")
    manager = ModelManager(Settings(repo=tmp_path, instances=1, threads=1), Metrics())
    with caplog.at_level(logging.WARNING, logger="sampserve"):
        for _ in range(3):
            await manager.refresh()
    said = [r.getMessage() for r in caplog.records if "no version published yet" in r.getMessage()]
    assert len(said) == 1 and "sampserve up" in said[0]
    await manager.close()
