"""Targets: the task heads, each with an inference output and a training loss.

``forward`` maps the last stack's states to what is served (logits or embeddings). Training is one
model forward per batch: ``inputs`` says which forward arguments a collated batch becomes (both
texts of a pair in one padded batch; the decoder's inputs for seq2seq), and ``loss`` scores what
that forward produced against the batch's labels. The model call stays with the caller, so a DDP
wrapper's forward is the one that runs. ``task`` names the data format the head trains on (see
training.data).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from training.components.activations import ACTIVATIONS
from training.components.pooling import POOLING
from training.config import ModelConfig

Metrics = dict[str, float]
Inputs = dict[str, torch.Tensor]
IGNORE = -100
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "input_values")


def _vocab_projection(config: ModelConfig, word_weight: nn.Parameter | None, bias: bool) -> nn.Linear:
    """Output layer to the vocabulary, sharing the word table when the config ties them."""
    if word_weight is None:
        raise ValueError(f"target {config.target.name!r} predicts tokens: the embedding needs a word part")
    width = word_weight.shape[1]
    layer = nn.Linear(width, config.vocab_size, bias=bias)
    if config.target.tie_weights:
        layer.weight = word_weight
    return layer


class Target(nn.Module):
    task: ClassVar[str]

    def __init__(self, config: ModelConfig, word_weight: nn.Parameter | None) -> None:
        super().__init__()
        self.config = config

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inputs(self, batch: dict) -> Inputs:
        """The model's forward arguments for ``batch``: its token inputs."""
        return {key: batch[key] for key in TOKEN_INPUTS if batch.get(key) is not None}

    def loss(self, output: torch.Tensor, batch: dict) -> tuple[torch.Tensor, Metrics]:
        """Score ``output`` (the model's forward on ``inputs(batch)``) against the batch's labels."""
        raise NotImplementedError


class MLMTarget(Target):
    """Masked language modelling (BERT): optional transform, then tied vocabulary projection."""

    task = "mlm"

    def __init__(self, config: ModelConfig, word_weight: nn.Parameter | None) -> None:
        super().__init__(config, word_weight)
        width = word_weight.shape[1] if word_weight is not None else config.hidden_size
        self.transform = None
        if config.target.lm_transform:
            self.transform = nn.Sequential(
                nn.Linear(config.hidden_size, width),
                _Activation(config.encoder.activation),
                nn.LayerNorm(width, eps=config.layer_norm_eps),
            )
        self.decoder = _vocab_projection(config, word_weight, bias=True)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.transform is not None:
            hidden = self.transform(hidden)
        return self.decoder(hidden)  # (B, T, V)

    def loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, Metrics]:
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
        masked = labels.ne(IGNORE)
        accuracy = (logits.argmax(-1).eq(labels) & masked).sum() / masked.sum().clamp(min=1)
        return loss, {"accuracy": float(accuracy)}


class LMTarget(Target):
    """Causal language modelling (GPT-2): predict token t+1 from tokens <= t."""

    task = "lm"

    def __init__(self, config: ModelConfig, word_weight: nn.Parameter | None) -> None:
        super().__init__(config, word_weight)
        self.decoder = _vocab_projection(config, word_weight, bias=False)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(hidden)

    def inputs(self, batch: dict) -> Inputs:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, Metrics]:
        shifted = logits[:, :-1].flatten(0, 1).float()
        labels = batch["labels"][:, 1:].flatten()
        loss = F.cross_entropy(shifted, labels, ignore_index=IGNORE)
        return loss, {"perplexity": float(torch.exp(loss.detach().clamp(max=20)))}


class Seq2SeqLMTarget(LMTarget):
    """Encoder-decoder language modelling (T5): the decoder predicts the labels."""

    task = "seq2seq"

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.target.scale_logits:
            hidden = hidden * self.config.hidden_size**-0.5
        return self.decoder(hidden)

    def inputs(self, batch: dict) -> Inputs:
        keys = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
        return {key: batch[key] for key in keys}

    def loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, Metrics]:
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)
        return loss, {"perplexity": float(torch.exp(loss.detach().clamp(max=20)))}


class _Activation(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.name](x)


class _Pooler(nn.Module):
    """Pool, then optionally BERT's dense + tanh, then optionally L2-normalize."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pool = POOLING[config.target.pooling]
        self.dense = nn.Linear(config.hidden_size, config.hidden_size) if config.target.pooler_dense else None
        self.normalize = config.target.normalize

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(hidden, attention_mask)
        if self.dense is not None:
            pooled = torch.tanh(self.dense(pooled))
        return F.normalize(pooled, p=2, dim=-1) if self.normalize else pooled


def _labels_required(config: ModelConfig) -> int:
    if not config.target.num_labels or config.target.num_labels < 2:
        raise ValueError(f"target {config.target.name!r} needs target.num_labels >= 2")
    return config.target.num_labels


def _classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    loss = F.cross_entropy(logits.float(), labels)
    return loss, {"accuracy": float(logits.argmax(-1).eq(labels).float().mean())}


class ClassificationTarget(Target):
    """Sequence classification of one text or a text pair packed into one input (cross-encoder)."""

    task = "classification"

    def __init__(self, config: ModelConfig, word_weight: nn.Parameter | None) -> None:
        super().__init__(config, word_weight)
        self.pooler = _Pooler(config)
        self.dropout = nn.Dropout(config.dropout)
        width = config.target.classifier_proj_size
        self.projector = nn.Linear(config.hidden_size, width) if width else None
        self.classifier = nn.Linear(width or config.hidden_size, _labels_required(config))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = self.pooler(hidden, attention_mask)
        if self.projector is not None:  # wav2vec2 projects each frame, then pools: the same map, reordered
            pooled = self.projector(pooled)
        return self.classifier(self.dropout(pooled))  # (B, labels)

    def loss(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, Metrics]:
        return _classification_metrics(logits, batch["labels"])


class EmbeddingTarget(Target):
    """Shared by the siamese heads: the served output is the pooled (normalized) sentence vector."""

    def __init__(self, config: ModelConfig, word_weight: nn.Parameter | None) -> None:
        super().__init__(config, word_weight)
        self.pooler = _Pooler(config)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.pooler(hidden, attention_mask)  # (B, H)

    def inputs(self, batch: dict) -> Inputs:
        """Both sides in one forward pass (padded to a common length): one DDP forward per step,
        and one bigger matrix multiply instead of two."""
        a, b = batch["a"], batch["b"]
        length = max(a["input_ids"].shape[1], b["input_ids"].shape[1])

        def padded(side: dict, key: str, value: int) -> torch.Tensor:
            t = side[key] if key in side else torch.zeros_like(side["input_ids"])
            return F.pad(t, (0, length - t.shape[1]), value=value)

        pad = self.config.pad_token_id
        return {
            "input_ids": torch.cat([padded(a, "input_ids", pad), padded(b, "input_ids", pad)]),
            "attention_mask": torch.cat([padded(a, "attention_mask", 0), padded(b, "attention_mask", 0)]),
            "token_type_ids": torch.cat([padded(a, "token_type_ids", 0), padded(b, "token_type_ids", 0)]),
        }

    @staticmethod
    def sides(embeddings: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward's output split back into side a's rows and side b's."""
        count = batch["a"]["input_ids"].shape[0]
        return embeddings[:count], embeddings[count:]


class PairClassificationTarget(EmbeddingTarget):
    """Sentence-pair classification with a bi-encoder (SBERT): softmax over (u, v, |u - v|)."""

    task = "pair_classification"

    def __init__(self, config: ModelConfig, word_weight: nn.Parameter | None) -> None:
        super().__init__(config, word_weight)
        self.classifier = nn.Linear(3 * config.hidden_size, _labels_required(config))

    def classify(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.cat([u, v, (u - v).abs()], dim=-1))

    def loss(self, embeddings: torch.Tensor, batch: dict) -> tuple[torch.Tensor, Metrics]:
        logits = self.classify(*self.sides(embeddings, batch))
        return _classification_metrics(logits, batch["labels"])


class ContrastiveTarget(EmbeddingTarget):
    """Matching with in-batch negatives: each anchor's positive is the matching row of side b."""

    task = "matching"

    def loss(self, embeddings: torch.Tensor, batch: dict) -> tuple[torch.Tensor, Metrics]:
        a, b = (F.normalize(side, dim=-1) for side in self.sides(embeddings, batch))
        scores = a @ b.T * self.config.target.contrastive_scale  # (B, B) cosine similarities, scaled
        labels = torch.arange(scores.shape[0], device=scores.device)
        loss = F.cross_entropy(scores.float(), labels)
        return loss, {"accuracy": float(scores.argmax(-1).eq(labels).float().mean())}


TARGETS: dict[str, type[Target]] = {
    "mlm": MLMTarget,
    "lm": LMTarget,
    "seq2seq_lm": Seq2SeqLMTarget,
    "cls": ClassificationTarget,
    "pair_cls": PairClassificationTarget,
    "contrastive": ContrastiveTarget,
}
