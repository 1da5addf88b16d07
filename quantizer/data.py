"""SAMP's data: disjoint calibration, dev (plan choice) and test (never seen by the search) parts,
tokenized (an image or audio model's: prepared by its own processor) once into the feeds every candidate is run on."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quantizer.measure import Feed, TaskEval, fixed_shape_feed, tokenize
from quantizer.schemas import SampSettings
from training.checkpoint import Checkpoint


INVARIANCE_TEXTS = 24
INVARIANCE_BATCH = 8


@dataclass
class SampData:
    """Texts for calibration, dev (plan choice) and test (never seen by the search)."""

    dev: TaskEval
    test: TaskEval
    calibration: list[Feed]
    latency: Callable[[int, int], Feed]
    """A (batch, length) feed of real inputs for timing (an image model's length is its patch count)."""
    alone: list[Feed]
    """Dev texts one per feed, each at its own length: the batch-invariance reference."""
    together: list[Feed]
    """The same texts in batches of mixed lengths (padded to each batch's longest), in the same order."""


def build_data(checkpoint: Checkpoint, records: list[dict], input_names: tuple[str, ...], settings: SampSettings,
               seed: int = 0, batch: int = 32) -> SampData:
    """Split ``records`` into disjoint calibration, dev and test parts and tokenize them.

    Matching uses pairs (``text_a``/``text_b``, or random pairs of ``text``); classification uses
    ``text`` (+ ``text_pair``) with ``label``."""
    rows = list(records)
    random.Random(seed).shuffle(rows)
    head = checkpoint.head
    max_length = min(head.max_length, settings.sequence_length)
    pad = checkpoint.config.pad_token_id
    third = min(len(rows) // 3, settings.max_examples)
    if third < 8:
        raise ValueError(f"SAMP needs at least 24 records to split into calibration/dev/test, got {len(rows)}")
    calib_rows, dev_rows, test_rows = rows[:third], rows[third : 2 * third], rows[2 * third : 3 * third]
    if checkpoint.config.modality != "text":
        return _tensor_data(checkpoint, calib_rows, dev_rows, test_rows, settings, batch)

    prefix = head.text_prefix  # e5-style models expect "query: " before every text

    def texts(part: list[dict]) -> list[str]:
        return [prefix + (r.get("text") or r.get("text_a") or "") for r in part]

    def task_eval(part: list[dict], name: str) -> TaskEval:
        if head.task == "classification":
            labels = np.array([head.labels.index(str(r["label"])) for r in part])  # type: ignore[union-attr]
            pairs = [r["text_pair"] for r in part] if "text_pair" in part[0] else None
            feeds = [tokenize(checkpoint.text_tokenizer, texts(part[i:i + batch]), max_length, pad, input_names,
                              pairs[i:i + batch] if pairs else None) for i in range(0, len(part), batch)]
            return TaskEval(name=name, feeds=feeds, labels=labels)
        retrieval = settings.matching_metric == "retrieval"
        if retrieval and "text_b" not in part[0]:
            raise ValueError("the retrieval metric needs pairs: records with text_a and text_b")
        if "text_b" in part[0]:
            side_a, side_b = texts(part), [prefix + r["text_b"] for r in part]
        else:
            pool = texts(part)
            rng = random.Random(f"{seed}/{name}")
            side_a, side_b = pool, [pool[rng.randrange(len(pool))] for _ in pool]
        feeds = [tokenize(checkpoint.text_tokenizer, side_a[i:i + batch], max_length, pad, input_names)
                 for i in range(0, len(side_a), batch)]
        feeds += [tokenize(checkpoint.text_tokenizer, side_b[i:i + batch], max_length, pad, input_names)
                  for i in range(0, len(side_b), batch)]
        return TaskEval(name=name, feeds=feeds, pair_split=len(side_a), retrieval=retrieval)

    calib_texts = texts(calib_rows)
    per_batch = max(1, len(calib_texts) // settings.calibration_batches)
    calibration = [
        fixed_shape_feed(checkpoint.text_tokenizer, calib_texts[i * per_batch:(i + 1) * per_batch], per_batch,
                         max_length, pad, input_names)
        for i in range(settings.calibration_batches)
    ]
    mixed = texts(dev_rows)[:INVARIANCE_TEXTS]
    alone = [tokenize(checkpoint.text_tokenizer, [t], max_length, pad, input_names) for t in mixed]
    together = [tokenize(checkpoint.text_tokenizer, mixed[i:i + INVARIANCE_BATCH], max_length, pad, input_names)
                for i in range(0, len(mixed), INVARIANCE_BATCH)]
    def latency(batch_size: int, length: int) -> Feed:
        return fixed_shape_feed(checkpoint.text_tokenizer, calib_texts, batch_size, length, pad, input_names)

    return SampData(dev=task_eval(dev_rows, "dev"), test=task_eval(test_rows, "test"),
                    calibration=calibration, latency=latency, alone=alone, together=together)


def _tensor_data(checkpoint: Checkpoint, calib_rows: list[dict], dev_rows: list[dict], test_rows: list[dict],
                 settings: SampSettings, batch: int) -> SampData:
    """An image or audio model's parts: the records' files through the checkpoint's own processor."""
    from training.jobs import tensor_inputs
    from training.model import MODEL_INPUTS

    head = checkpoint.head
    if head.task != "classification" or not head.labels:
        raise ValueError(f"SAMP measures tensor models on labelled inputs (classification), not {head.task!r}")
    if checkpoint.preprocessor is None:
        raise ValueError(f"an {checkpoint.config.modality} checkpoint needs its preprocessor config")
    name = MODEL_INPUTS[checkpoint.config.modality]
    prepare = tensor_inputs(checkpoint.config, checkpoint.preprocessor)

    def values(part: list[dict]) -> np.ndarray:
        return np.concatenate([prepare(part[i:i + batch])[name].numpy() for i in range(0, len(part), batch)])

    def task_eval(part: list[dict], rows: np.ndarray, split: str) -> TaskEval:
        labels = np.array([head.labels.index(str(r["label"])) for r in part])  # type: ignore[union-attr]
        return TaskEval(name=split, feeds=[{name: rows[i:i + batch]} for i in range(0, len(rows), batch)],
                        labels=labels)

    calibration_rows = values(calib_rows)
    per_batch = max(1, len(calibration_rows) // settings.calibration_batches)

    def calibration_batch(index: int) -> np.ndarray:
        """The index-th slice; fewer rows than batches: the rows repeated to one batch."""
        rows = calibration_rows[index * per_batch:(index + 1) * per_batch]
        return rows if len(rows) == per_batch else np.resize(calibration_rows, (per_batch, *rows.shape[1:]))

    calibration = [{name: calibration_batch(i)} for i in range(settings.calibration_batches)]
    dev_values = values(dev_rows)
    mixed = dev_values[:INVARIANCE_TEXTS]  # the batch-invariance inputs: dev's first, prepared once

    def latency(batch_size: int, length: int) -> Feed:
        return {name: np.resize(calibration_rows, (batch_size, *calibration_rows.shape[1:]))}

    return SampData(dev=task_eval(dev_rows, dev_values, "dev"), test=task_eval(test_rows, values(test_rows), "test"),
                    calibration=calibration, latency=latency, alone=[{name: mixed[i:i + 1]} for i in range(len(mixed))],
                    together=[{name: mixed[i:i + INVARIANCE_BATCH]} for i in range(0, len(mixed), INVARIANCE_BATCH)])
