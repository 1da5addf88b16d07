"""Export a checkpoint with its head to ONNX: dynamic batch and sequence axes, stable names.

Inputs are ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model has a segment
embedding), all int64 (batch, sequence); an image model takes ``pixel_values``, float32 (batch,
channels, height, width), an audio model ``input_values``, float32 (batch, samples): only the batch
axis is dynamic. The output is ``logits`` for classification/LM heads and
``embeddings`` for matching heads. The attention mask is filled with a finite -1e4 inside the model
(finfo.min made onnxruntime's Softmax ~8x slower on a 2-core Xeon: docs/design.md, "Quantization").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from training.checkpoint import Checkpoint
from training.model import MODEL_INPUTS

TENSOR_INPUTS = {"pixel_values", "input_values"}
"""Inputs of fixed size but for the batch (the server pads audio to the clip length)."""

OPSET = 17
EMBEDDING_TARGETS = {"contrastive", "pair_cls"}


@dataclass(frozen=True)
class ExportInfo:
    path: Path
    input_names: tuple[str, ...]
    output_name: str
    max_abs_diff: float  # ORT FP32 vs PyTorch on a check batch


def input_names_for(checkpoint: Checkpoint) -> tuple[str, ...]:
    if checkpoint.config.modality != "text":
        return (MODEL_INPUTS[checkpoint.config.modality],)
    names = ("input_ids", "attention_mask")
    return (*names, "token_type_ids") if "seg" in checkpoint.config.embedding.parts else names


def output_name_for(checkpoint: Checkpoint) -> str:
    return "embeddings" if checkpoint.config.target.name in EMBEDDING_TARGETS else "logits"


def sample_inputs(checkpoint: Checkpoint, batch: int = 3, length: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids with ragged padding: exercises the mask in export checks. An image model gets
    random pixel values in the processor's [-1, 1] range."""
    rng = np.random.default_rng(seed)
    if checkpoint.config.modality == "image":
        emb = checkpoint.config.embedding
        shape = (batch, emb.num_channels, emb.image_size, emb.image_size)
        return {"pixel_values": rng.uniform(-1, 1, size=shape).astype(np.float32)}
    if checkpoint.config.modality == "audio":  # normalized clips: zero mean, unit variance
        samples = checkpoint.config.embedding.max_samples
        return {"input_values": rng.standard_normal(size=(batch, samples)).astype(np.float32)}
    vocab = checkpoint.config.vocab_size
    ids = rng.integers(5, min(vocab, 30000), size=(batch, length), dtype=np.int64)
    mask = np.ones((batch, length), dtype=np.int64)
    for row in range(1, batch):
        mask[row, length - 3 * row :] = 0
    ids[mask == 0] = checkpoint.config.pad_token_id
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "seg" in checkpoint.config.embedding.parts:
        inputs["token_type_ids"] = np.zeros_like(ids)
    return inputs


def export_onnx(checkpoint: Checkpoint, path: Path) -> ExportInfo:
    """Trace the served forward pass to ONNX and check onnxruntime FP32 against PyTorch (1e-4).
    Causal LMs with rotary positions export as a prefill/decode graph with a KV cache."""
    config = checkpoint.config
    if config.target.name == "lm" and config.encoder.causal and config.encoder.position == "rope":
        return export_decoder(checkpoint, path)
    if checkpoint.config.is_encoder_decoder:
        raise ValueError("ONNX export of encoder-decoder generation is not supported yet; export encoders")
    model = checkpoint.model.eval()
    names = input_names_for(checkpoint)
    output = output_name_for(checkpoint)
    example = sample_inputs(checkpoint)
    kwargs = {name: torch.from_numpy(example[name]) for name in names}
    axes = {name: {0: "batch"} if name in TENSOR_INPUTS else {0: "batch", 1: "sequence"} for name in names}
    axes[output] = {0: "batch", 1: "sequence"} if checkpoint.config.target.name in ("mlm", "lm") else {0: "batch"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is the legacy path
        with torch.no_grad():
            torch.onnx.export(model, (), str(path), kwargs=kwargs, input_names=list(names), output_names=[output],
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(str(path))
    diff = parity(checkpoint, path, example)
    if diff > 1e-4:
        raise ValueError(f"exported graph differs from PyTorch by {diff:.3g} (> 1e-4)")
    return ExportInfo(path=path, input_names=names, output_name=output, max_abs_diff=diff)


def parity(checkpoint: Checkpoint, path: Path, inputs: dict[str, np.ndarray]) -> float:
    from quantizer.engines import ort_session

    session = ort_session(path)
    feed = {i.name: inputs[i.name] for i in session.get_inputs()}
    (ort_out,) = session.run(None, feed)
    with torch.no_grad():
        ours = checkpoint.model(**{n: torch.from_numpy(feed[n]) for n in input_names_for(checkpoint)}).numpy()
    return float(np.abs(ort_out - ours).max())


def export_decoder(checkpoint: Checkpoint, path: Path, check_steps: int = 4) -> ExportInfo:
    """The prefill/decode graph of a causal LM with a KV cache (quantizer.decoder_export)."""
    from quantizer.decoder_export import export_decoder as export

    return export(checkpoint, path, check_steps)
