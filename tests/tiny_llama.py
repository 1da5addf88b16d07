"""The test suite's one tiny generator: a random Llama-style causal LM (RoPE, grouped-query attention,
RMSNorm, gated SiLU FFN) from the toolkit, with a byte-level BPE tokenizer trained here, at a size
where an export and an engine step take well under a second. The quantizer exports it, the engine
tests run its exported graph and the server tests serve it as published (tests/service/generation_repo.py)."""

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
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 0, 1, 2
"""The special tokens' ids (trained first, in this order, as in SmolLM2)."""
PAD_ID = IM_END_ID
"""The model's pad and eos id."""
STOP_IDS = [IM_END_ID, ENDOFTEXT_ID]
"""What ends a served generation: the end of the assistant's turn, and the end of a text."""
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
    "Le renard brun saute par-dessus le chien paresseux.", "数字 1234 と 漢字 のテスト",
    "emoji 🙂👍🏽 and tabs\tnewlines\n", "def add(a, b):\n    return a + b", "Serving models fast and honestly.",
    "Übergrößenträger zahlen mehr.", "東京は日本の首都です。", "emoji 🙂👍🏽 and 🚀 rockets",
    # "Привет, мир!" escaped: its Cyrillic letters look like Latin ones (ruff's RUF001)
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!",
]
"""What the tokenizer is trained on (multi-byte characters in several scripts), and prompts for tests."""


def train_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """Byte-level BPE (as GPT-2, Llama 3, SmolLM2): characters it saw rarely span several tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    assert [tokenizer.token_to_id(t) for t in SPECIAL] == [ENDOFTEXT_ID, IM_START_ID, IM_END_ID]
    return tokenizer


def tiny_config(vocab_size: int = 300, layers: int = 2) -> ModelConfig:
    return ModelConfig.model_validate(dict(
        vocab_size=vocab_size, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
        dropout=0.0, attention_dropout=0.0, layer_norm_eps=1e-5, pad_token_id=PAD_ID, eos_token_id=PAD_ID,
        embedding=dict(parts=["word"], layernorm=False),
        encoder=dict(num_layers=layers, layernorm_positioning="pre", layernorm="rms", feed_forward="gated",
                     activation="silu", bias=False, causal=True, position="rope", rope_theta=1e5),
        target=dict(name="lm", tie_weights=True)))


def tiny_llama(path: Path, seed: int = 0, max_length: int = 256) -> Checkpoint:
    """The model with random weights (scaled up so greedy outputs vary) and its tokenizer."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer()
    model = build_model(tiny_config(tokenizer.get_vocab_size())).eval()
    with torch.no_grad():  # larger than BERT's init, so layers move the residual and greedy outputs vary
        for name, param in model.named_parameters():  # (with the tied table dominating, they repeat a token)
            if param.dim() == 2:
                param.mul_(10 if "word" in name else 8)
    head = HeadInfo(task="lm", max_length=max_length)
    return Checkpoint(model=model, head=head, tokenizer=tokenizer, path=Path(path))


def tiny_chat_llama(path: Path, max_length: int) -> Checkpoint:
    """The model as a chat server serves it: a ChatML template, stop ids and a context of ``max_length``."""
    checkpoint = tiny_llama(path, max_length=max_length)
    checkpoint.head = checkpoint.head.model_copy(update={
        "chat_template": CHAT_TEMPLATE, "stop_token_ids": STOP_IDS, "eos_token": SPECIAL[IM_END_ID]})
    return checkpoint
