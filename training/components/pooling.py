"""Pooling: token states (B, T, H) and their mask (B, T) -> one vector per sequence (B, H)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from training.components.layers import MASK_FILL, masked_mean


def cls_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return hidden[:, 0]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, as sentence-transformers computes it."""
    return masked_mean(hidden, mask)


def max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    fill = torch.full_like(hidden, MASK_FILL)
    return torch.where(mask.unsqueeze(-1).bool(), hidden, fill).max(dim=1).values


def last_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last real token: the summary a causal (GPT-style) model builds."""
    last = mask.long().sum(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]


POOLING: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cls": cls_pool,
    "mean": mean_pool,
    "max": max_pool,
    "last": last_pool,
}
