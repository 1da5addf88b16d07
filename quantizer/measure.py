"""Measurements the search decides from: task metrics against FP32, and latency.

Latency is the median of repeated runs after warm-up, on fixed-shape inputs (batch x sequence),
with the session's own threads; PyTorch eager is timed the same way for the side-by-side ratio.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
from tokenizers import Tokenizer

from training.tokenization import configured

Feed = dict[str, np.ndarray]


def tokenize(tokenizer: Tokenizer, texts: list[str], max_length: int, pad_id: int,
             input_names: tuple[str, ...], pairs: list[str] | None = None) -> Feed:
    tok = configured(tokenizer, max_length, pad_id)
    enc = tok.encode_batch(list(zip(texts, pairs)) if pairs else texts)
    feed = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    return {name: feed[name] for name in input_names}


def fixed_shape_feed(tokenizer: Tokenizer, texts: list[str], batch: int, length: int, pad_id: int,
                     input_names: tuple[str, ...]) -> Feed:
    """A (batch, length) feed of real text, repeated as needed and padded to exactly ``length``."""
    tok = configured(tokenizer, length, pad_id)
    tok.enable_padding(pad_id=pad_id, length=length)
    # real words, repeated until they fill the length (then truncated): every row is full length
    chosen = [" ".join([texts[i % len(texts)]] * max(1, length // 4)) for i in range(batch)]
    enc = tok.encode_batch(chosen)
    feed = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    return {name: feed[name] for name in input_names}


def run_batched(run: Callable[[Feed], np.ndarray], feeds: list[Feed]) -> np.ndarray:
    return np.concatenate([run(feed) for feed in feeds])


def session_runner(session: ort.InferenceSession) -> Callable[[Feed], np.ndarray]:
    return lambda feed: session.run(None, feed)[0]


def torch_runner(model: torch.nn.Module, input_names: tuple[str, ...]) -> Callable[[Feed], np.ndarray]:
    def run(feed: Feed) -> np.ndarray:
        with torch.inference_mode():
            return model(**{n: torch.from_numpy(feed[n]) for n in input_names}).numpy()

    return run


def median_ms(run: Callable[[Feed], np.ndarray], feed: Feed, repeats: int = 10, warmup: int = 2) -> float:
    for _ in range(warmup):
        run(feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(feed)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (float scores; ties are negligible)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine, in float64 so that a changed vector never rounds to exactly 1.0."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return (a * b).sum(1)


def retrieval_accuracy(a: np.ndarray, b: np.ndarray) -> float:
    """Bidirectional accuracy@1 of finding row i of ``b`` from row i of ``a`` by cosine, and back (the
    mean of both directions). An absolute score: a quantized plan's drop is FP32's score minus its own."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    scores = a @ b.T
    expected = np.arange(len(a))
    return float(((scores.argmax(1) == expected).mean() + (scores.argmax(0) == expected).mean()) / 2)


@dataclass
class TaskEval:
    """A task metric on fixed inputs. ``score`` compares a candidate's outputs with the FP32
    reference outputs (and the labels, for classification); higher is better."""

    name: str
    feeds: list[Feed]
    pair_split: int | None = None  # matching: rows [:n] are side a, [n:] side b
    labels: np.ndarray | None = None
    retrieval: bool = False  # matching: score translation retrieval instead of Spearman against FP32

    def score(self, outputs: np.ndarray, reference: np.ndarray) -> float:
        if self.labels is not None:
            return float((outputs.argmax(-1) == self.labels).mean())
        n = self.pair_split
        assert n is not None
        if self.retrieval:
            return retrieval_accuracy(outputs[:n], outputs[n:])
        return spearman(cosine_rows(outputs[:n], outputs[n:]), cosine_rows(reference[:n], reference[n:]))

    def cosine_to_reference(self, outputs: np.ndarray, reference: np.ndarray) -> float:
        """Mean cosine of each output row to its FP32 row (embeddings); 1.0 for identical."""
        return float(cosine_rows(outputs, reference).mean())


def metric_name(task: str, matching_metric: str) -> str:
    """The task metric a SAMP report names: accuracy, or a matching metric."""
    if task == "classification":
        return "accuracy"
    return "retrieval_acc@1" if matching_metric == "retrieval" else "spearman_vs_fp32"


def keeps_budget(fp32_metric: float, metric: float, cosine: float | None, max_drop: float,
                 min_cosine: float | None) -> bool:
    """A plan's metric within ``max_drop`` of FP32's (and, for embeddings, its mean cosine to FP32 at least
    ``min_cosine``)."""
    ok = fp32_metric - metric <= max_drop + 1e-12
    if min_cosine is not None and cosine is not None:
        ok = ok and cosine >= min_cosine
    return ok


def batch_invariance(alone: np.ndarray, together: np.ndarray, task: str, min_batch_cosine: float) -> tuple[float, bool]:
    """The lowest cosine between each input's output alone and inside a batch, and whether that meets
    ``min_batch_cosine`` (classification also needs the same top-1)."""
    cosine = float(cosine_rows(alone, together).min())
    same_top1 = task != "classification" or bool((alone.argmax(-1) == together.argmax(-1)).all())
    return cosine, cosine >= min_batch_cosine and same_top1
