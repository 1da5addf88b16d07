import pytest
import torch

from training.components import EMBEDDINGS, ENCODERS, POOLING, REGISTRIES, TARGETS
from training.components.layers import sinusoidal_table
from training.config import COMPONENT_NAMES
from training.model import build_model

from .conftest import shrink


def _ids(batch=3, length=9, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_registries_hold_every_component_the_design_names():
    assert {"word", "pos", "sinusoidal_pos", "seg", "factorized_word"} <= set(EMBEDDINGS)
    assert {"transformer"} <= set(ENCODERS)
    assert {"mlm", "lm", "seq2seq_lm", "cls", "pair_cls", "contrastive"} <= set(TARGETS)
    assert {"cls", "mean", "max"} <= set(POOLING)
    assert set(REGISTRIES) >= {"embeddings", "encoders", "target_embeddings", "decoders", "targets"}


def test_config_validation_knows_exactly_the_registered_names():
    """Configs validate against a torch-free copy of the names; it must not drift from the registries."""
    assert {kind: set(registry) for kind, registry in REGISTRIES.items()} == {
        kind: set(names) for kind, names in COMPONENT_NAMES.items()}


def test_padding_does_not_change_real_tokens_outputs():
    torch.manual_seed(0)
    model = build_model(shrink("minilm-l6")).eval()
    ids, mask = _ids()
    with torch.no_grad():
        full = model(ids, mask)
        alone = model(ids[2:3, :3], mask[2:3, :3])
    torch.testing.assert_close(full[2:3], alone, atol=1e-6, rtol=0)


def test_group_recurrence_cycles_k_layers():
    """unique_layers=k: k layers of weights applied in order, cycle after cycle (MSD's parameter
    recurrence, e.g. 3 layers x 4 cycles)."""
    torch.manual_seed(0)
    model = build_model(shrink("tiny-bert", encoder__unique_layers=2, encoder__num_layers=6)).eval()
    assert len(model.encoder.layers) == 2 and model.config.encoder.weight_layers == 2
    ids, mask = _ids()
    with torch.no_grad():
        x = model.embedding(ids)
        bias = (1.0 - mask[:, None, None, :].float()) * -1e4
        for i in range(6):
            x, _ = model.encoder.layers[i % 2](x, bias)
        torch.testing.assert_close(model(ids, mask), model.target(x, mask))
    with pytest.raises(ValueError, match="not both"):
        shrink("tiny-bert", encoder__unique_layers=2, encoder__parameter_sharing=True)
    with pytest.raises(ValueError, match="more than num_layers"):
        shrink("tiny-bert", encoder__unique_layers=7, encoder__num_layers=6)


def test_parameter_sharing_applies_one_layer_n_times():
    torch.manual_seed(0)
    shared = build_model(shrink("tiny-bert", encoder__parameter_sharing=True, encoder__num_layers=3)).eval()
    assert len(shared.encoder.layers) == 1
    unshared = build_model(shrink("tiny-bert", encoder__num_layers=3))
    assert shared.num_parameters() < unshared.num_parameters()
    ids, mask = _ids()
    with torch.no_grad():
        x = shared.embedding(ids)
        bias = (1.0 - mask[:, None, None, :].float()) * -1e4
        for _ in range(3):
            x, _ = shared.encoder.layers[0](x, bias)
        expected = shared.target(x, mask)
        torch.testing.assert_close(shared(ids, mask), expected)


def test_factorized_embedding_is_a_bottleneck():
    wide = build_model(shrink("tiny-bert"))
    narrow = build_model(shrink("tiny-bert", embedding__parts=["factorized_word", "pos", "seg"],
                                embedding__embedding_size=8))
    assert narrow.embedding.word.weight.shape == (128, 8)
    assert narrow.num_parameters() < wide.num_parameters()
    ids, mask = _ids()
    assert narrow(ids, mask).shape == (3, 2)


def test_sinusoidal_positions_have_no_parameters():
    model = build_model(shrink("tiny-bert", embedding__parts=["word", "sinusoidal_pos"]))
    assert not any("sinusoidal" in n for n, _ in model.named_parameters())
    table = sinusoidal_table(16, 32)
    assert torch.allclose(table[0, 0::2], torch.zeros(16)) and torch.allclose(table[0, 1::2], torch.ones(16))


@pytest.mark.parametrize("pooling", ["cls", "mean", "max", "last"])
def test_pooling_ignores_padding(pooling):
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = POOLING[pooling](hidden, mask)
    changed = hidden.clone()
    changed[0, 3:] = 1e3  # garbage in padded positions
    torch.testing.assert_close(POOLING[pooling](changed, mask)[0], pooled[0])
    if pooling == "mean":
        torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))


def test_causal_encoder_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = build_model(shrink("gpt2")).eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        full = model(ids)
        prefix = model.encode(ids[:, :6], use_cache=True)
        logits = [model.target(prefix.hidden, None)]
        cache = prefix.cache
        for t in range(6, 10):
            step = model.encode(ids[:, t : t + 1], past=cache, use_cache=True)
            cache = step.cache
            logits.append(model.target(step.hidden, None))
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=0)


def test_decoder_kv_cache_matches_full_forward():
    torch.manual_seed(0)
    model = build_model(shrink("t5-small")).eval()
    src, src_mask = _ids(batch=3, length=7)
    tgt = torch.randint(2, 128, (3, 6))
    with torch.no_grad():
        full = model(src, src_mask, decoder_input_ids=tgt)
        memory = model.encode(src, src_mask).hidden
        cache, steps = None, []
        for t in range(6):
            out = model.decode(tgt[:, t : t + 1], memory if cache is None else None, src_mask,
                               past=cache, use_cache=True)
            cache = out.cache
            steps.append(model.target(out.hidden, None))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_causal_mask_hides_the_future():
    torch.manual_seed(0)
    model = build_model(shrink("gpt2")).eval()
    ids = torch.randint(0, 128, (1, 8))
    changed = ids.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 128
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :5], model(changed)[:, :5])


@pytest.mark.parametrize("target", ["mlm", "cls", "pair_cls", "contrastive"])
def test_every_encoder_target_trains(target):
    torch.manual_seed(0)
    extra = {"target": {"name": target, "num_labels": 3, "lm_transform": target == "mlm"}}
    model = build_model(shrink("tiny-bert", **extra))
    ids, mask = _ids(batch=4)
    side = {"input_ids": ids, "attention_mask": mask}
    batches = {
        "mlm": {**side, "labels": torch.where(mask.bool(), ids, torch.full_like(ids, -100))},
        "cls": {**side, "labels": torch.tensor([0, 1, 2, 0])},
        "pair_cls": {"a": side, "b": {"input_ids": ids.flip(0), "attention_mask": mask.flip(0)},
                     "labels": torch.tensor([0, 1, 2, 0])},
        "contrastive": {"a": side, "b": {"input_ids": ids[:, :5], "attention_mask": mask[:, :5]}},
    }
    loss, metrics = model.loss(batches[target])
    loss.backward()
    assert torch.isfinite(loss) and "accuracy" in metrics
    assert model.embedding.word.weight.grad is not None
