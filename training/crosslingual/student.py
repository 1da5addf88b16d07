"""The distillation student: the assistant's shape with a bottleneck word table and k layers cycled r times.

Built from the assistant's config (same vocabulary, width, heads, positions), so the student keeps the
assistant's tokenizer and can start from its weights: position/type embeddings and the embedding LayerNorm
are copied, the first k encoder layers are copied (as the multi-stage distillation code initialises its
recurrent student), and the narrow word table starts either random (the paper) or from a truncated SVD of
the assistant's table (our addition: rows the parallel data never shows still start somewhere sensible).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from training.config import ModelConfig
from training.model import Model, build_model

BottleneckInit = Literal["svd", "random"]
LayerInit = Literal["assistant", "random"]


class StudentShape(BaseModel):
    """The three sizes the paper varies. The default, E = 128 with the assistant's 12 layers applied once, is
    the served recipe (46 % of e5-small); the method's recurrent students are k = 3, r = 4 and k = 6, r = 2."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embedding_size: int | None = Field(128, ge=8, description="Bottleneck width E; None: the full word table.")
    unique_layers: int = Field(12, ge=1, description="k: layers holding weights.")
    cycles: int = Field(1, ge=1, description="r: times the k layers are applied in order (depth k x r).")

    @property
    def label(self) -> str:
        width = f"e{self.embedding_size}" if self.embedding_size else "full"
        return f"{width}-{self.unique_layers}x{self.cycles}"


def student_config(assistant: ModelConfig, shape: StudentShape) -> ModelConfig:
    """The assistant's config with the word table, depth and weight sharing of ``shape``."""
    data = assistant.model_dump()
    parts = [p for p in data["embedding"]["parts"] if p not in ("word", "factorized_word")]
    word = "factorized_word" if shape.embedding_size else "word"
    data["embedding"]["parts"] = [word, *parts]
    data["embedding"]["embedding_size"] = shape.embedding_size
    depth = shape.unique_layers * shape.cycles
    data["encoder"].update(num_layers=depth, parameter_sharing=False,
                           unique_layers=shape.unique_layers if shape.unique_layers < depth else None)
    return ModelConfig.model_validate(data)


@torch.no_grad()
def build_student(assistant: Model, shape: StudentShape, bottleneck_init: BottleneckInit = "svd",
                  layer_init: LayerInit = "assistant", seed: int = 0) -> Model:
    """A student of ``shape`` initialised from ``assistant`` as the module docstring says."""
    torch.manual_seed(seed)
    config = student_config(assistant.config, shape)
    student = build_model(config)
    source, target = assistant.embedding, student.embedding
    for name in target.parts:
        if name not in ("word", "factorized_word"):
            target.parts[name].load_state_dict(source.parts[name].state_dict())
    if target.layernorm is not None and source.layernorm is not None:
        target.layernorm.load_state_dict(source.layernorm.state_dict())
    table = source.word.weight
    if shape.embedding_size is None:
        target.word.weight.copy_(table)
    elif bottleneck_init == "svd":
        # table ~ (U_E S_E) V_E^T: the narrow table holds U_E S_E, the projection V_E^T, the bias the mean.
        mean = table.mean(dim=0)
        u, s, vh = torch.linalg.svd(table - mean, full_matrices=False)
        width = shape.embedding_size
        target.word.weight.copy_(u[:, :width] * s[:width])
        target.word.projection.weight.copy_(vh[:width].T)
        target.word.projection.bias.copy_(mean)
    if layer_init == "assistant":
        for index in range(shape.unique_layers):
            student.encoder.layers[index].load_state_dict(assistant.encoder.layer(index).state_dict())
    return student
