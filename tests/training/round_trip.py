"""Shared by the conversion tests of tensor models: HF -> ours -> HF must give back the same files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from training.checkpoint import PREPROCESSOR_FILE, load_checkpoint, save_checkpoint
from training.convert.hf import export_hf, import_hf


def assert_round_trip_is_bit_exact(hf_dir: Path, work: Path) -> Path:
    """Import ``hf_dir``, save our checkpoint, export it again: every tensor and the preprocessor config
    must come back identical. Returns the exported folder."""
    checkpoint, _ = import_hf(hf_dir)
    save_checkpoint(work / "ours", checkpoint.model, checkpoint.head, None, checkpoint.preprocessor)
    export_hf(load_checkpoint(work / "ours"), work / "back")
    original = load_file(hf_dir / "model.safetensors")
    back = load_file(work / "back" / "model.safetensors")
    assert set(original) == set(back)
    for name, tensor in original.items():
        assert torch.equal(tensor, back[name]), name
    assert json.loads((work / "back" / PREPROCESSOR_FILE).read_text()) == json.loads(
        (hf_dir / PREPROCESSOR_FILE).read_text())
    return work / "back"
