"""Encoders: stacks of transformer layers over the embedded tokens.

One class covers post-LN (BERT), pre-LN (GPT-2), T5's relative position bias and cross-layer
parameter sharing ("parameter recurrence": one layer's weights applied num_layers times). A causal
encoder is GPT-2's decoder-only stack; it keeps a key/value cache for generation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from training.components.layers import (
    LayerCache,
    RelativePositionBias,
    TransformerLayer,
    causal_bias,
    make_layernorm,
    padding_bias,
    rotary_tables,
)
from training.config import ModelConfig, StackConfig


@dataclass
class StackOutput:
    hidden: torch.Tensor  # (B, T, hidden)
    cache: list[LayerCache] | None = None
    embedded: torch.Tensor | None = None  # (B, T, hidden): the embedding layer's output (Model.encode sets it)
    attention: torch.Tensor | None = None  # (B, heads, T, T): layer ``attention_layer``'s probabilities


class TransformerStack(nn.Module):
    def __init__(self, config: ModelConfig, stack: StackConfig) -> None:
        super().__init__()
        self.stack = stack
        self.num_layers = stack.num_layers
        self.head_dim = config.attention_head_dim
        count = stack.weight_layers
        self.layers = nn.ModuleList(TransformerLayer(config, stack) for _ in range(count))
        self.relative_bias = (
            RelativePositionBias(config.num_heads, stack) if stack.relative_position else None
        )
        self.final_norm = (
            make_layernorm(stack.layernorm, config.hidden_size, config.layer_norm_eps)
            if stack.has_final_layernorm
            else None
        )
        self.dropout = nn.Dropout(config.dropout)

    def layer(self, index: int) -> TransformerLayer:
        return self.layers[index % len(self.layers)]  # cycled under parameter sharing / group recurrence

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past: list[LayerCache] | None = None,
        use_cache: bool = False,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        from_layer: int = 0,
        layer_inputs: list[torch.Tensor] | None = None,
        attention_layer: int | None = None,
    ) -> StackOutput:
        """x: (B, Tq, H). attention_mask: (B, past+Tq) of 1/0 over the keys this stack attends to.
        position_ids (B, Tq) matter only for RoPE; by default they count the attended tokens, so a
        left-padded row starts at position 0 exactly as it would alone. ``from_layer`` resumes with
        ``x`` as that layer's input and ``layer_inputs`` collects each layer's input: a sensitivity
        pass that changes layer k reuses the unchanged layers below it. ``attention_layer`` (0-based)
        returns that layer's self-attention probabilities from this same pass."""
        if attention_layer is not None and not from_layer <= attention_layer < self.num_layers:
            raise ValueError(f"attention_layer {attention_layer} is not one of layers "
                             f"{from_layer}..{self.num_layers - 1}")
        batch, query_length, _ = x.shape
        past_length = past[0][0].shape[2] if past else 0
        key_length = past_length + query_length
        if attention_mask is None:
            attention_mask = torch.ones(batch, key_length, dtype=torch.long, device=x.device)
        bias = padding_bias(attention_mask, x.dtype)  # (B, 1, 1, Tk)
        if self.stack.causal:
            bias = bias + causal_bias(query_length, key_length, x.device, x.dtype)
        if self.relative_bias is not None:
            bias = bias + self.relative_bias(query_length, key_length, past_length, x.device).to(x.dtype)
        rotary = None
        if self.stack.position == "rope":
            if position_ids is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:]
            rotary = rotary_tables(position_ids, self.head_dim, self.stack.rope_theta)
        cross_bias = None
        if self.stack.cross_attention:
            if memory_mask is None:
                raise ValueError("cross-attention needs the encoder's attention mask")
            cross_bias = padding_bias(memory_mask, x.dtype)
        new_cache: list[LayerCache] = []
        kept: list[torch.Tensor] = []
        for i in range(from_layer, self.num_layers):
            if layer_inputs is not None:
                layer_inputs.append(x)
            x, layer_cache = self.layer(i)(
                x, bias, past[i] if past else None, memory=memory, cross_bias=cross_bias, rotary=rotary,
                keep_attention=kept if i == attention_layer else None,
            )
            if use_cache:
                new_cache.append(layer_cache)
        if self.final_norm is not None:
            x = self.dropout(self.final_norm(x))
        return StackOutput(hidden=x, cache=new_cache if use_cache else None, attention=kept[0] if kept else None)


ENCODERS: dict[str, type[nn.Module]] = {"transformer": TransformerStack}
