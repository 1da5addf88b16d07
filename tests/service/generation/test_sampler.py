"""Sampling on last-position logits: greedy is argmax, the masks keep what they should, a seed
reproduces a request's draws whatever shares its batch, the repetition penalty lowers seen tokens."""

from __future__ import annotations

import numpy as np
import pytest

from service.generation.params import SamplingParams
from service.generation.sampler import (
    SamplerState,
    apply_repetition_penalty,
    sample,
    softmax,
    top_k_mask,
    top_p_mask,
)

VOCAB = 50


def _logits(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, size=(rows, VOCAB)).astype(np.float32)


def _states(n: int, **params: object) -> list[SamplerState]:
    return [SamplerState(SamplingParams.model_validate(params), VOCAB) for _ in range(n)]


def test_greedy_is_exactly_argmax_for_every_row() -> None:
    logits = _logits(8)
    assert sample(logits, _states(8)) == logits.argmax(-1).tolist()
    # on the per-row path too (a penalty of 1.0 with a temperature-0 neighbour that samples)
    mixed = [*_states(1), *_states(1, temperature=1.0, seed=3)]
    assert sample(logits[:2], mixed)[0] == int(logits[0].argmax())


def test_top_k_keeps_the_k_largest() -> None:
    row = np.array([1.0, 5.0, 3.0, 4.0, 2.0])
    kept = top_k_mask(row, 2)
    assert np.isfinite(kept).nonzero()[0].tolist() == [1, 3]
    assert top_k_mask(row, 0) is row  # 0: no cut


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    row = np.log(probs)
    assert np.isfinite(top_p_mask(row, 0.5)).nonzero()[0].tolist() == [0]
    assert np.isfinite(top_p_mask(row, 0.79)).nonzero()[0].tolist() == [0, 1]
    assert np.isfinite(top_p_mask(row, 0.81)).nonzero()[0].tolist() == [0, 1, 2]
    assert np.isfinite(top_p_mask(row, 1e-9)).nonzero()[0].tolist() == [0]  # the top token always stays


def test_sampled_tokens_stay_inside_top_k_and_top_p() -> None:
    logits = _logits(1, seed=1)[0]
    allowed_k = set(np.argsort(-logits)[:3].tolist())
    state = _states(1, temperature=1.5, top_k=3, seed=0)
    draws = {sample(logits[None], state)[0] for _ in range(200)}
    assert draws <= allowed_k and len(draws) > 1
    probs = softmax(logits)
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.6)) + 1].tolist())
    state = _states(1, temperature=1.0, top_p=0.6, seed=0)
    assert {sample(logits[None], state)[0] for _ in range(200)} <= nucleus


def test_a_seed_reproduces_the_draws_whatever_shares_the_batch() -> None:
    mine, others = _logits(1, seed=2)[0], _logits(3, seed=3)

    def run(batch: np.ndarray, states: list[SamplerState], row: int, steps: int = 30) -> list[int]:
        return [sample(batch, states)[row] for _ in range(steps)]

    alone = run(np.stack([mine, *others]), [*_states(1, temperature=1.0, seed=42), *_states(3, temperature=1.0)], 0)
    crowded = run(np.stack([others[0], others[1], mine, others[2]]),
                  [*_states(2, temperature=0.9), *_states(1, temperature=1.0, seed=42), *_states(1)], 2)
    assert alone == crowded
    other_seed = run(np.stack([mine, *others]), [*_states(1, temperature=1.0, seed=43), *_states(3)], 0)
    assert other_seed != alone


def test_repetition_penalty_lowers_seen_tokens_both_signs() -> None:
    logits = np.array([2.0, -2.0, 1.0, -1.0])
    seen = np.array([True, True, False, False])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, -1.0]  # positive divided, negative multiplied, unseen unchanged
    assert (out <= logits).all()
    # in the sampler: the seen argmax is penalized below the next token, greedy picks the other
    state = SamplerState(SamplingParams(repetition_penalty=3.0), 4, prompt_ids=[0])
    assert sample(np.array([[1.2, 1.1, 0.5, 0.0]]), [state]) == [1]
    state.observe(1)
    assert sample(np.array([[1.2, 1.1, 0.5, 0.0]]), [state]) == [2]


@pytest.mark.parametrize("penalty", [0.5, 1.0])
def test_no_penalty_or_a_reward_never_lowers(penalty: float) -> None:
    logits = np.array([2.0, -2.0])
    out = apply_repetition_penalty(logits, np.array([True, True]), penalty)
    assert (out >= logits).all()
