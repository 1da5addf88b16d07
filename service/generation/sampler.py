"""Next-token choice from the last position's logits, per sequence, in numpy.

Each sequence carries its own state (parameters, a numpy Generator, the tokens it has seen), so a
seeded request draws the same tokens whatever else shares its batch, and a greedy one is exactly
the argmax of its (penalized) logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from service.generation.params import SamplingParams


class SamplerState:
    """One sequence's sampling state: its parameters, its random stream, and (only when a
    repetition penalty is asked for) a mask of the token ids in its prompt and output."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Iterable[int] = ()) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)  # seed None: fresh entropy
        self.seen: np.ndarray | None = None
        if params.repetition_penalty != 1.0:
            self.seen = np.zeros(vocab_size, dtype=bool)
            ids = np.fromiter(prompt_ids, dtype=np.int64)
            self.seen[ids[(ids >= 0) & (ids < vocab_size)]] = True

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0.0

    def observe(self, token_id: int) -> None:
        """A token was appended to the sequence: it now counts for the repetition penalty."""
        if self.seen is not None and 0 <= token_id < self.seen.shape[0]:
            self.seen[token_id] = True


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL / Hugging Face: a seen token's positive logit is divided by the penalty, a negative one
    multiplied, so a penalty > 1 always makes it less likely (and < 1 more likely)."""
    out = logits.copy()
    picked = out[seen]
    out[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (ties with the k-th kept too), the rest -inf; k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def top_p_mask(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: keep the most likely tokens whose probabilities first reach ``p`` (the most likely
    one always kept), the rest -inf."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    cumulative = np.cumsum(probs)
    keep = int(np.searchsorted(cumulative, p, side="left")) + 1  # the first prefix with mass >= p
    out = np.full_like(logits, -np.inf)
    kept = order[:keep]
    out[kept] = logits[kept]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64 (a stable cumulative sum for top-p and the draw)."""
    shifted = logits.astype(np.float64) - np.max(logits)
    weights = np.exp(shifted)
    return weights / weights.sum()


def sample_row(logits: np.ndarray, state: SamplerState) -> int:
    """One sequence's next token from its (V,) logits."""
    params = state.params
    if state.seen is not None:
        logits = apply_repetition_penalty(logits, state.seen, params.repetition_penalty)
    if state.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    scaled = top_p_mask(top_k_mask(scaled, params.top_k), params.top_p)
    cumulative = np.cumsum(softmax(scaled))
    draw = state.rng.random() * cumulative[-1]
    index = int(np.searchsorted(cumulative, draw, side="right"))
    return min(index, logits.shape[-1] - 1)


def sample(logits: np.ndarray, states: Sequence[SamplerState]) -> list[int]:
    """Next token ids for a (B, V) batch of last-position logits, row i with ``states[i]``."""
    if len(states) != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits for {len(states)} sequences")
    if all(s.greedy and s.seen is None for s in states):  # the common case: one argmax for the batch
        return [int(i) for i in np.argmax(logits, axis=-1)]
    return [sample_row(row, state) for row, state in zip(logits, states, strict=True)]
