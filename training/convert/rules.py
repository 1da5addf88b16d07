"""Weight-name mapping between our models and Hugging Face checkpoints, in both directions.

A family lists ``Rule``s: our parameter name, the HF name(s), and how the tensor changes on the
way (copied, transposed for GPT-2's Conv1D, or split from a fused QKV matrix). The same list
drives import and export, so the two directions cannot drift apart. Every mapped tensor's shape
is checked against the target model before it is copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Transform = Literal["copy", "transpose", "split"]


@dataclass(frozen=True)
class Rule:
    ours: str
    hf: str
    transform: Transform = "copy"
    part: int = 0  # for "split": which third of the fused (in, 3*out) Conv1D weight
    parts: int = 3


def to_ours(rule: Rule, hf_tensor: torch.Tensor) -> torch.Tensor:
    if rule.transform == "copy":
        return hf_tensor
    if rule.transform == "transpose":
        return hf_tensor.T.contiguous()
    chunk = hf_tensor.shape[-1] // rule.parts
    piece = hf_tensor[..., rule.part * chunk : (rule.part + 1) * chunk]
    return piece.T.contiguous() if piece.dim() == 2 else piece.contiguous()


def import_state(rules: list[Rule], hf_state: dict[str, torch.Tensor], ours_shapes: dict[str, torch.Size]):
    """HF tensors -> our state dict. Raises on a missing tensor or a shape that does not fit."""
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.hf not in hf_state:
            raise KeyError(f"checkpoint has no tensor {rule.hf!r} (needed for {rule.ours!r})")
        tensor = to_ours(rule, hf_state[rule.hf])
        expected = ours_shapes.get(rule.ours)
        if expected is None:
            raise KeyError(f"our model has no parameter {rule.ours!r}")
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(f"{rule.hf} -> {rule.ours}: shape {tuple(tensor.shape)} != {tuple(expected)}")
        out[rule.ours] = tensor
    return out


def export_state(rules: list[Rule], ours_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensors; fused matrices are re-assembled from their parts."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for rule in rules:
        tensor = ours_state[rule.ours]
        if rule.transform == "copy":
            out[rule.hf] = tensor.contiguous()
        elif rule.transform == "transpose":
            out[rule.hf] = tensor.T.contiguous()
        else:
            fused.setdefault(rule.hf, {})[rule.part] = tensor.T if tensor.dim() == 2 else tensor
    for name, pieces in fused.items():
        out[name] = torch.cat([pieces[i] for i in sorted(pieces)], dim=-1).contiguous()
    return out
