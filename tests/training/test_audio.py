"""Audio through the toolkit: the waveform embedding matches transformers' wav2vec2, round trips are exact."""

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.training.round_trip import assert_round_trip_is_bit_exact
from training.config import load_config
from training.convert.hf import import_hf
from training.model import build_model

TINY_WAV2VEC2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                     num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_labels=5,
                     classifier_proj_size=24)
ARCHITECTURES = ("Wav2Vec2ForSequenceClassification", "Wav2Vec2Model")


def _save(arch: str, directory, **overrides) -> torch.nn.Module:
    """A real transformers wav2vec2 with random weights, and its feature extractor, saved as a HF folder."""
    torch.manual_seed(0)
    model = getattr(transformers, arch)(transformers.Wav2Vec2Config(**{**TINY_WAV2VEC2, **overrides})).eval()
    with torch.no_grad():  # random, not HF's zero init: the parity test must see every tensor used
        for name, param in model.named_parameters():
            if "masked_spec_embed" not in name:
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    transformers.Wav2Vec2FeatureExtractor().save_pretrained(directory)
    return model


def _audio(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 4000, generator=torch.Generator().manual_seed(seed))


def _reference(model: torch.nn.Module, ours, audio: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_values=audio)
        if hasattr(out, "logits"):
            return out.logits
        mask = torch.ones(out.last_hidden_state.shape[:2], dtype=torch.long)
        return ours.target(out.last_hidden_state, mask)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_wav2vec2_import_matches_transformers(tmp_path, arch):
    reference = _save(arch, tmp_path)
    checkpoint, unused = import_hf(tmp_path)
    assert unused == []
    assert checkpoint.tokenizer is None and checkpoint.preprocessor["sampling_rate"] == 16000
    audio = _audio()
    with torch.no_grad():
        ours = checkpoint.model(input_values=audio)
    expected = _reference(reference, checkpoint.model, audio)
    assert ours.shape == expected.shape
    assert float((ours - expected).abs().max()) < 1e-5


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_wav2vec2_round_trip_is_bit_exact(tmp_path, arch):
    reference = _save(arch, tmp_path / "hf")
    back = assert_round_trip_is_bit_exact(tmp_path / "hf", tmp_path)
    reloaded = getattr(transformers, arch).from_pretrained(back).eval()
    ours = import_hf(back)[0].model
    audio = _audio(1)
    assert torch.equal(_reference(reloaded, ours, audio), _reference(reference, ours, audio))


def test_old_weight_norm_names_and_a_missing_mask_vector_import(tmp_path):
    """Checkpoints from before torch's parametrized weight norm say weight_g / weight_v; one trained without
    SpecAugment has no masked_spec_embed."""
    reference = _save("Wav2Vec2ForSequenceClassification", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    old = {name.replace("parametrizations.weight.original0", "weight_g")
           .replace("parametrizations.weight.original1", "weight_v"): tensor
           for name, tensor in state.items() if name != "wav2vec2.masked_spec_embed"}
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in old
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    checkpoint, unused = import_hf(tmp_path)
    assert unused == []
    audio = _audio(2)
    with torch.no_grad():
        ours = checkpoint.model(input_values=audio)
    assert float((ours - _reference(reference, checkpoint.model, audio)).abs().max()) < 1e-5


def test_unsupported_wav2vec2_layouts_are_refused(tmp_path):
    _save("Wav2Vec2Model", tmp_path, feat_extract_norm="layer", do_stable_layer_norm=True)
    with pytest.raises(ValueError, match="feat_extract_norm='layer' is not supported"):
        import_hf(tmp_path)


def test_named_wav2vec2_base_has_the_size_of_facebook_wav2vec2_base():
    config = load_config("wav2vec2-base")
    ours = build_model(config)
    hf_config = transformers.Wav2Vec2Config(num_labels=config.target.num_labels)
    reference = transformers.Wav2Vec2ForSequenceClassification(hf_config)
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters())
    assert config.modality == "audio" and config.embedding.frames(16000) == 49


def test_parity_of_an_imported_wav2vec2_on_random_audio(tmp_path):
    from training.parity import tensor_batch, transformers_diff

    _save("Wav2Vec2Model", tmp_path)
    checkpoint, _ = import_hf(tmp_path)
    batch = tensor_batch(checkpoint, rows=2)
    assert batch["input_values"].shape == (2, checkpoint.config.embedding.max_samples)
    assert transformers_diff(checkpoint, tmp_path, batch) < 1e-5
