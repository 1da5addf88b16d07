"""Transformer building blocks shared by encoders and decoders.

One layer class covers BERT (post-LN), GPT-2 and T5 (pre-LN), with optional cross-attention and a
key/value cache. Masks are additive; the fill value is finite because ``finfo.min`` makes
onnxruntime's Softmax several times slower on CPU (docs/design.md) and -1e4 gives the same outputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.components.activations import ACTIVATIONS
from training.config import ModelConfig, StackConfig

MASK_FILL = -1e4

# One layer's cache: self-attention keys/values, then cross-attention keys/values (or None).
LayerCache = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction and no bias; computed in float32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(self.weight.dtype)


def make_layernorm(kind: str, size: int, eps: float) -> nn.Module:
    return RMSNorm(size, eps) if kind == "rms" else nn.LayerNorm(size, eps=eps)


Rotary = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (B, T, head_dim) each


def rotary_tables(position_ids: torch.Tensor, head_dim: int, theta: float) -> Rotary:
    """RoPE in Hugging Face's ``rotate_half`` layout: angles for each position, computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, d)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """x: (B, heads, T, d). Rotates each (i, i + d/2) pair by its position's angle."""
    cos, sin = (t.unsqueeze(1).to(x.dtype) for t in rotary)  # (B, 1, T, d)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention. With fewer key/value heads than query heads (grouped-query
    attention) each key/value head serves ``num_heads // num_kv_heads`` query heads; keys and values
    are cached with their own head count, so the cache is that much smaller."""

    def __init__(self, config: ModelConfig, stack: StackConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.key_value_heads
        self.head_dim = config.attention_head_dim
        inner = self.num_heads * self.head_dim
        kv_inner = self.num_kv_heads * self.head_dim
        self.query = nn.Linear(config.hidden_size, inner, bias=stack.bias)
        self.key = nn.Linear(config.hidden_size, kv_inner, bias=stack.bias)
        self.value = nn.Linear(config.hidden_size, kv_inner, bias=stack.bias)
        self.output = nn.Linear(inner, config.hidden_size, bias=stack.bias)
        self.dropout = nn.Dropout(config.attention_dropout)
        self.scale = 1.0 / math.sqrt(self.head_dim) if stack.attention_scale else 1.0

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, length, _ = x.shape
        # (B, T, heads*d) -> (B, heads, T, d)
        return x.view(batch, length, heads, self.head_dim).transpose(1, 2)

    def project_kv(self, memory: torch.Tensor, rotary: Rotary | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated to their positions when RoPE is on) and values: (B, kv_heads, T, d) each."""
        k = self._heads(self.key(memory), self.num_kv_heads)
        if rotary is not None:
            k = apply_rotary(k, rotary)
        return k, self._heads(self.value(memory), self.num_kv_heads)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        rotary: Rotary | None = None,
        keep_probs: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``bias`` is additive, broadcastable to (B, heads, Tq, Tk); ``kv`` are projected heads.
        ``keep_probs`` receives the attention probabilities (B, h, Tq, Tk), before dropout."""
        batch, length, _ = x.shape
        q = self._heads(self.query(x), self.num_heads)  # (B, h, Tq, d)
        if rotary is not None:
            q = apply_rotary(q, rotary)
        k, v = kv  # (B, kv, Tk, d)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            # Query head h uses key/value head h // groups (HF's repeat_kv order), by broadcasting
            # (B, kv, g, Tq, d) against (B, kv, 1, Tk, d) instead of copying the cache g times.
            q = q.view(batch, self.num_kv_heads, groups, length, self.head_dim)
            k, v = k.unsqueeze(2), v.unsqueeze(2)
            if bias.shape[1] == 1:
                bias = bias.unsqueeze(2)
            else:  # per-head bias (B|1, h, Tq, Tk) -> (B|1, kv, g, Tq, Tk)
                bias = bias.view(bias.shape[0], self.num_kv_heads, groups, *bias.shape[-2:])
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + bias  # (B, h, Tq, Tk)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        if keep_probs is not None:
            keep_probs.append(probs.reshape(batch, self.num_heads, length, -1))
        context = torch.matmul(self.dropout(probs), v)  # (B, h, Tq, d) [or (B, kv, g, Tq, d)]
        context = context.reshape(batch, self.num_heads, length, self.head_dim)
        context = context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.output(context)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, stack: StackConfig) -> None:
        super().__init__()
        self.gated = stack.feed_forward == "gated"
        self.inner = nn.Linear(config.hidden_size, config.intermediate_size, bias=stack.bias)
        if self.gated:
            self.gate = nn.Linear(config.hidden_size, config.intermediate_size, bias=stack.bias)
        self.outer = nn.Linear(config.intermediate_size, config.hidden_size, bias=stack.bias)
        self.act = ACTIVATIONS[stack.activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x)) * self.inner(x) if self.gated else self.act(self.inner(x))
        return self.outer(self.dropout(h) if self.gated else h)


class TransformerLayer(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each with a residual and a norm."""

    def __init__(self, config: ModelConfig, stack: StackConfig) -> None:
        super().__init__()
        self.pre_ln = stack.layernorm_positioning == "pre"
        norm = lambda: make_layernorm(stack.layernorm, config.hidden_size, config.layer_norm_eps)  # noqa: E731
        self.self_attention = MultiHeadAttention(config, stack)
        self.self_attention_norm = norm()
        self.cross_attention = MultiHeadAttention(config, stack) if stack.cross_attention else None
        self.cross_attention_norm = norm() if stack.cross_attention else None
        self.feed_forward = FeedForward(config, stack)
        self.feed_forward_norm = norm()
        self.dropout = nn.Dropout(config.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, fn) -> torch.Tensor:
        if self.pre_ln:
            return x + self.dropout(fn(norm(x)))
        return norm(x + self.dropout(fn(x)))

    def forward(
        self,
        x: torch.Tensor,
        self_bias: torch.Tensor,
        past: LayerCache | None = None,
        memory: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
        rotary: Rotary | None = None,
        keep_attention: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, LayerCache]:
        """``keep_attention`` receives this layer's self-attention probabilities (B, h, Tq, Tk)."""
        cache: dict[str, torch.Tensor | None] = {}

        def self_attend(h: torch.Tensor) -> torch.Tensor:
            k, v = self.self_attention.project_kv(h, rotary)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            cache["k"], cache["v"] = k, v
            return self.self_attention(h, self_bias, (k, v), rotary, keep_attention)

        def cross_attend(h: torch.Tensor) -> torch.Tensor:
            if past is not None and past[2] is not None:
                kv = (past[2], past[3])
            else:
                kv = self.cross_attention.project_kv(memory)
            cache["ck"], cache["cv"] = kv
            return self.cross_attention(h, cross_bias, kv)

        x = self._residual(x, self.self_attention_norm, self_attend)
        if self.cross_attention is not None:
            if memory is None and (past is None or past[2] is None):
                raise ValueError("a decoder layer needs the encoder output (memory)")
            x = self._residual(x, self.cross_attention_norm, cross_attend)
        x = self._residual(x, self.feed_forward_norm, self.feed_forward)
        return x, (cache["k"], cache["v"], cache.get("ck"), cache.get("cv"))


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias, computed once per stack and added in every layer."""

    def __init__(self, num_heads: int, stack: StackConfig) -> None:
        super().__init__()
        self.bidirectional = not stack.causal
        self.num_buckets = stack.relative_buckets
        self.max_distance = stack.relative_max_distance
        self.embedding = nn.Embedding(self.num_buckets, num_heads)

    def _bucket(self, relative: torch.Tensor) -> torch.Tensor:
        buckets = torch.zeros_like(relative)
        num_buckets = self.num_buckets
        if self.bidirectional:
            num_buckets //= 2
            buckets = buckets + (relative > 0).long() * num_buckets
            relative = relative.abs()
        else:
            relative = -torch.clamp(relative, max=0)
        max_exact = num_buckets // 2
        is_small = relative < max_exact
        # Log-spaced buckets for long distances; float math as in the reference implementation.
        large = max_exact + (
            torch.log(relative.float() / max_exact)
            / math.log(self.max_distance / max_exact)
            * (num_buckets - max_exact)
        ).to(torch.long)
        large = torch.min(large, torch.full_like(large, num_buckets - 1))
        return buckets + torch.where(is_small, relative, large)

    def forward(self, query_length: int, key_length: int, offset: int, device: torch.device) -> torch.Tensor:
        query_pos = torch.arange(offset, offset + query_length, device=device)[:, None]
        key_pos = torch.arange(key_length, device=device)[None, :]
        values = self.embedding(self._bucket(key_pos - query_pos))  # (Tq, Tk, heads)
        return values.permute(2, 0, 1).unsqueeze(0)  # (1, heads, Tq, Tk)


def padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Tk) of 1/0 -> additive (B, 1, 1, Tk)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_FILL


def causal_bias(query_length: int, key_length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive (1, 1, Tq, Tk): query i (at absolute position past+i) sees keys up to itself."""
    offset = key_length - query_length
    q = torch.arange(query_length, device=device)[:, None] + offset
    k = torch.arange(key_length, device=device)[None, :]
    return ((k > q).to(dtype) * MASK_FILL)[None, None]


def sinusoidal_table(length: int, size: int) -> torch.Tensor:
    """The fixed sin/cos position table of 'Attention Is All You Need'."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, size, 2, dtype=torch.float32) * (-math.log(10000.0) / size))
    table = torch.zeros(length, size)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)[:, : size // 2]
    return table


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


__all__ = [
    "FeedForward",
    "LayerCache",
    "MultiHeadAttention",
    "RelativePositionBias",
    "Rotary",
    "TransformerLayer",
    "apply_rotary",
    "causal_bias",
    "masked_mean",
    "padding_bias",
    "rotary_tables",
    "sinusoidal_table",
]
