"""Images through the toolkit: the patch embedding matches transformers' ViT, and round trips are exact."""

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.training.round_trip import assert_round_trip_is_bit_exact
from training.config import load_config
from training.convert.families import vit_saved_names
from training.convert.hf import import_hf
from training.model import build_model

TINY_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, num_labels=5)
VIT_ARCHITECTURES = ("ViTForImageClassification", "ViTModel")


def _save_vit(arch: str, directory) -> torch.nn.Module:
    """A real transformers ViT with random weights, and its image processor, saved as a HF folder."""
    torch.manual_seed(0)
    model = getattr(transformers, arch)(transformers.ViTConfig(**TINY_VIT)).eval()
    model.save_pretrained(directory, safe_serialization=True)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return model


def _pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _reference_output(reference: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = reference(pixel_values=pixels)
    return out.logits if hasattr(out, "logits") else out.pooler_output


@pytest.mark.parametrize("arch", VIT_ARCHITECTURES)
def test_vit_import_matches_transformers(tmp_path, arch):
    reference = _save_vit(arch, tmp_path)
    checkpoint, unused = import_hf(tmp_path)
    assert unused == []
    assert checkpoint.tokenizer is None and checkpoint.preprocessor["image_mean"] == [0.5, 0.5, 0.5]
    pixels = _pixels()
    with torch.no_grad():
        ours = checkpoint.model(pixel_values=pixels)
    expected = _reference_output(reference, pixels)
    assert ours.shape == expected.shape
    assert float((ours - expected).abs().max()) < 1e-5


@pytest.mark.parametrize("arch", VIT_ARCHITECTURES)
def test_vit_round_trip_is_bit_exact(tmp_path, arch):
    reference = _save_vit(arch, tmp_path / "hf")
    back = assert_round_trip_is_bit_exact(tmp_path / "hf", tmp_path)
    reloaded = getattr(transformers, arch).from_pretrained(back).eval()
    pixels = _pixels(1)
    assert torch.equal(_reference_output(reloaded, pixels), _reference_output(reference, pixels))


def test_vit_state_dicts_in_transformers_5_module_names_import(tmp_path):
    """save_pretrained writes encoder.layer.N.attention.attention.query; a raw state_dict() of transformers 5's
    modules says layers.N.attention.q_proj. Both import to the same model."""
    reference = _save_vit("ViTForImageClassification", tmp_path)
    raw = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    assert "vit.layers.0.attention.q_proj.weight" in raw
    assert vit_saved_names(raw).keys() == load_file(tmp_path / "model.safetensors").keys()
    save_file(raw, tmp_path / "model.safetensors", metadata={"format": "pt"})
    checkpoint, unused = import_hf(tmp_path)
    assert unused == []
    pixels = _pixels(2)
    with torch.no_grad():
        assert float((checkpoint.model(pixel_values=pixels) - _reference_output(reference, pixels)).abs().max()) < 1e-5


def test_named_vit_base_has_the_size_of_google_vit_base():
    """vit-base is ViT-B/16 at 224 px: the same parameter count as transformers' ViTModel-base's encoder."""
    config = load_config("vit-base")
    ours = build_model(config)
    reference = transformers.ViTForImageClassification(transformers.ViTConfig(num_labels=1000))
    assert ours.num_parameters() == sum(p.numel() for p in reference.parameters())
    assert config.modality == "image" and config.embedding.num_patches == 196


def test_a_text_target_on_an_image_model_fails_at_load():
    config = load_config("vit-digits").model_dump()
    config["target"] = {"name": "mlm"}
    with pytest.raises(ValueError, match="predicts tokens"):
        type(load_config("vit-digits")).model_validate(config)


def test_the_parity_command_compares_an_imported_vit(tmp_path):
    """``sampserve import-hf`` then ``sampserve parity``: random images through both, one number out."""
    import subprocess
    import sys

    _save_vit("ViTForImageClassification", tmp_path / "hf")
    for args in (("import-hf", str(tmp_path / "hf"), str(tmp_path / "ours")),
                 ("parity", "--checkpoint", str(tmp_path / "ours"), "--reference", str(tmp_path / "hf"))):
        done = subprocess.run([sys.executable, "-m", "sampserve.cli", *args], capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    diff = float(done.stdout.strip().splitlines()[-1].split("=")[1])
    assert diff < 1e-5 and "random image" in done.stdout  # rich wraps the line
