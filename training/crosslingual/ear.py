"""EAR: zero-shot cross-lingual transfer with Embedding-Push, Attention-Pull and Robust targets.

An English-only classifier is fine-tuned so that it also reads other languages. Each English message x
has synonym-perturbed copies x' (:mod:`training.crosslingual.synonyms`); one training row is (x, x', y) and
the loss is

    L = CE(x, y) [+ CE(x', y)]                                  Robust targets: x' keeps x's label
        - alpha * MSE(meanpool E0(x), meanpool E0(x'))          Embedding-Push: spread the English inputs
        + beta  * MSE(Attn_l(x'), Attn_l(x))                     Attention-Pull: keep what the model reads

with E0 the embedding layer's output and Attn_l layer l's attention probabilities, both from the same
forward pass as the logits (``Model.encode(attention_layer=l)``). x and x' run as one batch padded to a
common length. Each part switches on and off on its own; all off is plain English fine-tuning (the
baseline), which forwards x only.

Choices the method leaves open (docs/crosslingual.md): the attention MSE is averaged over the query/key
positions real in both x and x' (the released code compares whole maps padded to 128 tokens, so its
average depends on the padding length); the maps are taken before attention dropout; the classifier pools
like the encoder was trained to (mean for e5) instead of a [CLS] head.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from training.checkpoint import Checkpoint, HeadInfo, load_checkpoint
from training.components.layers import masked_mean
from training.crosslingual.embeddings import encode_several
from training.crosslingual.metrics import bidirectional_retrieval
from training.crosslingual.transfer_data import read_jsonl
from training.model import Model, _init_weights
from training.jobs import with_target
from training.tokenization import configured, encode
from training.trainer import STATE_DIR, Trainer, TrainSettings

__all__ = ["EarObjective", "EarSettings", "alignment", "evaluate_transfer", "reinitialise_from", "train_ear"]

METRICS_FILE = "metrics.json"
ALIGNMENT_PAIRS = 1000  # translation pairs per language for retrieval (the first, in file order)


class EarSettings(BaseModel):
    """One EAR (or baseline) run; the defaults are the method's released settings except the learning rate
    (2e-5 was for runs a hundred times longer; 1e-4 was chosen on English dev for the 300-step baseline)."""

    model_config = ConfigDict(extra="forbid")

    start: Path = Field(description="Our checkpoint to fine-tune (an encoder; its head is replaced).")
    data: Path = Field(description="build_transfer_data's folder.")
    robust_targets: bool = True
    embedding_push: bool = True
    attention_pull: bool = True
    alpha: float = Field(0.1, ge=0, description="Weight of the Embedding-Push term.")
    beta: float = Field(1.0, ge=0, description="Weight of the Attention-Pull term.")
    layer: int = Field(5, ge=0, description="Attention-Pull's layer, 0-based.")
    reinit_from: int | None = Field(None, ge=0, description="Re-initialise the encoder layers from this index on "
                                                            "(a less aligned start).")
    reinit_seed: int = Field(0, description="Seed of the re-initialised layers: one fixed start for all runs.")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    max_length: int = Field(64, ge=8)
    seed: int = 7
    precision: str = "bf16"
    languages: list[str] | None = Field(None, description="Target languages to test (default: all in the data).")
    keep_checkpoint: bool = False

    @property
    def paired(self) -> bool:
        """Whether a step needs the perturbed copy at all."""
        return self.robust_targets or self.embedding_push or self.attention_pull

    def label(self) -> str:
        if not self.paired:
            return "baseline"
        parts = [name for name, on in (("RT", self.robust_targets), ("EP", self.embedding_push),
                                       ("AP", self.attention_pull)) if on]
        return "+".join(parts)


class EarCollator:
    """Rows (x, x', y) -> one batch: x's rows then x''s, padded to a common length, and the labels."""

    def __init__(self, tokenizer, pad_id: int, labels: list[str], prefix: str, paired: bool) -> None:
        self.tokenizer, self.pad_id, self.prefix, self.paired = tokenizer, pad_id, prefix, paired
        self.index = {name: i for i, name in enumerate(labels)}

    def __call__(self, records: list[dict], indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        texts = [self.prefix + r["text"] for r in records]
        if self.paired:
            texts += [self.prefix + r["perturbed"] for r in records]
        batch = encode(self.tokenizer, texts)
        batch["labels"] = torch.tensor([self.index[r["label"]] for r in records], dtype=torch.long)
        return batch


class EarModule(nn.Module):
    """The classifier's forward, returning the logits with the embedding output and one layer's attention."""

    def __init__(self, model: Model, layer: int | None) -> None:
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        out = self.model.encode(input_ids, attention_mask, token_type_ids, attention_layer=self.layer)
        return self.model.target(out.hidden, attention_mask), out.embedded, out.attention


def embedding_push(embedded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between the mean-pooled embedding outputs of x (first half of the rows) and x' (second half)."""
    count = embedded.shape[0] // 2
    pooled = masked_mean(embedded.float(), mask)
    return F.mse_loss(pooled[count:], pooled[:count])


def attention_pull(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between x''s and x's attention maps over the query/key positions real in both."""
    count = attention.shape[0] // 2
    both = (mask[:count] * mask[count:]).float()  # (B, T)
    weight = (both[:, :, None] * both[:, None, :]).unsqueeze(1)  # (B, 1, T, T)
    squared = (attention[count:].float() - attention[:count].float()).pow(2) * weight
    return squared.sum() / (weight.sum() * attention.shape[1]).clamp(min=1)


class EarObjective:
    """The trainer's objective: the EAR loss with each part switchable (see the module docstring)."""

    def __init__(self, model: Model, settings: EarSettings) -> None:
        if settings.attention_pull and settings.layer >= model.config.encoder.num_layers:
            raise ValueError(f"layer {settings.layer} is beyond the encoder's "
                             f"{model.config.encoder.num_layers} layers")
        self.settings = settings
        self.module = EarModule(model, settings.layer if settings.attention_pull else None)

    def inputs(self, batch: dict) -> dict[str, Any]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def loss(self, output: tuple, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits, embedded, attention = output
        s, labels, mask = self.settings, batch["labels"], batch["attention_mask"]
        count = labels.shape[0]
        original = F.cross_entropy(logits[:count].float(), labels)
        loss = original
        accuracy = logits[:count].argmax(-1).eq(labels).float().mean()
        metrics = {"ce": float(original.detach()), "accuracy": float(accuracy)}
        if s.robust_targets:
            perturbed = F.cross_entropy(logits[count:].float(), labels)
            loss = loss + perturbed
            metrics["ce_perturbed"] = float(perturbed.detach())
        if s.embedding_push:
            push = embedding_push(embedded, mask)
            loss = loss - s.alpha * push
            metrics["push"] = float(push.detach())
        if s.attention_pull:
            pull = attention_pull(attention, mask)
            loss = loss + s.beta * pull
            metrics["pull"] = float(pull.detach())
        return loss, metrics


def reinitialise_from(model: Model, first: int, seed: int = 0) -> None:
    """Draw fresh weights (BERT's init, from ``seed``) for encoder layers ``first`` and up: the less aligned
    starting point, the same for every run that names the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in list(model.encoder.layers)[first:]:
            layer.apply(_init_weights)


def _records(data: Path) -> list[dict]:
    """One row per (message, perturbed copy), each with its token length for length grouping."""
    rows = []
    for r in read_jsonl(data / "train.jsonl"):
        for copy in r["perturbed"]:
            rows.append({"text": r["text"], "perturbed": copy, "label": r["label"],
                         "length": len(r["text"]) + len(copy)})
    return rows


def test_languages(data: Path, wanted: list[str] | None) -> list[str]:
    found = sorted(p.name[len("test."):-len(".jsonl")] for p in Path(data).glob("test.*.jsonl"))
    found = [lang for lang in found if lang != "en"]
    return [lang for lang in found if lang in wanted] if wanted else found


def alignment(checkpoint: Checkpoint, data: Path, languages: list[str], max_length: int = 64,
              vectors: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, dict[str, float]]:
    """Per language: translation retrieval acc@1 (both directions) and the mean cosine of the parallel test
    messages' mean-pooled final states, over the first ``ALIGNMENT_PAIRS`` pairs. ``vectors`` holds pooled
    states already computed by :func:`evaluate_transfer` (test file name -> outputs), in file order."""
    vectors = dict(vectors or {})
    prefix = checkpoint.head.text_prefix

    def pooled(name: str, texts: list[str]) -> np.ndarray:
        if name not in vectors:
            vectors[name] = encode_several(checkpoint, texts, ("pooled",), 128, max_length, prefix)
        return vectors[name]["pooled"]

    english = read_jsonl(Path(data) / "test.en.jsonl")
    row_of = {r["text"]: i for i, r in enumerate(english)}
    en_all = pooled("en", [r["text"] for r in english])
    unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)  # noqa: E731
    result = {}
    for lang in languages:
        rows = read_jsonl(Path(data) / f"test.{lang}.jsonl")
        x = pooled(lang, [r["text"] for r in rows])[:ALIGNMENT_PAIRS]
        en = en_all[[row_of[r["en"]] for r in rows[:ALIGNMENT_PAIRS]]]
        result[lang] = {"retrieval": bidirectional_retrieval(en, x),
                        "cosine": float((unit(en) * unit(x)).sum(1).mean()), "n": len(x)}
    return result


def evaluate_transfer(checkpoint: Checkpoint, data: Path, languages: list[str], max_length: int = 64,
                      bf16: bool = False) -> dict[str, Any]:
    """Accuracy on English dev and test and on every target language's test (with each example's hit, for
    paired bootstraps), and the alignment measure. ``bf16`` runs under bfloat16 autocast (twice as fast
    on CPUs with AVX-512 BF16), as training did."""
    labels = checkpoint.head.labels or []
    index = {name: i for i, name in enumerate(labels)}
    result: dict[str, Any] = {"accuracy": {}, "hits": {}}
    vectors: dict[str, dict[str, np.ndarray]] = {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for name in ("dev", "test.en", *(f"test.{lang}" for lang in languages)):
            rows = read_jsonl(Path(data) / f"{name}.jsonl")
            found = encode_several(checkpoint, [r["text"] for r in rows], ("served", "pooled"), 128, max_length,
                                   checkpoint.head.text_prefix)
            gold = np.array([index[r["label"]] for r in rows])
            hits = (found["served"].argmax(1) == gold).astype(int)
            key = name.removeprefix("test.")
            result["accuracy"][key] = float(hits.mean())
            if key != "dev":
                result["hits"][key] = "".join(map(str, hits))
                vectors[key] = found
        result["alignment"] = alignment(checkpoint, data, languages, max_length, vectors)
    result["accuracy"]["zero_shot_mean"] = float(np.mean([result["accuracy"][lang] for lang in languages]))
    return result


def start_alignment(start: Path, data: Path, languages: list[str], reinit_from: int | None = None,
                    reinit_seed: int = 0, max_length: int = 64, bf16: bool = False) -> dict[str, dict[str, float]]:
    """The alignment measure of the starting point itself (after any re-initialisation), before training."""
    checkpoint = load_checkpoint(start)
    if reinit_from is not None:
        reinitialise_from(checkpoint.model, reinit_from, reinit_seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return alignment(checkpoint, data, languages, max_length)


def train_ear(settings: EarSettings, out: Path, progress: bool = True) -> dict[str, Any]:
    """Fine-tune, evaluate and write ``out/metrics.json``; a finished run (metrics present) is read back."""
    out = Path(out)
    if (out / METRICS_FILE).is_file():
        return json.loads((out / METRICS_FILE).read_text())
    start = load_checkpoint(settings.start)
    max_length = min(settings.max_length, start.head.max_length)  # never beyond the positions the encoder has
    labels = sorted({r["label"] for r in read_jsonl(settings.data / "dev.jsonl")})
    torch.manual_seed(settings.seed)
    model = with_target(start.model, "cls", num_labels=len(labels))
    if settings.reinit_from is not None:
        reinitialise_from(model, settings.reinit_from, settings.reinit_seed)
    head = HeadInfo(task="classification", labels=labels, max_length=max_length,
                    source=f"EAR {settings.label()} from {start.head.source or settings.start}",
                    text_prefix=start.head.text_prefix)
    tokenizer = configured(start.tokenizer, max_length, model.config.pad_token_id)
    collator = EarCollator(tokenizer, model.config.pad_token_id, labels, start.head.text_prefix, settings.paired)
    train = TrainSettings(batch_size=settings.batch_size, max_steps=settings.steps, lr=settings.lr,
                          weight_decay=0.0, warmup_ratio=0.0, max_grad_norm=1.0, max_length=max_length,
                          seed=settings.seed, precision=settings.precision, group_by_length=True, progress=progress)
    trainer = Trainer(model, start.tokenizer, head, collator, train, out, objective=EarObjective(model, settings))
    result = trainer.train(_records(settings.data))
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)  # optimizer state: twice the weights, not needed after
    languages = test_languages(settings.data, settings.languages)
    metrics = {"settings": json.loads(settings.model_dump_json()), "label": settings.label(),
               "steps": result.steps, "seconds": round(result.seconds, 1), "train_loss": result.train_loss,
               "history": result.history,
               **evaluate_transfer(load_checkpoint(out), settings.data, languages, max_length,
                                   bf16=settings.precision == "bf16")}
    if not settings.keep_checkpoint:
        for child in out.iterdir():
            child.unlink() if child.is_file() else shutil.rmtree(child)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    return metrics
