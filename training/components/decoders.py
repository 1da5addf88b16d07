"""Decoders: causal self-attention plus cross-attention to the encoder output, with a KV cache.

The decoder is the same layer stack as the encoder with ``causal`` and ``cross_attention`` set;
the registry keeps it a separate plug-in point so other decoders can be added by name.
"""

from __future__ import annotations

from torch import nn

from training.components.encoders import TransformerStack
from training.config import ModelConfig, StackConfig


class TransformerDecoder(TransformerStack):
    def __init__(self, config: ModelConfig, stack: StackConfig) -> None:
        if not (stack.causal and stack.cross_attention):
            raise ValueError("decoder 'transformer' needs causal=true and cross_attention=true")
        super().__init__(config, stack)


DECODERS: dict[str, type[nn.Module]] = {"transformer": TransformerDecoder}
