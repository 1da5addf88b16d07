"""Llama (RoPE, grouped-query attention) through our converter: cached decoding, left-padded batches
and greedy generation against a tiny random transformers LlamaForCausalLM."""

import pytest
import torch

from training.convert.hf import import_hf
from training.generate import GenerationSettings, generate

from .test_convert import _save_hf

ARCH = "LlamaForCausalLM"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def llama(tmp_path_factory, minilm_dir):
    """(transformers reference, our import): 2 layers, 4 query / 2 key-value heads, rope_theta 1e5."""
    directory = tmp_path_factory.mktemp("llama")
    reference = _save_hf(ARCH, directory, minilm_dir)
    assert reference.config.num_key_value_heads == 2 and reference.config.num_attention_heads == 4
    checkpoint, unused = import_hf(directory)
    assert not unused and checkpoint.config.encoder.rope_theta == 1e5
    return reference, checkpoint.model


def _ids(lengths: list[int], pad: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded into one batch, and their mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(5, 160, (length,), generator=g)
        mask[row, width - length:] = 1
    return ids, mask


@torch.no_grad()
def test_cached_decoding_matches_the_full_forward(llama):
    reference, model = llama
    ids, _ = _ids([14], pad=2)
    full = reference(ids).logits[0]
    out = model.encode(ids[:, :6], use_cache=True)
    steps = [model.target(out.hidden, None)[0]]
    for t in range(6, ids.shape[1]):
        out = model.encode(ids[:, t:t + 1], past=out.cache, use_cache=True)
        steps.append(model.target(out.hidden, None)[0])
    assert float((torch.cat(steps) - full).abs().max()) <= TOLERANCE


@torch.no_grad()
def test_left_padded_batch_matches_each_row_alone(llama):
    reference, model = llama
    lengths = [9, 4, 12]
    ids, mask = _ids(lengths, pad=model.config.pad_token_id)
    batched = model(ids, mask)
    for row, length in enumerate(lengths):
        alone = ids[row:row + 1, -length:]
        expected = model(alone)[0]
        assert float((batched[row, -length:] - expected).abs().max()) <= TOLERANCE
        assert float((expected - reference(alone).logits[0]).abs().max()) <= TOLERANCE


@torch.no_grad()
def test_greedy_generation_on_a_left_padded_batch_equals_transformers(llama):
    reference, model = llama
    config = model.config
    ids, mask = _ids([7, 3, 11], pad=config.pad_token_id, seed=1)
    new = 20
    ours = generate(model, ids, mask, GenerationSettings(max_new_tokens=new))
    theirs = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
    assert torch.equal(ours, theirs[:, ids.shape[1]:])


def test_learned_positions_still_refuse_padded_prompts(shrink_config):
    from training.model import build_model

    model = build_model(shrink_config("gpt2"))
    ids, mask = _ids([5, 3], pad=0)
    with pytest.raises(ValueError, match="equal length"):
        generate(model, ids % 128, mask)


def test_right_padding_is_refused(llama):
    _, model = llama
    ids, mask = _ids([5, 3], pad=model.config.pad_token_id)
    with pytest.raises(ValueError, match="left"):
        generate(model, ids.flip(1), mask.flip(1))


@torch.no_grad()
def test_cache_holds_key_value_heads_only(llama):
    _, model = llama
    config = model.config
    ids, mask = _ids([6, 4], pad=config.pad_token_id)
    cache = model.encode(ids, mask, use_cache=True).cache
    assert config.key_value_heads == 2 < config.num_heads
    assert len(cache) == config.encoder.num_layers
    for keys, values, cross_keys, cross_values in cache:
        assert keys.shape == values.shape == (2, config.key_value_heads, 6, config.attention_head_dim)
        assert cross_keys is None and cross_values is None
