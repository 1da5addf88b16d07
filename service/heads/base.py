"""Shared by every encoder head: the model's own tokenizer, explicit truncation, padded batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.errors import InvalidInput
from service.repository import TOKENIZER_FILE, HeadMeta, load_head


@dataclass(frozen=True)
class Encoded:
    """One tokenized input: the unit the batcher queues and groups by length."""

    ids: tuple[int, ...]
    type_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.ids)


class TextEncoder:
    task = ""

    def __init__(self, version_dir: Path) -> None:
        self.meta: HeadMeta = load_head(version_dir)
        self.max_length: int = self.meta.max_length
        self.pad_id: int = self.meta.pad_token_id
        self.input_names: list[str] = list(self.meta.input_names)
        self.tokenizer = Tokenizer.from_file(str(Path(version_dir) / TOKENIZER_FILE))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._truncating = Tokenizer.from_str(self.tokenizer.to_str())
        self._truncating.enable_truncation(max_length=self.max_length)
        self.text_prefix: str = self.meta.text_prefix or ""

    def encode(self, texts: list[str], pairs: list[str] | None = None, truncate: bool = False,
               field: str = "texts") -> list[Encoded]:
        """Tokenize; over-long inputs are cut only when the caller asked (else a 400 naming the limit)."""
        if pairs is not None and len(pairs) != len(texts):
            raise InvalidInput(f"{field}: {len(texts)} texts but {len(pairs)} pair texts")
        tokenizer = self._truncating if truncate else self.tokenizer
        if self.text_prefix:  # part of the model's input format: counted in its max_length
            texts = [self.text_prefix + text for text in texts]
        if len(texts) == 1:  # the common case: no need to wake encode_batch's thread pool for one text
            batch = [tokenizer.encode(texts[0], pairs[0] if pairs is not None else None)]
        else:
            batch = tokenizer.encode_batch(list(zip(texts, pairs, strict=True)) if pairs is not None else texts)
        out = []
        for index, enc in enumerate(batch):
            if len(enc.ids) > self.max_length:
                raise InvalidInput(
                    f"{field}[{index}] is {len(enc.ids)} tokens; the model takes at most {self.max_length}. "
                    "Shorten it or set truncate=true"
                )
            out.append(Encoded(tuple(enc.ids), tuple(enc.type_ids)))
        return out

    def warm_up_items(self) -> list[Encoded]:
        """One real input for the warm-up pass a version makes before it takes traffic."""
        return self.encode(["warm up"], truncate=True)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def from_ids(self, rows: list[list[int]], truncate: bool = False, field: str = "input") -> list[Encoded]:
        """Token ids of the model's own vocabulary, used as given (special tokens included: /tokenize
        returns them), each checked before any work: in range, not empty, within max_length."""
        vocab = self.vocab_size
        out = []
        for index, row in enumerate(rows):
            if not row:
                raise InvalidInput(f"{field}[{index}]: an empty list of token ids")
            bad = next((t for t in row if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidInput(
                    f"{field}[{index}]: token id {bad} is outside this model's vocabulary (0..{vocab - 1}); token "
                    "ids must come from the model's own tokenizer (POST /tokenize). LangChain's OpenAIEmbeddings "
                    "sends tiktoken ids unless check_embedding_ctx_length=False")
            if len(row) > self.max_length:
                if not truncate:
                    raise InvalidInput(f"{field}[{index}] is {len(row)} tokens; the model takes at most "
                                       f"{self.max_length}. Shorten it or set truncate=true")
                row = row[: self.max_length]
            out.append(Encoded(tuple(row), (0,) * len(row)))
        return out

    def collate(self, items: list[Encoded]) -> dict[str, np.ndarray]:
        """Pad a batch to its longest item (the batcher keeps lengths close)."""
        longest = max(item.length for item in items)
        ids = np.full((len(items), longest), self.pad_id, dtype=np.int64)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for row, item in enumerate(items):
            ids[row, : item.length] = item.ids
            types[row, : item.length] = item.type_ids
            mask[row, : item.length] = 1
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: feed[name] for name in self.input_names}
