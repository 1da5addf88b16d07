"""Task data: read JSONL/TSV records and collate them into the batches each target's loss takes.

Record fields per task (the same names in JSONL keys and TSV header columns):

=====================  ============================================================
mlm, lm                ``text``  (lm also takes ``prompt`` + ``completion``)
seq2seq                ``source``, ``target``
classification         ``text`` [, ``text_pair``], ``label``; an image (audio) model: ``image``
                       (``audio``: a WAV file) path, relative to the data file's folder, ``label``
pair_classification    ``text_a``, ``text_b``, ``label``
matching               ``text_a``, ``text_b`` (a positive pair; other rows are negatives)
=====================  ============================================================
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from training.components.targets import IGNORE
from training.tokenization import encode

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "mlm": ("text",),
    "lm": ("text",),
    "seq2seq": ("source", "target"),
    "classification": ("text", "label"),
    "pair_classification": ("text_a", "text_b", "label"),
    "matching": ("text_a", "text_b"),
}


def read_records(path: Path) -> list[dict]:
    """JSONL (one object a line) or TSV with a header row; the suffix decides. A record's ``image``
    or ``audio`` (a file path) is relative to the data file's folder, so a data set moves as one folder."""
    path = Path(path)
    return [_resolved(r, path.parent) for r in _read(path)]


def _resolved(record: dict, root: Path) -> dict:
    for key in ("image", "audio"):
        if isinstance(record.get(key), str):
            record[key] = str(root / record[key])
    return record


def _read(path: Path) -> list[dict]:
    if path.suffix in (".tsv", ".tab"):
        with open(path, newline="", encoding="utf-8") as f:
            return [dict(row) for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    if path.suffix in (".jsonl", ".json"):
        records = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{number}: not valid JSON: {exc.msg}") from None
        return records
    raise ValueError(f"{path}: expected a .jsonl or .tsv file")


TENSOR_FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    "image": {"classification": ("image", "label")},
    "audio": {"classification": ("audio", "label")},
}
"""The fields of each task a tensor model trains on, by modality."""


def validate_records(records: list[dict], task: str, source: str = "data", modality: str = "text") -> None:
    if not records:
        raise ValueError(f"{source}: no records")
    tasks = TENSOR_FIELDS.get(modality, REQUIRED_FIELDS)
    if task not in tasks:
        raise ValueError(f"{source}: task {task!r} takes text; {modality} models train on {sorted(tasks)}")
    required = tasks[task]
    if task == "lm" and "prompt" in records[0]:
        required = ("prompt", "completion")
    for number, record in enumerate(records, 1):
        missing = [name for name in required if name not in record]
        if missing:
            raise ValueError(f"{source}: record {number} lacks {missing} needed for task {task!r}")


def label_names(records: list[dict]) -> list[str]:
    """Sorted label names, so the label index does not depend on record order."""
    return sorted({str(r["label"]) for r in records})


@dataclass
class Collator:
    """Turns a list of records into the tensors of one batch for ``task``."""

    task: str
    tokenizer: Tokenizer | None
    pad_id: int
    labels: list[str] | None = None
    mask_id: int | None = None
    special_ids: set[int] = field(default_factory=set)
    vocab_size: int = 0
    eos_id: int | None = None
    decoder_start_id: int = 0
    mlm_probability: float = 0.15
    seed: int = 0
    tensor_inputs: Callable[[list[dict]], dict[str, torch.Tensor]] | None = None
    """An image or audio model's records -> its input tensors (training.jobs.tensor_inputs); None for text."""

    def __call__(self, records: list[dict], indices: list[int], epoch: int) -> dict:
        return COLLATE[self.task](self, records, indices, epoch)

    def label_tensor(self, records: list[dict]) -> torch.Tensor:
        assert self.labels is not None
        index = {name: i for i, name in enumerate(self.labels)}
        try:
            return torch.tensor([index[str(r["label"])] for r in records], dtype=torch.long)
        except KeyError as exc:
            raise ValueError(f"label {exc.args[0]!r} is not one of the model's labels {self.labels}") from None


def _classification(c: Collator, records: list[dict], indices: list[int], epoch: int) -> dict:
    if c.tensor_inputs is not None:
        return {**c.tensor_inputs(records), "labels": c.label_tensor(records)}
    pairs = [r["text_pair"] for r in records] if "text_pair" in records[0] else None
    batch = encode(c.tokenizer, [r["text"] for r in records], pairs)
    batch["labels"] = c.label_tensor(records)
    return batch


def _pair_classification(c: Collator, records: list[dict], indices: list[int], epoch: int) -> dict:
    return {
        "a": encode(c.tokenizer, [r["text_a"] for r in records]),
        "b": encode(c.tokenizer, [r["text_b"] for r in records]),
        "labels": c.label_tensor(records),
    }


def _matching(c: Collator, records: list[dict], indices: list[int], epoch: int) -> dict:
    return {
        "a": encode(c.tokenizer, [r["text_a"] for r in records]),
        "b": encode(c.tokenizer, [r["text_b"] for r in records]),
    }


def _mlm(c: Collator, records: list[dict], indices: list[int], epoch: int) -> dict:
    """BERT masking (80% [MASK], 10% random, 10% kept). Each example's mask is seeded by its index
    and the epoch, so it is the same whichever rank or micro-batch the example lands in."""
    if c.mask_id is None:
        raise ValueError("task 'mlm' needs a tokenizer with a mask token ([MASK] or <mask>)")
    batch = encode(c.tokenizer, [r["text"] for r in records])
    ids = batch["input_ids"]
    labels = torch.full_like(ids, IGNORE)
    for row, index in enumerate(indices):
        rng = random.Random(f"{c.seed}/{epoch}/{index}")
        for col in range(ids.shape[1]):
            token = int(ids[row, col])
            if batch["attention_mask"][row, col] == 0 or token in c.special_ids:
                continue
            if rng.random() >= c.mlm_probability:
                continue
            labels[row, col] = token
            roll = rng.random()
            if roll < 0.8:
                ids[row, col] = c.mask_id
            elif roll < 0.9:
                ids[row, col] = rng.randrange(c.vocab_size)
    batch["labels"] = labels
    return batch


def _lm(c: Collator, records: list[dict], indices: list[int], epoch: int) -> dict:
    """Causal LM; with prompt/completion records only the completion is scored (generation
    fine-tuning)."""
    if "prompt" in records[0]:
        prompts = [r["prompt"] for r in records]
        texts = [r["prompt"] + r["completion"] for r in records]
    else:
        prompts, texts = None, [r["text"] for r in records]
    encodings = [c.tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    if c.eos_id is not None:
        encodings = [ids + [c.eos_id] for ids in encodings]
    limit = c.tokenizer.truncation["max_length"] if c.tokenizer.truncation else None
    if limit:
        encodings = [ids[:limit] for ids in encodings]
    length = max(len(ids) for ids in encodings)
    input_ids = torch.full((len(texts), length), c.pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE)
    for row, ids in enumerate(encodings):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(ids)
        if prompts is not None:
            prompt_length = len(c.tokenizer.encode(prompts[row], add_special_tokens=False).ids)
            labels[row, :prompt_length] = IGNORE
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _seq2seq(c: Collator, records: list[dict], indices: list[int], epoch: int) -> dict:
    batch = encode(c.tokenizer, [r["source"] for r in records])
    targets = [c.tokenizer.encode(r["target"], add_special_tokens=False).ids for r in records]
    if c.eos_id is not None:
        targets = [ids + [c.eos_id] for ids in targets]
    length = max(len(ids) for ids in targets)
    labels = torch.full((len(records), length), IGNORE, dtype=torch.long)
    decoder_input = torch.full((len(records), length), c.pad_id, dtype=torch.long)
    decoder_mask = torch.zeros_like(decoder_input)
    for row, ids in enumerate(targets):
        labels[row, : len(ids)] = torch.tensor(ids)
        shifted = [c.decoder_start_id] + ids[:-1]  # teacher forcing: predict token t from tokens < t
        decoder_input[row, : len(ids)] = torch.tensor(shifted)
        decoder_mask[row, : len(ids)] = 1
    batch.pop("token_type_ids")
    batch.update(decoder_input_ids=decoder_input, decoder_attention_mask=decoder_mask, labels=labels)
    return batch


COLLATE: dict[str, Callable[[Collator, list[dict], list[int], int], dict]] = {
    "classification": _classification,
    "pair_classification": _pair_classification,
    "matching": _matching,
    "mlm": _mlm,
    "lm": _lm,
    "seq2seq": _seq2seq,
}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}
