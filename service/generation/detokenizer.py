"""Incremental detokenization: the text each new token makes final, and stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character may span tokens: alone each
decodes to U+FFFD) and for SentencePiece (a word's leading space depends on what precedes it). So,
as Text Generation Inference does, decode a short window twice: ``ids[prefix:]`` and
``ids[prefix:read]``; the new text is the first's suffix past the second, and it is held back while
it ends in U+FFFD. Stop strings are matched on the decoded text; a tail that could still grow into
one is held back, and the stop string itself is never returned.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT = 5
"""Prompt tokens decoded before the first new one, so its leading space comes out as in context."""


class IncrementalDetokenizer:
    """One sequence's output text, fed a token at a time."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""
        """Everything decoded so far (emitted or held back), cut at a stop string once found."""
        self._sent = 0
        self.stopped = False
        """A stop string was found; nothing more is returned."""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def _new_text(self) -> str:
        """Text the tokens since ``read`` add, or "" while it ends in an incomplete character."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def add(self, token_id: int) -> str:
        """Append a token; return the text that became final (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        self.text += self._new_text()
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended: return everything still held back (an incomplete character decodes
        as U+FFFD), unless it completes a stop string, which is cut as always."""
        if self.stopped:
            return ""
        if self._read < len(self._ids):
            before = self._decode(self._ids[self._prefix:self._read])
            after = self._decode(self._ids[self._prefix:])
            self.text += after[len(before):]
            self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        """Check the unsent text for stop strings; return what may be sent now."""
        start = self._sent
        if self._stop:
            found = self._find_stop(start)
            if found is not None:
                self.stopped = True
                self.text = self.text[:found]
                self._sent = found
                return self.text[start:found]
        end = len(self.text) if final else len(self.text) - self._stop_prefix_tail(start)
        self._sent = max(end, start)
        return self.text[start:self._sent]

    def _find_stop(self, start: int) -> int | None:
        """The earliest index >= start where a stop string begins (text before ``start`` was sent,
        and a sent tail never begins a stop string: it would have been held back)."""
        hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _stop_prefix_tail(self, start: int) -> int:
        """Length of the longest unsent tail of the text that is a proper prefix of a stop string."""
        for length in range(min(self._longest_stop - 1, len(self.text) - start), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0
