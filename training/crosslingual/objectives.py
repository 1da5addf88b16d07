"""The losses of the four distillation stages, as trainer objectives over cached target vectors.

A batch holds B translation pairs: the English sentences and their translations, tokenized, and per pair the
fixed target vectors the stage regresses onto (``teacher_en``: T(en); ``assistant_en``/``assistant_x``:
A(en)/A(x), or their embedding-layer versions in stage 2). MSE is the mean over all elements, as
``nn.MSELoss`` computes it; sentence vectors are mean-pooled and not normalized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from training.crosslingual.embeddings import Output, sentence_vectors
from training.model import Model

RelationLoss = Literal["relational", "infonce", "none"]
"""Stage 4's in-batch term: MSE between the teacher's and the student's cross-lingual similarity matrices
(the released code's choice), InfoNCE over the student's en -> x similarities, or nothing."""

INFONCE_SCALE = 20.0


class PairVectors(nn.Module):
    """Runs ``model`` on both sides of a batch of pairs in one forward and returns (2B, H) sentence vectors:
    rows [0, B) are the English sides, [B, 2B) the translations. ``output`` picks which vector (the
    embedding-layer output in stage 2)."""

    def __init__(self, model: Model, output: Output = "pooled") -> None:
        super().__init__()
        self.model = model
        self.output: Output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sentence_vectors(self.model, input_ids, attention_mask, None, self.output)


def _sides(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = vectors.shape[0] // 2
    return vectors[:half].float(), vectors[half:].float()


def _inputs(batch: dict) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, H), (B, H) -> (B, B) cosine similarities."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


@dataclass
class TeacherMSE:
    """Stage 1 (multilingual distillation): MSE(A(en), T(en)) + MSE(A(x), T(en))."""

    module: PairVectors

    inputs = staticmethod(_inputs)

    def loss(self, vectors: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        en, x = _sides(vectors)
        target = batch["teacher_en"]
        mse_en, mse_x = F.mse_loss(en, target), F.mse_loss(x, target)
        return mse_en + mse_x, {"mse_en": float(mse_en.detach()), "mse_x": float(mse_x.detach())}


@dataclass
class AssistantMSE:
    """Stages 2 and 3: MSE(S(en), A(en)) + MSE(S(x), A(x)), each side onto the assistant's vector of that
    same side (stage 2 compares the pooled embedding-layer outputs, stage 3 the pooled final states)."""

    module: PairVectors

    inputs = staticmethod(_inputs)

    def loss(self, vectors: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        en, x = _sides(vectors)
        mse_en, mse_x = F.mse_loss(en, batch["assistant_en"]), F.mse_loss(x, batch["assistant_x"])
        return mse_en + mse_x, {"mse_en": float(mse_en.detach()), "mse_x": float(mse_x.detach())}


@dataclass
class ContrastiveStage:
    """Stage 4: MSE(S(en), T(en)) + MSE(S(x), T(en)) plus the in-batch relation term ``relation``:
    "relational" is MSE(cos(T(en_i), T(en_j)), cos(S(en_i), S(x_j))) over the B x B matrix; "infonce" is
    cross-entropy of scale-20 cos(S(en_i), S(x_j)) with the diagonal as labels."""

    module: PairVectors
    relation: RelationLoss = "relational"

    inputs = staticmethod(_inputs)

    def loss(self, vectors: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        en, x = _sides(vectors)
        target = batch["teacher_en"]
        mse = F.mse_loss(en, target) + F.mse_loss(x, target)
        metrics = {"mse": float(mse.detach())}
        total = mse
        if self.relation != "none":
            student = cosine_matrix(en, x)
            if self.relation == "relational":
                term = F.mse_loss(student, cosine_matrix(target, target))
            else:
                labels = torch.arange(student.shape[0], device=student.device)
                term = F.cross_entropy(student * INFONCE_SCALE, labels)
            metrics[self.relation] = float(term.detach())
            total = total + term
        return total, metrics
