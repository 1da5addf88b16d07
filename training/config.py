"""The model config: one JSON file names every component and its sizes.

A model is ``embedding -> encoder -> [target_embedding -> decoder] -> target``; each part is
picked by name from its registry (``training.components``). Configs are validated here, at the
edge, so a typo in a component name fails when the file is read, not deep inside a forward pass.
Validation checks names against ``COMPONENT_NAMES``, not the registries themselves, so reading a
config does not import torch (a test keeps the two equal).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CONFIG_DIR = Path(__file__).parent / "configs"

_EMBEDDINGS = frozenset({"word", "factorized_word", "pos", "sinusoidal_pos", "seg", "patch", "waveform"})
TENSOR_PARTS: dict[str, str] = {"patch": "image", "waveform": "audio"}
"""Embedding parts that take a tensor instead of token ids, and the modality each one makes."""
COMPONENT_NAMES: dict[str, frozenset[str]] = {
    "embeddings": _EMBEDDINGS,
    "encoders": frozenset({"transformer"}),
    "target_embeddings": _EMBEDDINGS,
    "decoders": frozenset({"transformer"}),
    "targets": frozenset({"mlm", "lm", "seq2seq_lm", "cls", "pair_cls", "contrastive"}),
    "pooling": frozenset({"cls", "mean", "max", "last"}),
    "activations": frozenset({"gelu", "gelu_new", "relu", "silu", "tanh"}),
}
"""Every registry's names (``training.components.REGISTRIES``), by registry."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbeddingConfig(_Strict):
    """Token representation before the encoder (or decoder): a sum of named parts."""

    parts: tuple[str, ...] = Field(("word", "pos", "seg"), description="Names from EMBEDDINGS, summed.")
    embedding_size: int | None = Field(
        None, description="Factorized ('bottleneck') word embedding width; projected up to hidden_size."
    )
    max_position: int = 512
    type_vocab_size: int = 2
    position_padding_idx: int | None = Field(
        None, description="RoBERTa/XLM-R positions: count only non-pad tokens, offset by this index."
    )
    layernorm: bool = True
    scale: bool = Field(False, description="Multiply word embeddings by sqrt(hidden_size).")
    image_size: int = Field(224, ge=1, description="Patch embedding: the square input image's side in pixels.")
    patch_size: int = Field(16, ge=1, description="Patch embedding: the square patch's side in pixels.")
    num_channels: int = Field(3, ge=1, description="Patch embedding: colour channels of the input image.")
    conv_dim: tuple[int, ...] = Field((512,) * 7, description="Waveform embedding: channels of each conv layer.")
    conv_kernel: tuple[int, ...] = Field((10, 3, 3, 3, 3, 2, 2), description="Waveform: each conv's kernel.")
    conv_stride: tuple[int, ...] = Field((5, 2, 2, 2, 2, 2, 2), description="Waveform: each conv's stride.")
    conv_bias: bool = False
    num_conv_pos_embeddings: int = Field(128, ge=1, description="Waveform: the positional convolution's kernel.")
    num_conv_pos_embedding_groups: int = Field(16, ge=1)
    sampling_rate: int = Field(16000, ge=1, description="Waveform: samples per second the model was trained on.")
    max_samples: int = Field(16000, ge=1, description="Waveform: the clip length; shorter clips are padded with "
                                                      "silence to it, as in training.")

    @property
    def modality(self) -> str:
        """What the embedding takes: "text" (token ids) or a tensor modality ("image", "audio")."""
        kinds = {TENSOR_PARTS[p] for p in self.parts if p in TENSOR_PARTS}
        return kinds.pop() if kinds else "text"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @model_validator(mode="after")
    def _one_modality(self) -> EmbeddingConfig:
        tensor_parts = [p for p in self.parts if p in TENSOR_PARTS]
        if tensor_parts and len(self.parts) != 1:
            raise ValueError(f"embedding part {tensor_parts[0]!r} takes a tensor and brings its own positions: "
                             f"it cannot be summed with {[p for p in self.parts if p not in tensor_parts]}")
        if "patch" in self.parts and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride) >= 1:
            raise ValueError("conv_dim, conv_kernel and conv_stride need one entry per conv layer, the same count")
        return self

    def frames(self, samples: int) -> int:
        """Waveform: how many frames (encoder positions) the conv stack makes of ``samples``."""
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            samples = (samples - kernel) // stride + 1
        return samples


class StackConfig(_Strict):
    """A stack of transformer layers: the encoder, or the decoder when cross_attention is set."""

    name: str = "transformer"
    num_layers: int
    layernorm_positioning: Literal["post", "pre"] = "post"
    layernorm: Literal["normal", "rms"] = "normal"
    feed_forward: Literal["dense", "gated"] = "dense"
    activation: str = "gelu"
    bias: bool = True
    causal: bool = False
    cross_attention: bool = False
    relative_position: bool = Field(False, description="T5 bucketed relative position bias.")
    relative_buckets: int = 32
    relative_max_distance: int = 128
    attention_scale: bool = Field(True, description="Divide scores by sqrt(head_dim); T5 does not.")
    parameter_sharing: bool = Field(False, description="One layer's weights applied num_layers times.")
    unique_layers: int | None = Field(
        None, ge=1, description="Group recurrence: k layers of weights cycled over num_layers (layer i uses "
                                "weights i mod k; 3 cycled 4 times is 12 layers deep at 3 layers' size).")
    final_layernorm: bool | None = Field(None, description="Default: true for pre-LN stacks.")
    position: Literal["embedding", "rope"] = Field(
        "embedding", description="Where positions come from: the embedding's parts, or rotary (RoPE) in attention.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base; Llama 2 uses 1e4, SmolLM2 1e5.")

    @property
    def weight_layers(self) -> int:
        """How many layers hold weights (parameter_sharing is the k = 1 case of unique_layers)."""
        if self.parameter_sharing:
            return 1
        return min(self.unique_layers or self.num_layers, self.num_layers)

    @model_validator(mode="after")
    def _one_kind_of_sharing(self) -> StackConfig:
        if self.parameter_sharing and self.unique_layers is not None:
            raise ValueError("set parameter_sharing (one shared layer) or unique_layers (k cycled layers), not both")
        if self.unique_layers is not None and self.unique_layers > self.num_layers:
            raise ValueError(f"unique_layers={self.unique_layers} is more than num_layers={self.num_layers}")
        return self

    @property
    def has_final_layernorm(self) -> bool:
        if self.final_layernorm is None:
            return self.layernorm_positioning == "pre"
        return self.final_layernorm


class TargetConfig(_Strict):
    """The task head on top of the encoder (or decoder) output."""

    name: str
    pooling: str = "mean"
    normalize: bool = False
    num_labels: int | None = None
    pooler_dense: bool = Field(False, description="BERT pooler: dense + tanh on the pooled vector.")
    tie_weights: bool = True
    lm_transform: bool = Field(False, description="BERT MLM transform: dense + act + LN before the vocab.")
    scale_logits: bool = Field(False, description="T5: scale decoder output by hidden_size**-0.5.")
    classifier_proj_size: int | None = Field(
        None, ge=1, description="cls: project the pooled vector to this width before the classifier (wav2vec2).")
    contrastive_scale: float = 20.0


class ModelConfig(_Strict):
    """The whole model. Sizes shared by all parts live at the top level."""

    vocab_size: int = Field(ge=0, description="0 for models that take tensors (images) instead of tokens.")
    hidden_size: int
    num_heads: int
    intermediate_size: int
    head_dim: int | None = None
    num_kv_heads: int | None = Field(
        None, description="Grouped-query attention: key/value heads (the cache keeps only these).")
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    embedding: EmbeddingConfig = EmbeddingConfig()
    encoder: StackConfig
    target_embedding: EmbeddingConfig | None = None
    decoder: StackConfig | None = None
    target: TargetConfig
    share_embeddings: bool = Field(False, description="Decoder reuses the encoder's word table (T5).")
    decoder_start_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def key_value_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        _check_names(self)
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if (self.decoder is None) != (self.target_embedding is None):
            raise ValueError("decoder and target_embedding go together: set both or neither")
        if self.embedding.modality == "text" and self.vocab_size < 1:
            raise ValueError("a model that takes token ids needs vocab_size >= 1")
        if self.embedding.modality != "text" and self.target.name in ("mlm", "lm", "seq2seq_lm"):
            raise ValueError(f"target {self.target.name!r} predicts tokens; a {self.embedding.modality} model "
                             "takes cls or contrastive")
        if self.decoder is not None and not self.decoder.cross_attention:
            raise ValueError("a decoder attends to the encoder: set decoder.cross_attention=true")
        return self

    @property
    def modality(self) -> str:
        return self.embedding.modality

    @property
    def is_encoder_decoder(self) -> bool:
        return self.decoder is not None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_defaults=False)


def _require(kind: str, name: str) -> None:
    names = COMPONENT_NAMES[kind]
    if name not in names:
        raise ValueError(f"unknown {kind.removesuffix('s')} {name!r}; choose from {sorted(names)}")


def _check_names(config: ModelConfig) -> None:
    """Fail at load time on any component name that no registry holds."""
    for part in config.embedding.parts:
        _require("embeddings", part)
    _require("encoders", config.encoder.name)
    _require("activations", config.encoder.activation)
    if config.target_embedding is not None:
        for part in config.target_embedding.parts:
            _require("target_embeddings", part)
    if config.decoder is not None:
        _require("decoders", config.decoder.name)
        _require("activations", config.decoder.activation)
    _require("targets", config.target.name)
    _require("pooling", config.target.pooling)


def load_config(path_or_name: str | Path) -> ModelConfig:
    """Read a config file, or a named config from ``training/configs`` ("minilm-l6", "tiny-bert")."""
    path = Path(path_or_name)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{path_or_name}.json"
    if not path.exists():
        names = ", ".join(available_configs())
        raise FileNotFoundError(f"no model config {path_or_name!r}; named configs: {names}")
    return ModelConfig.model_validate(json.loads(path.read_text()))


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
