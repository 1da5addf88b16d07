"""The model: embedding -> encoder -> [target embedding -> decoder] -> target, built from a config."""

from __future__ import annotations

import torch
from torch import nn

from training.components import DECODERS, ENCODERS, TARGETS
from training.components.embeddings import Embedding
from training.components.encoders import StackOutput
from training.components.layers import LayerCache
from training.config import ModelConfig


MODEL_INPUTS = {"text": "input_ids", "image": "pixel_values", "audio": "input_values"}
"""What each modality's model takes (the forward argument, and the exported graph's input name)."""


class Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = Embedding(config, config.embedding)
        self.encoder = ENCODERS[config.encoder.name](config, config.encoder)
        self.target_embedding: Embedding | None = None
        self.decoder: nn.Module | None = None
        if config.decoder is not None and config.target_embedding is not None:
            self.target_embedding = Embedding(config, config.target_embedding)
            if config.share_embeddings:
                self.target_embedding.word.weight = self.embedding.word.weight
            self.decoder = DECODERS[config.decoder.name](config, config.decoder)
        output_embedding = self.target_embedding or self.embedding
        self.target = TARGETS[config.target.name](config, output_embedding.word_weight)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        past: list[LayerCache] | None = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        attention_layer: int | None = None,
    ) -> StackOutput:
        """Token ids (B, T) -> encoder states (B, T, H). ``past`` continues a causal encoder;
        ``position_ids`` (RoPE stacks) default to counting the attended tokens of each row. The output
        also holds the embedding layer's output and, with ``attention_layer``, that layer's attention
        probabilities: objectives on inner states (EAR's push and pull) need no second pass."""
        past_length = past[0][0].shape[2] if past else 0
        x = self.embedding(input_ids, token_type_ids, position_offset=past_length)
        out = self.encoder(x, attention_mask, past=past, use_cache=use_cache, position_ids=position_ids,
                           attention_layer=attention_layer)
        out.embedded = x
        return out

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor,
        decoder_attention_mask: torch.Tensor | None = None,
        past: list[LayerCache] | None = None,
        use_cache: bool = False,
    ) -> StackOutput:
        if self.decoder is None or self.target_embedding is None:
            raise ValueError("this model has no decoder")
        past_length = past[0][0].shape[2] if past else 0
        y = self.target_embedding(decoder_input_ids, position_offset=past_length)
        return self.decoder(
            y, decoder_attention_mask, past=past, use_cache=use_cache, memory=memory, memory_mask=memory_mask
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The served output: logits or pooled embeddings, as the target defines. An image model
        takes ``pixel_values`` (B, C, H, W), an audio model ``input_values`` (B, samples) instead of
        token ids; every patch or frame is attended."""
        given = {"text": input_ids, "image": pixel_values, "audio": input_values}
        inputs = given[self.config.modality]
        if inputs is None:
            raise ValueError(f"this {self.config.modality} model takes {MODEL_INPUTS[self.config.modality]}")
        if self.config.modality != "text":
            hidden = self.encode(inputs).hidden
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            return self.target(hidden, attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones_like(inputs)
        hidden = self.encode(inputs, attention_mask, token_type_ids).hidden
        if self.decoder is None:
            return self.target(hidden, attention_mask)
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder model needs decoder_input_ids")
        if decoder_attention_mask is None:
            decoder_attention_mask = torch.ones_like(decoder_input_ids)
        out = self.decode(decoder_input_ids, hidden, attention_mask, decoder_attention_mask).hidden
        return self.target(out, decoder_attention_mask)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss and metrics of a collated batch: one forward on the target's inputs."""
        return self.target.loss(self(**self.target.inputs(batch)), batch)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: ModelConfig) -> Model:
    """Assemble a model from its config; weights are initialized as BERT does (normal, std 0.02)."""
    model = Model(config)
    model.apply(_init_weights)
    return model


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    for name, param in module.named_parameters(recurse=False):
        if name == "weight" and param.dim() == 2 and not isinstance(module, nn.Linear):
            nn.init.normal_(param, std=0.02)
