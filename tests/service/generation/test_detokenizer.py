"""Incremental detokenization with a byte-level BPE trained here: streamed text equals the full
decode (emoji and CJK span several tokens), partial characters and possible stop strings are held
back, stop strings are cut and never returned, special tokens are skipped."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from service.generation.detokenizer import REPLACEMENT, IncrementalDetokenizer
from tests.tiny_llama import CORPUS

UNSEEN = ["Grüße aus Köln 👩‍👩‍👧 und こんにちは世界 中文测试 🎉🎉", "naïve café — «quotes» ½ ∑ 𝄞 clef"]


def _stream(tokenizer: Tokenizer, ids: list[int], stop: tuple[str, ...] = (),
            prompt: list[int] | None = None) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, prompt or [], stop)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finish())
    return pieces, detok


@pytest.mark.parametrize("text", CORPUS + UNSEEN)
def test_streamed_text_equals_the_full_decode(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    pieces, _ = _stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any(REPLACEMENT in p for p in pieces)  # a split character is held, never sent as U+FFFD
    prompt = tokenizer.encode("Prompt: 東京 ").ids
    assert "".join(_stream(tokenizer, ids, prompt=prompt)[0]) == text  # prompt context changes nothing


def test_characters_split_across_tokens_are_held_back(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🚀").ids
    assert len(ids) > 1  # byte-level BPE: four UTF-8 bytes, not all merged
    pieces, _ = _stream(tokenizer, ids)
    assert pieces[: len(ids) - 1] == [""] * (len(ids) - 1) and pieces[len(ids) - 1] == "🚀"


def test_random_ids_stream_as_the_full_decode(tokenizer: Tokenizer) -> None:
    """A random model emits any byte sequence; invalid UTF-8 then reads as U+FFFD in both."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(3, tokenizer.get_vocab_size(), size=40).tolist()
        assert "".join(_stream(tokenizer, ids)[0]) == tokenizer.decode(ids)


def test_special_tokens_are_skipped(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>assistant\nParis<|im_end|>").ids
    assert tokenizer.token_to_id("<|im_end|>") in ids
    assert "".join(_stream(tokenizer, ids)[0]) == "assistant\nParis"


def test_a_stop_string_is_cut_and_never_returned(tokenizer: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    pieces, detok = _stream(tokenizer, tokenizer.encode(text).ids, stop=("lazy",))
    assert detok.stopped and "".join(pieces) == "The quick brown fox jumps over the "
    sent = ""
    for piece in pieces:
        sent += piece
        assert "l" not in sent  # "l", "la", "laz" are held until they become "lazy" (or not)


def test_the_earliest_of_several_stop_strings_wins_across_tokens(tokenizer: Tokenizer) -> None:
    text = "数字 1234 と 漢字 のテスト"
    pieces, detok = _stream(tokenizer, tokenizer.encode(text).ids, stop=("テスト", "漢字", "1234 と"))
    assert detok.stopped and "".join(pieces) == "数字 "


def test_a_held_back_tail_is_released_when_it_does_not_become_a_stop_string(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Paris is the capital of France").ids
    detok = IncrementalDetokenizer(tokenizer, [], ("France!", "capital city"))
    assert "".join(detok.add(i) for i in ids) == "Paris is the capital of "  # "France" may become "France!"
    assert detok.finish() == "France" and not detok.stopped  # the sequence ended: it did not
