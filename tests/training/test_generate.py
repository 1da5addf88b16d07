import pytest
import torch

from training.generate import GenerationSettings, generate, top_p_filter
from training.model import build_model

from .conftest import shrink


def _greedy_without_cache(model, ids, steps, eos):
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = model(ids)[:, -1].argmax(-1)
            out.append(token)
            ids = torch.cat([ids, token[:, None]], dim=1)
    return torch.stack(out, dim=1)


def test_cached_greedy_equals_full_recompute_for_causal_lm():
    torch.manual_seed(0)
    model = build_model(shrink("gpt2", eos_token_id=None)).eval()
    prompt = torch.randint(0, 128, (2, 5))
    cached = generate(model, prompt, settings=GenerationSettings(max_new_tokens=12))
    assert torch.equal(cached, _greedy_without_cache(model, prompt, 12, None))


def test_cached_greedy_equals_full_recompute_for_seq2seq():
    torch.manual_seed(0)
    model = build_model(shrink("t5-small", eos_token_id=None)).eval()
    src = torch.randint(2, 128, (2, 7))
    mask = torch.ones_like(src)
    cached = generate(model, src, mask, GenerationSettings(max_new_tokens=10))
    ids = torch.zeros(2, 1, dtype=torch.long)
    expected = []
    with torch.no_grad():
        for _ in range(10):
            token = model(src, mask, decoder_input_ids=ids)[:, -1].argmax(-1)
            expected.append(token)
            ids = torch.cat([ids, token[:, None]], dim=1)
    assert torch.equal(cached, torch.stack(expected, dim=1))


def test_generation_stops_at_eos_and_sampling_is_seeded():
    torch.manual_seed(0)
    model = build_model(shrink("gpt2", eos_token_id=None)).eval()
    prompt = torch.randint(0, 128, (1, 4))
    first = int(generate(model, prompt, settings=GenerationSettings(max_new_tokens=1))[0, 0])
    stopping = build_model(shrink("gpt2", eos_token_id=first))
    stopping.load_state_dict(model.state_dict())
    assert generate(stopping, prompt, settings=GenerationSettings(max_new_tokens=9)).shape == (1, 1)
    sample = GenerationSettings(max_new_tokens=8, temperature=1.0, top_k=5, seed=3)
    assert torch.equal(generate(model, prompt, settings=sample), generate(model, prompt, settings=sample))


def test_encoders_without_lm_head_refuse_to_generate():
    model = build_model(shrink("tiny-bert"))
    with pytest.raises(ValueError, match="does not generate"):
        generate(model, torch.ones(1, 3, dtype=torch.long))


def test_stop_ids_end_a_sequence_and_finished_rows_pad():
    torch.manual_seed(0)
    model = build_model(shrink("gpt2", eos_token_id=None, pad_token_id=0)).eval()
    prompt = torch.randint(0, 128, (2, 4))
    free = generate(model, prompt, settings=GenerationSettings(max_new_tokens=6))
    stop = int(free[0, 1])
    stopped = generate(model, prompt, settings=GenerationSettings(max_new_tokens=6, stop_ids=(stop,)))
    first_stop = [int(row.tolist().index(stop)) if stop in row.tolist() else None for row in free]
    assert stopped.shape[1] == (6 if None in first_stop else max(first_stop) + 1)
    for row, end in enumerate(first_stop):
        if end is not None:
            assert torch.equal(stopped[row, : end + 1], free[row, : end + 1])
            assert bool(stopped[row, end + 1 :].eq(model.config.pad_token_id).all())


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_keeps_what_transformers_keeps(top_p):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    expected = TopPLogitsWarper(top_p)(None, logits.clone())
    assert torch.equal(top_p_filter(logits, top_p).isinf(), expected.isinf())


def test_tiny_top_p_samples_the_greedy_token():
    torch.manual_seed(0)
    model = build_model(shrink("gpt2", eos_token_id=None)).eval()
    prompt = torch.randint(0, 128, (2, 4))
    greedy = generate(model, prompt, settings=GenerationSettings(max_new_tokens=8))
    nucleus = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=5)
    assert torch.equal(generate(model, prompt, settings=nucleus), greedy)
