"""Our checkpoint directory: what training writes, and what the quantizer and conversion read.

Layout::

    model_config.json   the ModelConfig (components and sizes)
    model.safetensors   the weights (tied tensors stored once)
    tokenizer.json      the model's own tokenizer (Hugging Face tokenizers format); text models
    preprocessor_config.json
                        how inputs become tensors for image models: transformers' image
                        processor settings (size, rescale factor, mean and std), which the
                        server applies to raw pixels too
    head.json           task metadata: labels, pooling, max length, where the weights came from

Weights are read only through safetensors: no pickle is ever loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from training.config import ModelConfig
from training.model import Model

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
HEAD_FILE = "head.json"
PREPROCESSOR_FILE = "preprocessor_config.json"


class HeadInfo(BaseModel):
    """What a server needs to know about the task head beyond the weights."""

    model_config = ConfigDict(extra="forbid")

    task: str
    labels: list[str] | None = None
    max_length: int = 512
    text_pair: bool = False
    source: str = ""
    source_dir: str | None = None
    text_prefix: str = ""
    """Prepended to every input text before tokenizing: e5 models expect "query: " (or "passage: ")."""
    # Generation (task "lm"): what a chat server needs beside the weights. max_length is then the
    # context length: prompt and new tokens together.
    chat_template: str | None = None
    """Jinja chat template (Hugging Face's format) rendering messages into a prompt."""
    stop_token_ids: list[int] | None = None
    """Token ids that end a sequence, the eos id first."""
    bos_token: str | None = None
    """Texts of the special tokens the chat template may reference."""
    eos_token: str | None = None


@dataclass
class Checkpoint:
    model: Model
    head: HeadInfo
    tokenizer: Tokenizer | None  # None for models that take tensors
    path: Path
    preprocessor: dict | None = None
    """transformers' image processor config (``preprocessor_config.json``) of an image model."""

    @property
    def text_tokenizer(self) -> Tokenizer:
        """The tokenizer of a text model; a clear error for a model that takes tensors."""
        if self.tokenizer is None:
            raise ValueError(f"this {self.config.modality} model has no tokenizer: it takes tensors")
        return self.tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def save_checkpoint(out_dir: Path, model: Model, head: HeadInfo, tokenizer: Tokenizer | None,
                    preprocessor: dict | None = None) -> Path:
    """Write a checkpoint; files land in a temp dir first and replace ``out_dir`` in one rename."""
    if model.config.modality == "text" and tokenizer is None:
        raise ValueError("a text model's checkpoint needs its tokenizer")
    if model.config.modality != "text" and preprocessor is None:
        raise ValueError(f"an {model.config.modality} model's checkpoint needs its preprocessor config")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        (tmp / CONFIG_FILE).write_text(model.config.to_json())
        save_model(model, str(tmp / WEIGHTS_FILE))
        if tokenizer is not None:
            raw_tokenizer(tokenizer).save(str(tmp / TOKENIZER_FILE))
        if preprocessor is not None:
            (tmp / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor, indent=2))
        (tmp / HEAD_FILE).write_text(head.model_dump_json(indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def raw_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A copy without padding or truncation: head.json's max_length is the one length setting, and
    batches pad to their longest (some shipped tokenizer.json files pad every input to 128)."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, HEAD_FILE) if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path} is not a sampserve checkpoint: missing {', '.join(missing)}")
    config = ModelConfig.model_validate(json.loads((path / CONFIG_FILE).read_text()))
    inputs_file = TOKENIZER_FILE if config.modality == "text" else PREPROCESSOR_FILE
    if not (path / inputs_file).exists():
        raise FileNotFoundError(f"{path} is not a sampserve checkpoint: missing {inputs_file}")
    model = Model(config)
    load_model(model, str(path / WEIGHTS_FILE), strict=True, device=str(device))
    model.eval()
    head = HeadInfo.model_validate(json.loads((path / HEAD_FILE).read_text()))
    if config.modality == "text":
        return Checkpoint(model=model, head=head, tokenizer=Tokenizer.from_file(str(path / TOKENIZER_FILE)),
                          path=path)
    return Checkpoint(model=model, head=head, tokenizer=None, path=path,
                      preprocessor=json.loads((path / PREPROCESSOR_FILE).read_text()))
