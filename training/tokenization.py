"""Tokenize texts with the model's own tokenizer into the tensors our model takes."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer


def configured(tokenizer: Tokenizer, max_length: int, pad_id: int) -> Tokenizer:
    """A copy of ``tokenizer`` that truncates to ``max_length`` and pads batches to their longest."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id) or "[PAD]")
    return tok


def encode(
    tokenizer: Tokenizer, texts: list[str], pairs: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Texts (and optional second texts) -> input_ids, attention_mask, token_type_ids, each (B, T)."""
    if pairs is not None:
        if len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pair texts")
        encodings = tokenizer.encode_batch(list(zip(texts, pairs)))
    else:
        encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
        "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        "token_type_ids": torch.tensor([e.type_ids for e in encodings], dtype=torch.long),
    }
