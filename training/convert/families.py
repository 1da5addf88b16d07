"""Model families we convert: HF config <-> our config, and the weight rules between them.

Each family knows its HF ``model_type``, how to read HF's config into ours (and back), and the
list of ``Rule``s for a given config. Heads are mapped by HF architecture name:
``*Model`` (bare encoder: we serve pooled sentence embeddings), ``*ForMaskedLM``,
``*ForSequenceClassification``, ``GPT2LMHeadModel``, ``LlamaForCausalLM``, ``T5ForConditionalGeneration``,
``ViTModel``, ``ViTForImageClassification``, ``Wav2Vec2Model`` and ``Wav2Vec2ForSequenceClassification``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

from training.config import EmbeddingConfig, ModelConfig, StackConfig, TargetConfig
from training.convert.rules import Rule


@dataclass(frozen=True)
class Family:
    model_type: str
    architectures: dict[str, str]  # HF architecture -> our target name
    to_ours: Callable[[dict[str, Any], str, dict[str, Any]], ModelConfig]
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    rules: Callable[[ModelConfig], list[Rule]]

    def architecture_for(self, target: str) -> str:
        for arch, name in self.architectures.items():
            if name == target:
                return arch
        raise ValueError(f"{self.model_type}: no Hugging Face architecture for target {target!r}")


# ---------------------------------------------------------------- BERT family (MiniLM, XLM-R)


def _encoder_only_config(hf: dict[str, Any], target: TargetConfig, xlmr: bool) -> ModelConfig:
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        pad_token_id=hf.get("pad_token_id", 1 if xlmr else 0),
        embedding=EmbeddingConfig(
            parts=("word", "pos", "seg"),
            max_position=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            position_padding_idx=hf.get("pad_token_id", 1) if xlmr else None,
        ),
        encoder=StackConfig(
            num_layers=hf["num_hidden_layers"],
            layernorm_positioning="post",
            activation=hf.get("hidden_act", "gelu"),
        ),
        target=target,
    )


def _encoder_only_target(arch_target: str, hf: dict[str, Any], extra: dict[str, Any]) -> TargetConfig:
    if arch_target == "contrastive":
        return TargetConfig(
            name="contrastive", pooling=extra.get("pooling", "mean"), normalize=extra.get("normalize", True)
        )
    if arch_target == "mlm":
        return TargetConfig(name="mlm", lm_transform=True, tie_weights=hf.get("tie_word_embeddings", True))
    labels = hf.get("id2label") or {}
    return TargetConfig(name="cls", pooling="cls", pooler_dense=True, num_labels=max(2, len(labels)))


def _encoder_only_to_hf(config: ModelConfig, model_type: str) -> dict[str, Any]:
    emb = config.embedding
    return {
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.encoder.num_layers,
        "hidden_act": config.encoder.activation,
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "layer_norm_eps": config.layer_norm_eps,
        "max_position_embeddings": emb.max_position,
        "type_vocab_size": emb.type_vocab_size,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": config.target.tie_weights,
    }


def _encoder_only_rules(config: ModelConfig, base: str, head: str) -> list[Rule]:
    b = f"{base}." if base else ""
    rules = [
        Rule("embedding.parts.word.weight", f"{b}embeddings.word_embeddings.weight"),
        Rule("embedding.parts.pos.weight", f"{b}embeddings.position_embeddings.weight"),
        Rule("embedding.parts.seg.weight", f"{b}embeddings.token_type_embeddings.weight"),
        Rule("embedding.layernorm.weight", f"{b}embeddings.LayerNorm.weight"),
        Rule("embedding.layernorm.bias", f"{b}embeddings.LayerNorm.bias"),
    ]
    for i in range(config.encoder.num_layers):
        ours, hf = f"encoder.layers.{i}.", f"{b}encoder.layer.{i}."
        pairs = {
            "self_attention.query": "attention.self.query",
            "self_attention.key": "attention.self.key",
            "self_attention.value": "attention.self.value",
            "self_attention.output": "attention.output.dense",
            "self_attention_norm": "attention.output.LayerNorm",
            "feed_forward.inner": "intermediate.dense",
            "feed_forward.outer": "output.dense",
            "feed_forward_norm": "output.LayerNorm",
        }
        for o, h in pairs.items():
            rules += [Rule(f"{ours}{o}.weight", f"{hf}{h}.weight"), Rule(f"{ours}{o}.bias", f"{hf}{h}.bias")]
    target = config.target.name
    if target == "mlm":
        lm = {"bert": "cls.predictions", "roberta": "lm_head"}[head]
        transform = "transform.dense" if head == "bert" else "dense"
        norm = "transform.LayerNorm" if head == "bert" else "layer_norm"
        rules += [
            Rule("target.transform.0.weight", f"{lm}.{transform}.weight"),
            Rule("target.transform.0.bias", f"{lm}.{transform}.bias"),
            Rule("target.transform.2.weight", f"{lm}.{norm}.weight"),
            Rule("target.transform.2.bias", f"{lm}.{norm}.bias"),
            Rule("target.decoder.bias", f"{lm}.bias"),
        ]
        if not config.target.tie_weights:
            rules.append(Rule("target.decoder.weight", f"{lm}.decoder.weight"))
    elif target == "cls":
        if head == "bert":
            dense, out = f"{b}pooler.dense", "classifier"
        else:
            dense, out = "classifier.dense", "classifier.out_proj"
        rules += [
            Rule("target.pooler.dense.weight", f"{dense}.weight"),
            Rule("target.pooler.dense.bias", f"{dense}.bias"),
            Rule("target.classifier.weight", f"{out}.weight"),
            Rule("target.classifier.bias", f"{out}.bias"),
        ]
    return rules


def _bert_to_ours(hf: dict[str, Any], arch: str, extra: dict[str, Any]) -> ModelConfig:
    return _encoder_only_config(hf, _encoder_only_target(BERT.architectures[arch], hf, extra), xlmr=False)


def _xlmr_to_ours(hf: dict[str, Any], arch: str, extra: dict[str, Any]) -> ModelConfig:
    return _encoder_only_config(hf, _encoder_only_target(XLMR.architectures[arch], hf, extra), xlmr=True)


def _bert_rules(config: ModelConfig) -> list[Rule]:
    # Bare BertModel checkpoints (sentence-transformers) name tensors without the "bert." prefix.
    base = "" if config.target.name == "contrastive" else "bert"
    return _encoder_only_rules(config, base, "bert")


def _xlmr_rules(config: ModelConfig) -> list[Rule]:
    base = "" if config.target.name == "contrastive" else "roberta"
    return _encoder_only_rules(config, base, "roberta")


BERT = Family(
    model_type="bert",
    architectures={
        "BertModel": "contrastive",
        "BertForMaskedLM": "mlm",
        "BertForSequenceClassification": "cls",
    },
    to_ours=_bert_to_ours,
    to_hf=lambda c: _encoder_only_to_hf(c, "bert"),
    rules=_bert_rules,
)

XLMR = Family(
    model_type="xlm-roberta",
    architectures={
        "XLMRobertaModel": "contrastive",
        "XLMRobertaForMaskedLM": "mlm",
        "XLMRobertaForSequenceClassification": "cls",
    },
    to_ours=_xlmr_to_ours,
    to_hf=lambda c: {**_encoder_only_to_hf(c, "xlm-roberta"), "bos_token_id": 0, "eos_token_id": 2},
    rules=_xlmr_rules,
)

# ---------------------------------------------------------------- GPT-2


def _gpt2_to_ours(hf: dict[str, Any], arch: str, extra: dict[str, Any]) -> ModelConfig:
    hidden = hf["n_embd"]
    eos = hf.get("eos_token_id", 50256)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_heads=hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        dropout=hf.get("resid_pdrop", 0.1),
        attention_dropout=hf.get("attn_pdrop", 0.1),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        pad_token_id=hf.get("pad_token_id") or eos,
        eos_token_id=eos,
        embedding=EmbeddingConfig(parts=("word", "pos"), max_position=hf["n_positions"], layernorm=False),
        encoder=StackConfig(
            num_layers=hf["n_layer"],
            layernorm_positioning="pre",
            activation=hf.get("activation_function", "gelu_new"),
            causal=True,
        ),
        target=TargetConfig(name="lm", tie_weights=hf.get("tie_word_embeddings", True)),
    )


def _gpt2_to_hf(config: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_embd": config.hidden_size,
        "n_head": config.num_heads,
        "n_inner": config.intermediate_size,
        "n_layer": config.encoder.num_layers,
        "n_positions": config.embedding.max_position,
        "activation_function": config.encoder.activation,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.attention_dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "bos_token_id": config.eos_token_id,
        "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": config.target.tie_weights,
    }


def _gpt2_rules(config: ModelConfig) -> list[Rule]:
    rules = [
        Rule("embedding.parts.word.weight", "transformer.wte.weight"),
        Rule("embedding.parts.pos.weight", "transformer.wpe.weight"),
        Rule("encoder.final_norm.weight", "transformer.ln_f.weight"),
        Rule("encoder.final_norm.bias", "transformer.ln_f.bias"),
    ]
    for i in range(config.encoder.num_layers):
        ours, hf = f"encoder.layers.{i}.", f"transformer.h.{i}."
        for part, name in enumerate(("query", "key", "value")):
            rules.append(Rule(f"{ours}self_attention.{name}.weight", f"{hf}attn.c_attn.weight", "split", part))
            rules.append(Rule(f"{ours}self_attention.{name}.bias", f"{hf}attn.c_attn.bias", "split", part))
        for o, h in {
            "self_attention.output": "attn.c_proj",
            "feed_forward.inner": "mlp.c_fc",
            "feed_forward.outer": "mlp.c_proj",
        }.items():
            rules += [
                Rule(f"{ours}{o}.weight", f"{hf}{h}.weight", "transpose"),
                Rule(f"{ours}{o}.bias", f"{hf}{h}.bias"),
            ]
        for o, h in {"self_attention_norm": "ln_1", "feed_forward_norm": "ln_2"}.items():
            rules += [Rule(f"{ours}{o}.weight", f"{hf}{h}.weight"), Rule(f"{ours}{o}.bias", f"{hf}{h}.bias")]
    if not config.target.tie_weights:
        rules.append(Rule("target.decoder.weight", "lm_head.weight"))
    return rules


GPT2 = Family(
    model_type="gpt2",
    architectures={"GPT2LMHeadModel": "lm"},
    to_ours=_gpt2_to_ours,
    to_hf=_gpt2_to_hf,
    rules=_gpt2_rules,
)

# ---------------------------------------------------------------- T5


def _t5_stack(hf: dict[str, Any], layers: int, decoder: bool) -> StackConfig:
    act = hf.get("feed_forward_proj", "relu")
    gated = act.startswith("gated-")
    return StackConfig(
        num_layers=layers,
        layernorm_positioning="pre",
        layernorm="rms",
        feed_forward="gated" if gated else "dense",
        activation={"gelu": "gelu_new"}.get(act.removeprefix("gated-"), act.removeprefix("gated-")),
        bias=False,
        relative_position=True,
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        attention_scale=False,
        causal=decoder,
        cross_attention=decoder,
    )


def _t5_to_ours(hf: dict[str, Any], arch: str, extra: dict[str, Any]) -> ModelConfig:
    tied = hf.get("tie_word_embeddings", True)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["d_model"],
        num_heads=hf["num_heads"],
        head_dim=hf["d_kv"],
        intermediate_size=hf["d_ff"],
        dropout=hf.get("dropout_rate", 0.1),
        attention_dropout=hf.get("dropout_rate", 0.1),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        pad_token_id=hf.get("pad_token_id", 0),
        eos_token_id=hf.get("eos_token_id", 1),
        decoder_start_token_id=hf.get("decoder_start_token_id", 0),
        share_embeddings=True,
        embedding=EmbeddingConfig(parts=("word",), layernorm=False),
        encoder=_t5_stack(hf, hf["num_layers"], decoder=False),
        target_embedding=EmbeddingConfig(parts=("word",), layernorm=False),
        decoder=_t5_stack(hf, hf.get("num_decoder_layers") or hf["num_layers"], decoder=True),
        target=TargetConfig(name="seq2seq_lm", tie_weights=tied, scale_logits=tied),
    )


def _t5_to_hf(config: ModelConfig) -> dict[str, Any]:
    assert config.decoder is not None
    act = {"gelu_new": "gelu"}.get(config.encoder.activation, config.encoder.activation)
    return {
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.hidden_size,
        "num_heads": config.num_heads,
        "d_kv": config.attention_head_dim,
        "d_ff": config.intermediate_size,
        "num_layers": config.encoder.num_layers,
        "num_decoder_layers": config.decoder.num_layers,
        "feed_forward_proj": ("gated-" if config.encoder.feed_forward == "gated" else "") + act,
        "relative_attention_num_buckets": config.encoder.relative_buckets,
        "relative_attention_max_distance": config.encoder.relative_max_distance,
        "dropout_rate": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        "tie_word_embeddings": config.target.tie_weights,
        "is_encoder_decoder": True,
    }


def _t5_rules(config: ModelConfig) -> list[Rule]:
    assert config.decoder is not None
    rules = [Rule("embedding.parts.word.weight", "shared.weight")]
    gated = config.encoder.feed_forward == "gated"
    ffn = {"feed_forward.outer": "wo"}
    ffn.update({"feed_forward.inner": "wi_1", "feed_forward.gate": "wi_0"} if gated else {"feed_forward.inner": "wi"})
    for stack, ours_stack in (("encoder", "encoder"), ("decoder", "decoder")):
        layers = config.encoder.num_layers if stack == "encoder" else config.decoder.num_layers
        rules += [
            Rule(f"{ours_stack}.relative_bias.embedding.weight",
                 f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
            Rule(f"{ours_stack}.final_norm.weight", f"{stack}.final_layer_norm.weight"),
        ]
        for i in range(layers):
            ours, hf = f"{ours_stack}.layers.{i}.", f"{stack}.block.{i}.layer."
            for o, h in zip(("query", "key", "value", "output"), "qkvo"):
                rules.append(Rule(f"{ours}self_attention.{o}.weight", f"{hf}0.SelfAttention.{h}.weight"))
            rules.append(Rule(f"{ours}self_attention_norm.weight", f"{hf}0.layer_norm.weight"))
            ff = 1
            if stack == "decoder":
                ff = 2
                for o, h in zip(("query", "key", "value", "output"), "qkvo"):
                    rules.append(Rule(f"{ours}cross_attention.{o}.weight", f"{hf}1.EncDecAttention.{h}.weight"))
                rules.append(Rule(f"{ours}cross_attention_norm.weight", f"{hf}1.layer_norm.weight"))
            for o, h in ffn.items():
                rules.append(Rule(f"{ours}{o}.weight", f"{hf}{ff}.DenseReluDense.{h}.weight"))
            rules.append(Rule(f"{ours}feed_forward_norm.weight", f"{hf}{ff}.layer_norm.weight"))
    if not config.target.tie_weights:
        rules.append(Rule("target.decoder.weight", "lm_head.weight"))
    return rules


T5 = Family(
    model_type="t5",
    architectures={"T5ForConditionalGeneration": "seq2seq_lm"},
    to_ours=_t5_to_ours,
    to_hf=_t5_to_hf,
    rules=_t5_rules,
)

# ---------------------------------------------------------------- Llama (SmolLM2, TinyLlama, Llama 2/3)


def _llama_to_ours(hf: dict[str, Any], arch: str, extra: dict[str, Any]) -> ModelConfig:
    if hf.get("rope_scaling"):
        raise ValueError("llama: rope_scaling is not supported yet (plain RoPE only)")
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    pad = hf.get("pad_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        dropout=0.0,
        attention_dropout=hf.get("attention_dropout", 0.0),
        layer_norm_eps=hf.get("rms_norm_eps", 1e-6),
        pad_token_id=pad if pad is not None else (eos if eos is not None else 0),
        eos_token_id=eos,
        embedding=EmbeddingConfig(parts=("word",), layernorm=False,
                                  max_position=hf.get("max_position_embeddings", 2048)),
        encoder=StackConfig(
            num_layers=hf["num_hidden_layers"],
            layernorm_positioning="pre",
            layernorm="rms",
            feed_forward="gated",
            activation=hf.get("hidden_act", "silu"),
            bias=bool(hf.get("attention_bias", False)),
            causal=True,
            position="rope",
            rope_theta=float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
        ),
        target=TargetConfig(name="lm", tie_weights=hf.get("tie_word_embeddings", False)),
    )


def _llama_to_hf(config: ModelConfig) -> dict[str, Any]:
    stack = config.encoder
    return {
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.key_value_heads,
        "head_dim": config.attention_head_dim,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": stack.num_layers,
        "hidden_act": stack.activation,
        "attention_bias": stack.bias,
        "mlp_bias": False,
        "attention_dropout": config.attention_dropout,
        "rms_norm_eps": config.layer_norm_eps,
        "rope_theta": stack.rope_theta,
        "max_position_embeddings": config.embedding.max_position,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": None,
        "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": config.target.tie_weights,
    }


def _llama_rules(config: ModelConfig) -> list[Rule]:
    rules = [
        Rule("embedding.parts.word.weight", "model.embed_tokens.weight"),
        Rule("encoder.final_norm.weight", "model.norm.weight"),
    ]
    for i in range(config.encoder.num_layers):
        ours, hf = f"encoder.layers.{i}.", f"model.layers.{i}."
        pairs = {
            "self_attention.query": "self_attn.q_proj",
            "self_attention.key": "self_attn.k_proj",
            "self_attention.value": "self_attn.v_proj",
            "self_attention.output": "self_attn.o_proj",
            "feed_forward.gate": "mlp.gate_proj",
            "feed_forward.inner": "mlp.up_proj",
            "feed_forward.outer": "mlp.down_proj",
        }
        for o, h in pairs.items():
            rules.append(Rule(f"{ours}{o}.weight", f"{hf}{h}.weight"))
            if config.encoder.bias and o.startswith("self_attention"):
                rules.append(Rule(f"{ours}{o}.bias", f"{hf}{h}.bias"))
        rules.append(Rule(f"{ours}self_attention_norm.weight", f"{hf}input_layernorm.weight"))
        rules.append(Rule(f"{ours}feed_forward_norm.weight", f"{hf}post_attention_layernorm.weight"))
    if not config.target.tie_weights:
        rules.append(Rule("target.decoder.weight", "lm_head.weight"))
    return rules


LLAMA = Family(
    model_type="llama",
    architectures={"LlamaForCausalLM": "lm"},
    to_ours=_llama_to_ours,
    to_hf=_llama_to_hf,
    rules=_llama_rules,
)

# ---------------------------------------------------------------- ViT (images)


def _vit_to_ours(hf: dict[str, Any], arch: str, extra: dict[str, Any]) -> ModelConfig:
    if VIT.architectures[arch] == "cls":
        labels = hf.get("id2label") or {}
        target = TargetConfig(name="cls", pooling="cls", num_labels=max(2, len(labels)))
    else:  # ViTModel: the pooled output is dense + tanh on the class token
        target = TargetConfig(name="contrastive", pooling="cls", pooler_dense=True, normalize=False)
    if hf.get("pooler_act", "tanh") != "tanh" or hf.get("pooler_output_size", hf["hidden_size"]) != hf["hidden_size"]:
        raise ValueError("only ViT's default pooler (tanh, hidden_size wide) is supported")
    return ModelConfig(
        vocab_size=0,
        hidden_size=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        dropout=hf.get("hidden_dropout_prob", 0.0),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        embedding=EmbeddingConfig(parts=("patch",), layernorm=False, image_size=hf.get("image_size", 224),
                                  patch_size=hf.get("patch_size", 16), num_channels=hf.get("num_channels", 3)),
        encoder=StackConfig(num_layers=hf["num_hidden_layers"], layernorm_positioning="pre",
                            final_layernorm=True, activation=hf.get("hidden_act", "gelu"),
                            bias=bool(hf.get("qkv_bias", True))),
        target=target,
    )


def _vit_to_hf(config: ModelConfig) -> dict[str, Any]:
    emb = config.embedding
    return {
        "model_type": "vit",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.encoder.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.encoder.activation,
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "layer_norm_eps": config.layer_norm_eps,
        "image_size": emb.image_size,
        "patch_size": emb.patch_size,
        "num_channels": emb.num_channels,
        "qkv_bias": config.encoder.bias,
        "pooler_output_size": config.hidden_size,
        "pooler_act": "tanh",
    }


def _vit_rules(config: ModelConfig) -> list[Rule]:
    if config.modality != "image" or config.encoder.layernorm_positioning != "pre":
        raise ValueError("the ViT family exports pre-LN image models (embedding part 'patch')")
    if config.target.name == "cls" and config.target.pooler_dense:
        raise ValueError("ViTForImageClassification has no pooler: train the cls target without pooler_dense")
    b = "vit." if config.target.name == "cls" else ""
    rules = [
        Rule("embedding.parts.patch.cls", f"{b}embeddings.cls_token"),
        Rule("embedding.parts.patch.positions", f"{b}embeddings.position_embeddings"),
        Rule("embedding.parts.patch.projection.weight", f"{b}embeddings.patch_embeddings.projection.weight"),
        Rule("embedding.parts.patch.projection.bias", f"{b}embeddings.patch_embeddings.projection.bias"),
        Rule("encoder.final_norm.weight", f"{b}layernorm.weight"),
        Rule("encoder.final_norm.bias", f"{b}layernorm.bias"),
    ]
    pairs = {  # the names transformers writes to disk (it renames its in-memory layers on save)
        "self_attention.query": "attention.attention.query",
        "self_attention.key": "attention.attention.key",
        "self_attention.value": "attention.attention.value",
        "self_attention.output": "attention.output.dense",
        "self_attention_norm": "layernorm_before",
        "feed_forward.inner": "intermediate.dense",
        "feed_forward.outer": "output.dense",
        "feed_forward_norm": "layernorm_after",
    }
    for i in range(config.encoder.num_layers):
        for o, h in pairs.items():
            rules.append(Rule(f"encoder.layers.{i}.{o}.weight", f"{b}encoder.layer.{i}.{h}.weight"))
            if config.encoder.bias or not o.startswith("self_attention."):
                rules.append(Rule(f"encoder.layers.{i}.{o}.bias", f"{b}encoder.layer.{i}.{h}.bias"))
    if config.target.name == "cls":
        rules += [Rule("target.classifier.weight", "classifier.weight"),
                  Rule("target.classifier.bias", "classifier.bias")]
    else:
        rules += [Rule("target.pooler.dense.weight", "pooler.dense.weight"),
                  Rule("target.pooler.dense.bias", "pooler.dense.bias")]
    return rules


_VIT_IN_MEMORY = (  # transformers 5's module names, for a state dict saved without its save_pretrained
    (re.compile(r"(^|\.)layers\.(\d+)\."), r"\1encoder.layer.\2."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
)


def vit_saved_names(state: dict[str, Any]) -> dict[str, Any]:
    """Tensor names of a ViT checkpoint as ``save_pretrained`` writes them (``encoder.layer.N.attention.
    attention.query``), also for a raw state dict of transformers 5's modules (``layers.N.attention.q_proj``)."""
    renamed = {}
    for name, tensor in state.items():
        for pattern, replacement in _VIT_IN_MEMORY:
            name = pattern.sub(replacement, name)
        renamed[name] = tensor
    return renamed


VIT = Family(
    model_type="vit",
    architectures={"ViTModel": "contrastive", "ViTForImageClassification": "cls"},
    to_ours=_vit_to_ours,
    to_hf=_vit_to_hf,
    rules=_vit_rules,
)

# ---------------------------------------------------------------- wav2vec2 (audio)


def _wav2vec2_to_ours(hf: dict[str, Any], arch: str, extra: dict[str, Any]) -> ModelConfig:
    unsupported = {"feat_extract_norm": "group", "do_stable_layer_norm": False, "feat_extract_activation": "gelu",
                   "use_weighted_layer_sum": False, "add_adapter": False}
    for key, supported in unsupported.items():
        if hf.get(key, supported) != supported:
            raise ValueError(f"wav2vec2 with {key}={hf[key]!r} is not supported (only {supported!r}: the base layout)")
    if WAV2VEC2.architectures[arch] == "cls":
        labels = hf.get("id2label") or {}
        target = TargetConfig(name="cls", pooling="mean", num_labels=max(2, len(labels)),
                              classifier_proj_size=hf.get("classifier_proj_size", 256))
    else:  # Wav2Vec2Model: frames averaged into one vector
        target = TargetConfig(name="contrastive", pooling="mean", normalize=False)
    return ModelConfig(
        vocab_size=0,
        hidden_size=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        dropout=hf.get("hidden_dropout", 0.1),
        attention_dropout=hf.get("attention_dropout", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
        embedding=EmbeddingConfig(
            parts=("waveform",), layernorm=True, conv_dim=tuple(hf["conv_dim"]), conv_kernel=tuple(hf["conv_kernel"]),
            conv_stride=tuple(hf["conv_stride"]), conv_bias=bool(hf.get("conv_bias", False)),
            num_conv_pos_embeddings=hf.get("num_conv_pos_embeddings", 128),
            num_conv_pos_embedding_groups=hf.get("num_conv_pos_embedding_groups", 16)),
        encoder=StackConfig(num_layers=hf["num_hidden_layers"], layernorm_positioning="post",
                            activation=hf.get("hidden_act", "gelu")),
        target=target,
    )


def _wav2vec2_to_hf(config: ModelConfig) -> dict[str, Any]:
    emb = config.embedding
    out = {
        "model_type": "wav2vec2",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.encoder.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.encoder.activation,
        "hidden_dropout": config.dropout,
        "attention_dropout": config.attention_dropout,
        "layer_norm_eps": config.layer_norm_eps,
        "feat_extract_norm": "group",
        "feat_extract_activation": "gelu",
        "do_stable_layer_norm": False,
        "conv_dim": list(emb.conv_dim),
        "conv_kernel": list(emb.conv_kernel),
        "conv_stride": list(emb.conv_stride),
        "conv_bias": emb.conv_bias,
        "num_feat_extract_layers": len(emb.conv_dim),
        "num_conv_pos_embeddings": emb.num_conv_pos_embeddings,
        "num_conv_pos_embedding_groups": emb.num_conv_pos_embedding_groups,
        "vocab_size": 32,  # the CTC head's, unused by these architectures
    }
    if config.target.classifier_proj_size:
        out["classifier_proj_size"] = config.target.classifier_proj_size
    return out


def _wav2vec2_rules(config: ModelConfig) -> list[Rule]:
    if config.modality != "audio" or config.encoder.layernorm_positioning != "post":
        raise ValueError("the wav2vec2 family exports post-LN audio models (embedding part 'waveform')")
    if config.target.name == "cls" and (config.target.pooling != "mean" or config.target.pooler_dense
                                        or not config.target.classifier_proj_size):
        raise ValueError("Wav2Vec2ForSequenceClassification pools by mean and projects (classifier_proj_size)")
    b = "wav2vec2." if config.target.name == "cls" else ""
    w = "embedding.parts.waveform."
    rules = []
    for i in range(len(config.embedding.conv_dim)):
        rules.append(Rule(f"{w}convs.{i}.weight", f"{b}feature_extractor.conv_layers.{i}.conv.weight"))
        if config.embedding.conv_bias:
            rules.append(Rule(f"{w}convs.{i}.bias", f"{b}feature_extractor.conv_layers.{i}.conv.bias"))
    pairs = {
        f"{w}conv_norm": "feature_extractor.conv_layers.0.layer_norm",
        f"{w}feature_norm": "feature_projection.layer_norm",
        f"{w}projection": "feature_projection.projection",
        "embedding.layernorm": "encoder.layer_norm",
    }
    for i in range(config.encoder.num_layers):
        ours, hf = f"encoder.layers.{i}.", f"encoder.layers.{i}."
        pairs.update({
            f"{ours}self_attention.query": f"{hf}attention.q_proj",
            f"{ours}self_attention.key": f"{hf}attention.k_proj",
            f"{ours}self_attention.value": f"{hf}attention.v_proj",
            f"{ours}self_attention.output": f"{hf}attention.out_proj",
            f"{ours}self_attention_norm": f"{hf}layer_norm",
            f"{ours}feed_forward.inner": f"{hf}feed_forward.intermediate_dense",
            f"{ours}feed_forward.outer": f"{hf}feed_forward.output_dense",
            f"{ours}feed_forward_norm": f"{hf}final_layer_norm",
        })
    for o, h in pairs.items():
        rules += [Rule(f"{o}.weight", f"{b}{h}.weight"), Rule(f"{o}.bias", f"{b}{h}.bias")]
    position = f"{b}encoder.pos_conv_embed.conv"
    rules += [
        Rule(f"{w}position.bias", f"{position}.bias"),
        Rule(f"{w}position.parametrizations.weight.original0", f"{position}.parametrizations.weight.original0"),
        Rule(f"{w}position.parametrizations.weight.original1", f"{position}.parametrizations.weight.original1"),
        Rule(f"{w}mask", f"{b}masked_spec_embed"),
    ]
    if config.target.name == "cls":
        rules += [Rule("target.projector.weight", "projector.weight"), Rule("target.projector.bias", "projector.bias"),
                  Rule("target.classifier.weight", "classifier.weight"),
                  Rule("target.classifier.bias", "classifier.bias")]
    return rules


def wav2vec2_saved_names(state: dict[str, Any], config: ModelConfig) -> dict[str, Any]:
    """Older checkpoints store the positional convolution's weight norm as ``weight_g`` / ``weight_v``
    (torch's old weight_norm); a checkpoint saved without SpecAugment has no ``masked_spec_embed``
    (zeros, which is what an unused mask vector holds)."""
    renamed = {name.replace(".conv.weight_g", ".conv.parametrizations.weight.original0")
               .replace(".conv.weight_v", ".conv.parametrizations.weight.original1"): tensor
               for name, tensor in state.items()}
    b = "wav2vec2." if config.target.name == "cls" else ""
    if f"{b}masked_spec_embed" not in renamed:
        import torch

        renamed[f"{b}masked_spec_embed"] = torch.zeros(config.hidden_size)
    return renamed


WAV2VEC2 = Family(
    model_type="wav2vec2",
    architectures={"Wav2Vec2Model": "contrastive", "Wav2Vec2ForSequenceClassification": "cls"},
    to_ours=_wav2vec2_to_ours,
    to_hf=_wav2vec2_to_hf,
    rules=_wav2vec2_rules,
)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (BERT, XLMR, GPT2, T5, LLAMA, VIT, WAV2VEC2)}


def family_of(config: ModelConfig) -> Family:
    """Which HF family an (imported) config of ours exports to."""
    if config.modality == "audio":
        return WAV2VEC2
    if config.modality == "image":
        return VIT
    if config.decoder is not None:
        return T5
    if config.encoder.causal:
        return LLAMA if config.encoder.position == "rope" else GPT2
    return XLMR if config.embedding.position_padding_idx is not None else BERT
