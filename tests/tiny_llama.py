"""A tiny random Llama-style causal LM (RoPE, grouped-query attention, RMSNorm, gated SiLU FFN):
the real toolkit model at a size where exports and engine tests take well under a second."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from training.checkpoint import Checkpoint, HeadInfo
from training.config import ModelConfig
from training.model import build_model

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
    "Le renard brun saute par-dessus le chien paresseux.", "数字 1234 と 漢字 のテスト", "emoji 🙂👍🏽 and tabs\tnewlines\n",
    "def add(a, b):\n    return a + b", "Serving models fast and honestly.",
]


def train_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """Byte-level BPE trained on a small multilingual corpus (special ids 0, 1, 2 as in SmolLM2)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return tokenizer


def tiny_config(vocab_size: int = 300, layers: int = 2) -> ModelConfig:
    return ModelConfig.model_validate(dict(
        vocab_size=vocab_size, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
        dropout=0.0, attention_dropout=0.0, layer_norm_eps=1e-5, pad_token_id=2, eos_token_id=2,
        embedding=dict(parts=["word"], layernorm=False),
        encoder=dict(num_layers=layers, layernorm_positioning="pre", layernorm="rms", feed_forward="gated",
                     activation="silu", bias=False, causal=True, position="rope", rope_theta=1e5),
        target=dict(name="lm", tie_weights=True)))


def tiny_llama(path: Path, seed: int = 0) -> Checkpoint:
    """The model with random weights (scaled up so greedy outputs vary) and its tokenizer."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    model = build_model(tiny_config(tokenizer.get_vocab_size())).eval()
    with torch.no_grad():  # larger than BERT's init, so layers move the residual and outputs vary
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.mul_(25 if "word" in name else 6)
    head = HeadInfo(task="lm", max_length=256)
    return Checkpoint(model=model, head=head, tokenizer=tokenizer, path=Path(path))
