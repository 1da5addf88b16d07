"""Score a peer's quantized graph on SAMP's dev data (called by the peers' tuner for each trial).

    python bench/peer_score.py MODEL.onnx eval.npz      # prints the dev metric

The peers run in their own environment (bench/peers/requirements.txt); the metric stays this
project's one implementation (quantizer.measure.TaskEval), reached through this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from quantizer.engines import ort_session  # noqa: E402
from quantizer.measure import Feed, TaskEval, run_batched, session_runner  # noqa: E402


def save_feeds(feeds: list[Feed], path: Path) -> Path:
    np.savez(path, **{f"{i}/{name}": array for i, feed in enumerate(feeds) for name, array in feed.items()})
    return path


def _feeds(data: np.lib.npyio.NpzFile, prefix: str = "") -> list[Feed]:
    batches: dict[int, Feed] = {}
    for key in data.files:
        if key.startswith(prefix) and "/" in key[len(prefix):]:
            index, name = key[len(prefix):].split("/", 1)
            batches.setdefault(int(index), {})[name] = data[key]
    return [batches[i] for i in sorted(batches)]


def save_eval(evaluation: TaskEval, reference: np.ndarray, path: Path) -> Path:
    arrays = {f"feed/{i}/{name}": a for i, feed in enumerate(evaluation.feeds) for name, a in feed.items()}
    arrays["reference"] = reference
    arrays["pair_split"] = np.array(-1 if evaluation.pair_split is None else evaluation.pair_split)
    arrays["retrieval"] = np.array(evaluation.retrieval)
    if evaluation.labels is not None:
        arrays["labels"] = evaluation.labels
    np.savez(path, **arrays)
    return path


def load_eval(path: Path) -> tuple[TaskEval, np.ndarray]:
    data = np.load(path)
    split = int(data["pair_split"])
    evaluation = TaskEval(name="dev", feeds=_feeds(data, "feed/"), pair_split=None if split < 0 else split,
                          labels=data["labels"] if "labels" in data.files else None,
                          retrieval=bool(data["retrieval"]))
    return evaluation, data["reference"]


def score(model: Path, eval_path: Path, threads: int | None = None) -> float:
    evaluation, reference = load_eval(eval_path)
    outputs = run_batched(session_runner(ort_session(model, threads)), evaluation.feeds)
    return evaluation.score(outputs, reference)


if __name__ == "__main__":
    print(score(Path(sys.argv[1]), Path(sys.argv[2])))
