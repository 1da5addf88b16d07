"""Embedding parts (summed) and the embedding layer that combines them.

Each part takes the model's input (token ids, or a tensor for the ``patch`` part) and returns
(B, T, hidden). The same classes serve as the source embedding and the decoder's target embedding.
A tensor part brings its own positions, so it stands alone (``EmbeddingConfig`` checks that).
"""

from __future__ import annotations

import torch
from torch import nn

from training.components.layers import sinusoidal_table
from training.config import EmbeddingConfig, ModelConfig


class WordEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, emb: EmbeddingConfig) -> None:
        super().__init__()
        self.weight = nn.Embedding(config.vocab_size, config.hidden_size).weight

    def forward(self, input_ids: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight)


class FactorizedWordEmbedding(nn.Module):
    """ALBERT-style bottleneck: a narrow vocabulary table projected up to the hidden size."""

    def __init__(self, config: ModelConfig, emb: EmbeddingConfig) -> None:
        super().__init__()
        if emb.embedding_size is None:
            raise ValueError("embedding part 'factorized_word' needs embedding.embedding_size")
        self.weight = nn.Embedding(config.vocab_size, emb.embedding_size).weight
        self.projection = nn.Linear(emb.embedding_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        return self.projection(nn.functional.embedding(input_ids, self.weight))


class PositionEmbedding(nn.Module):
    """Learned absolute positions; RoBERTa-style padding-aware positions when configured."""

    def __init__(self, config: ModelConfig, emb: EmbeddingConfig) -> None:
        super().__init__()
        self.padding_idx = emb.position_padding_idx
        self.pad_token_id = config.pad_token_id
        self.weight = nn.Embedding(emb.max_position, config.hidden_size).weight

    def positions(self, input_ids: torch.Tensor, offset: int) -> torch.Tensor:
        length = input_ids.shape[1]
        if self.padding_idx is None:
            return torch.arange(offset, offset + length, device=input_ids.device)[None, :]
        # Count only real tokens; pads keep the padding index (as XLM-R/RoBERTa do).
        real = input_ids.ne(self.pad_token_id).long()
        return (torch.cumsum(real, dim=1) + offset) * real + self.padding_idx

    def forward(self, input_ids: torch.Tensor, position_offset: int = 0, **_: torch.Tensor) -> torch.Tensor:
        # No data-dependent length check here: it would break ONNX tracing. Callers truncate.
        positions = self.positions(input_ids, position_offset)
        return nn.functional.embedding(positions, self.weight)


class SinusoidalPositionEmbedding(nn.Module):
    """Fixed sin/cos positions: no parameters, any length up to max_position."""

    def __init__(self, config: ModelConfig, emb: EmbeddingConfig) -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(emb.max_position, config.hidden_size), persistent=False)

    def forward(self, input_ids: torch.Tensor, position_offset: int = 0, **_: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        return self.table[position_offset : position_offset + length][None, :, :].expand(
            input_ids.shape[0], -1, -1
        )


class SegmentEmbedding(nn.Module):
    """Token-type (sentence A / B) embedding."""

    def __init__(self, config: ModelConfig, emb: EmbeddingConfig) -> None:
        super().__init__()
        self.weight = nn.Embedding(emb.type_vocab_size, config.hidden_size).weight

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None, **_: torch.Tensor
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return nn.functional.embedding(token_type_ids, self.weight)


class PatchEmbedding(nn.Module):
    """ViT: the image (B, C, H, W) is cut into patch vectors and projected, a learned class token goes
    first and learned positions are added: (B, 1 + patches, hidden).

    The projection keeps ViT's Conv2d weights (kernel = stride = patch, so checkpoints convert as they
    are) but runs as what such a convolution is, a patch reshape and one matrix multiply: in the exported
    graph it is a weight MatMul like every other, which SAMP measures and quantizes as a unit."""

    def __init__(self, config: ModelConfig, emb: EmbeddingConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(emb.num_channels, config.hidden_size, kernel_size=emb.patch_size,
                                    stride=emb.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.positions = nn.Parameter(torch.zeros(1, emb.num_patches + 1, config.hidden_size))
        self.channels, self.patch, self.grid = emb.num_channels, emb.patch_size, emb.image_size // emb.patch_size

    def forward(self, pixel_values: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        # No data-dependent size check here (ONNX tracing): the server checks the shape before work.
        c, p, g = self.channels, self.patch, self.grid
        x = pixel_values.to(self.projection.weight.dtype).reshape(-1, c, g, p, g, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(-1, g * g, c * p * p)  # row-major patches, (C, kh, kw) each
        weight = self.projection.weight.reshape(self.projection.out_channels, c * p * p)
        patches = nn.functional.linear(x, weight, self.projection.bias)
        cls = self.cls.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.positions


class WaveformEmbedding(nn.Module):
    """wav2vec2's front end on raw audio (B, samples): a stack of strided 1-D convolutions (group norm
    after the first, GELU after each) makes one frame per 20 ms at 16 kHz; the frames are layer-normed
    and projected to the hidden size, and a grouped, weight-normed convolution over time adds relative
    positions. The embedding's own layer norm (configured on) is then wav2vec2's encoder layer norm.
    ``mask`` is wav2vec2's learned vector for masked frames (kept so checkpoints convert exactly)."""

    def __init__(self, config: ModelConfig, emb: EmbeddingConfig) -> None:
        super().__init__()
        convs: list[nn.Module] = []
        channels = 1
        for width, kernel, stride in zip(emb.conv_dim, emb.conv_kernel, emb.conv_stride):
            convs.append(nn.Conv1d(channels, width, kernel, stride=stride, bias=emb.conv_bias))
            channels = width
        self.convs = nn.ModuleList(convs)
        self.conv_norm = nn.GroupNorm(emb.conv_dim[0], emb.conv_dim[0], affine=True)
        self.feature_norm = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.projection = nn.Linear(channels, config.hidden_size)
        kernel = emb.num_conv_pos_embeddings
        position = nn.Conv1d(config.hidden_size, config.hidden_size, kernel, padding=kernel // 2,
                             groups=emb.num_conv_pos_embedding_groups)
        self.position = nn.utils.parametrizations.weight_norm(position, name="weight", dim=2)
        self.trim = 1 if kernel % 2 == 0 else 0  # an even kernel's padding makes one frame too many
        self.mask = nn.Parameter(torch.zeros(config.hidden_size))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_values: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        x = input_values.to(self.projection.weight.dtype)[:, None, :]
        for index, conv in enumerate(self.convs):
            x = conv(x)
            if index == 0:
                x = self.conv_norm(x)
            x = nn.functional.gelu(x)
        x = self.dropout(self.projection(self.feature_norm(x.transpose(1, 2))))  # (B, frames, hidden)
        position = self.position(x.transpose(1, 2))
        if self.trim:
            position = position[:, :, : -self.trim]
        return x + nn.functional.gelu(position).transpose(1, 2)


EMBEDDINGS: dict[str, type[nn.Module]] = {
    "word": WordEmbedding,
    "factorized_word": FactorizedWordEmbedding,
    "pos": PositionEmbedding,
    "sinusoidal_pos": SinusoidalPositionEmbedding,
    "seg": SegmentEmbedding,
    "patch": PatchEmbedding,
    "waveform": WaveformEmbedding,
}


class Embedding(nn.Module):
    """Sum of the configured parts, then optional scale, layer norm and dropout."""

    def __init__(self, config: ModelConfig, emb: EmbeddingConfig) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({name: EMBEDDINGS[name](config, emb) for name in emb.parts})
        self.scale = config.hidden_size**0.5 if emb.scale else 1.0
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if emb.layernorm else None
        self.dropout = nn.Dropout(config.dropout)

    @property
    def word(self) -> nn.Module:
        for name in ("word", "factorized_word"):
            if name in self.parts:
                return self.parts[name]
        raise KeyError("this embedding has no word part")

    @property
    def word_weight(self) -> nn.Parameter | None:
        """The vocabulary table an output layer may tie to; None for a tensor (image) embedding."""
        return self.word.weight if any(n in self.parts for n in ("word", "factorized_word")) else None

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_offset: int = 0,
    ) -> torch.Tensor:
        out = None
        for name, part in self.parts.items():
            value = part(input_ids, token_type_ids=token_type_ids, position_offset=position_offset)
            if name in ("word", "factorized_word"):
                value = value * self.scale
            out = value if out is None else out + value
        if self.layernorm is not None:
            out = self.layernorm(out)
        return self.dropout(out)
