"""Publish refuses what the server could not serve, before writing anything; head.json is the schema's."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from quantizer.publish import NotServable, publish_fp32, publish_result, served_head, served_task
from service.heads import HEADS
from service.repository import HEAD_FILE, MODEL_CONFIG_FILE, HeadMeta, load_head
from training.checkpoint import HeadInfo


def _checkpoint(task: str, labels: list[str] | None = None, normalize: bool = False) -> SimpleNamespace:
    """What publish reads of a checkpoint before any weights are touched."""
    return SimpleNamespace(head=HeadInfo(task=task, labels=labels, max_length=64), path=Path("ckpt"),
                           config=SimpleNamespace(pad_token_id=0, modality="text",
                                                  target=SimpleNamespace(normalize=normalize)))


def _unwritten(repo: Path) -> bool:
    return not repo.exists() or not any(repo.rglob("*"))


def test_served_tasks_are_the_servers_heads(tmp_path: Path) -> None:
    assert served_task(tmp_path / "m", _checkpoint("matching")) == "matching"
    assert served_task(tmp_path / "m", _checkpoint("classification")) == "classification"
    assert served_task(tmp_path / "m", _checkpoint("lm")) == "generation"  # causal LMs publish as generators
    assert {"matching", "classification", "generation"} <= set(HEADS)


@pytest.mark.parametrize("task", ["seq2seq", "mlm", "pair_classification"])
def test_publish_refuses_a_task_without_a_server_head_before_writing(tmp_path: Path, task: str) -> None:
    repo = tmp_path / "repo"
    samp = SimpleNamespace(checkpoint=_checkpoint(task), settings=SimpleNamespace(max_drop=0.01))
    with pytest.raises(NotServable, match=rf"no head for task '{task}'") as info:
        publish_result(samp, None, repo, "gen")  # refused before the result is read
    assert all(name in str(info.value) for name in HEADS) and "Nothing was published" in str(info.value)
    with pytest.raises(NotServable):
        publish_fp32(samp.checkpoint, repo, "gen", tmp_path / "work")  # refused before exporting
    assert _unwritten(repo) and not (tmp_path / "work").exists()


def test_publish_refuses_a_task_other_than_the_committed_one(tmp_path: Path) -> None:
    model_dir = tmp_path / "repo" / "topics"
    model_dir.mkdir(parents=True)
    committed = json.dumps({"name": "topics", "task": "matching", "source": "x"})
    (model_dir / MODEL_CONFIG_FILE).write_text(committed)
    samp = SimpleNamespace(checkpoint=_checkpoint("classification", ["a"]), settings=SimpleNamespace(max_drop=0.01))
    with pytest.raises(NotServable, match=r"config\.json: task 'matching', but the checkpoint is a classification"):
        publish_result(samp, None, tmp_path / "repo", "topics")
    assert [p.name for p in model_dir.iterdir()] == [MODEL_CONFIG_FILE]
    assert (model_dir / MODEL_CONFIG_FILE).read_text() == committed


def test_head_json_holds_what_the_server_reads(tmp_path: Path) -> None:
    info = SimpleNamespace(input_names=("input_ids", "attention_mask"), output_name="logits")
    head = served_head(_checkpoint("classification", ["x", "y"]), info)
    (tmp_path / HEAD_FILE).write_bytes(head.to_json())
    assert load_head(tmp_path) == HeadMeta(input_names=["input_ids", "attention_mask"], max_length=64,
                                           pad_token_id=0, labels=["x", "y"], normalized=False)
    embedder = served_head(_checkpoint("matching", normalize=True), info)
    assert embedder.normalized and "labels" not in json.loads(embedder.to_json())
    assert "disabled_optimizers" not in json.loads(embedder.to_json())  # onnxruntime's defaults
    tuned = served_head(_checkpoint("matching"), info, ["SkipLayerNormFusion"])
    (tmp_path / HEAD_FILE).write_bytes(tuned.to_json())
    assert load_head(tmp_path).disabled_optimizers == ["SkipLayerNormFusion"]
