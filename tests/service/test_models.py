"""The model manager in-process: instances per version from config.json, each a real onnxruntime session."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np

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
