"""Export a causal LM as one ONNX graph that does both prefill and one decode step with a KV cache.

The signature is the contract ``service.generation`` reads (see its package docstring): inputs
``input_ids`` / ``attention_mask`` / ``position_ids`` and ``past_key_values.{i}.key|value``
(B, kv_heads, P, head_dim), outputs ``logits`` for the last position only and
``present.{i}.key|value``. Why these choices:

- One graph for both phases: P = 0 at prefill (empty past tensors), so one session serves both and
  SAMP quantizes one file.
- Logits for the last position only: the vocabulary projection is the largest matrix of a small
  LM (SmolLM2: 576 x 49,152, about 45% of an FP32 decode step), and a prefill of T tokens would
  otherwise pay T times for rows nobody samples from.
- The output projection is untied: its own initializer, so SAMP can quantize it while the
  embedding lookup (a Gather on the same table) stays FP32.
- Left padding with explicit position ids, so every row's last position is a real token and a
  padded row computes what it would alone.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from quantizer.export import OPSET, ExportInfo
from service.generation.cache import left_pad
from service.generation.graph import TOKEN_INPUTS, cache_names
from training.checkpoint import Checkpoint
from training.components.layers import LayerCache
from training.model import Model

DECODER_INPUTS = TOKEN_INPUTS  # the names the server's DecoderGraph reads (service.generation.graph)


def past_names(layers: int) -> list[str]:
    return cache_names(layers, "past_key_values")


def present_names(layers: int) -> list[str]:
    return cache_names(layers, "present")


class _DecoderStep(nn.Module):
    """(ids, mask, positions, *past) -> (last-position logits, *present), with an untied head."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model
        projection = model.target.decoder
        assert isinstance(projection, nn.Linear)
        weight = projection.weight
        self.lm_head = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias=False)
        self.lm_head.weight = nn.Parameter(weight.detach().clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache: list[LayerCache] = [(past[2 * i], past[2 * i + 1], None, None) for i in range(len(past) // 2)]
        out = self.model.encode(input_ids, attention_mask, past=cache, use_cache=True, position_ids=position_ids)
        logits = self.lm_head(out.hidden[:, -1, :])  # (B, V): the last position of left-padded rows
        assert out.cache is not None
        present = [t for layer in out.cache for t in layer[:2]]
        return (logits, *present)


def check_decoder(checkpoint: Checkpoint) -> None:
    config = checkpoint.config
    if config.is_encoder_decoder or not config.encoder.causal or config.target.name != "lm":
        raise ValueError("export_decoder takes a causal LM (target 'lm'); encoders go through export_onnx")
    if "pos" in config.embedding.parts:
        raise ValueError("export_decoder needs rotary positions (learned absolute positions shift under left padding)")


def export_decoder(checkpoint: Checkpoint, path: Path, check_steps: int = 4) -> ExportInfo:
    """Trace the prefill/decode graph, then check onnxruntime FP32 against PyTorch: logits within
    1e-4 and identical greedy tokens over a left-padded prefill and ``check_steps`` decode steps."""
    check_decoder(checkpoint)
    config = checkpoint.config
    layers = config.encoder.num_layers
    step = _DecoderStep(checkpoint.model.eval()).eval()
    kv, dim = config.key_value_heads, config.attention_head_dim
    batch, past, new = 2, 3, 2
    ids = torch.randint(3, config.vocab_size, (batch, new))
    mask = torch.ones(batch, past + new, dtype=torch.long)
    positions = torch.arange(past, past + new)[None].expand(batch, new).contiguous()
    cache = [torch.randn(batch, kv, past, dim) for _ in range(2 * layers)]
    names = [*DECODER_INPUTS, *past_names(layers)]
    outputs = ["logits", *present_names(layers)]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch"},
    }
    axes.update({n: {0: "batch", 2: "past"} for n in past_names(layers)})
    axes.update({n: {0: "batch", 2: "total"} for n in present_names(layers)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is the legacy path
        with torch.no_grad():
            torch.onnx.export(step, (ids, mask, positions, *cache), str(path), input_names=names,
                              output_names=outputs, dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                              do_constant_folding=True)
    onnx.checker.check_model(str(path))
    diff = decoder_parity(checkpoint, path, check_steps)
    if diff > 1e-4:
        raise ValueError(f"exported decoder differs from PyTorch by {diff:.3g} (> 1e-4)")
    return ExportInfo(path=path, input_names=DECODER_INPUTS, output_name="logits", max_abs_diff=diff)


class OrtDecoder:
    """A plain greedy/teacher-forced driver of the exported graph: the reference the parity checks
    and SAMP's next-token metrics use (the server's engine adds scheduling on top)."""

    def __init__(self, session, layers: int, kv_heads: int, head_dim: int, pad: int) -> None:
        self.session, self.layers, self.kv_heads, self.head_dim, self.pad = session, layers, kv_heads, head_dim, pad
        self.past_names, self.outputs = past_names(layers), ["logits", *present_names(layers)]

    @classmethod
    def for_checkpoint(cls, session, checkpoint: Checkpoint) -> OrtDecoder:
        c = checkpoint.config
        return cls(session, c.encoder.num_layers, c.key_value_heads, c.attention_head_dim, c.pad_token_id)

    def run(self, ids: np.ndarray, mask: np.ndarray,
            past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call: ``mask`` covers past and new tokens; returns last logits and the cache."""
        batch, new = ids.shape
        if past is None:
            past = [np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)] * (2 * self.layers)
        positions = (np.cumsum(mask, axis=1) - 1).clip(min=0)[:, -new:]
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions.astype(np.int64)}
        feed.update(zip(self.past_names, past, strict=True))
        logits, *present = self.session.run(self.outputs, feed)
        return logits, present

    def greedy(self, prompts: list[list[int]], steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(B, steps) greedy tokens and each step's (B, V) logits, for a left-padded batch."""
        ids, mask = left_pad(prompts, self.pad)
        logits, past = self.run(ids, mask, None)
        tokens, all_logits = [], [logits]
        for _ in range(steps):
            nxt = logits.argmax(-1)
            tokens.append(nxt)
            if len(tokens) == steps:
                break
            mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
            logits, past = self.run(nxt[:, None].astype(np.int64), mask, past)
            all_logits.append(logits)
        return np.stack(tokens, axis=1), all_logits


@torch.no_grad()
def torch_greedy(model: Model, prompts: list[list[int]], steps: int, pad: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The same loop in PyTorch through the toolkit's cache (the reference for the export check)."""
    ids, mask = (torch.from_numpy(a) for a in left_pad(prompts, pad))
    out = model.encode(ids, mask, use_cache=True)
    logits = model.target(out.hidden[:, -1], None)
    tokens, all_logits = [], [logits.numpy()]
    for _ in range(steps):
        nxt = logits.argmax(-1)
        tokens.append(nxt.numpy())
        if len(tokens) == steps:
            break
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
        out = model.encode(nxt[:, None], mask, past=out.cache, use_cache=True)
        logits = model.target(out.hidden[:, -1], None)
        all_logits.append(logits.numpy())
    return np.stack(tokens, axis=1), all_logits


def decoder_parity(checkpoint: Checkpoint, path: Path, steps: int = 4) -> float:
    """Max |logit difference| ORT vs PyTorch over a left-padded prefill and greedy decode steps;
    raises when the greedy tokens differ."""
    from quantizer.engines import ort_session

    rng = np.random.default_rng(0)
    vocab = checkpoint.config.vocab_size
    prompts = [rng.integers(3, vocab, size=n).tolist() for n in (7, 3, 5)]
    ort_tokens, ort_logits = OrtDecoder.for_checkpoint(ort_session(path), checkpoint).greedy(prompts, steps)
    ref_tokens, ref_logits = torch_greedy(checkpoint.model.eval(), prompts, steps, checkpoint.config.pad_token_id)
    if not np.array_equal(ort_tokens, ref_tokens):
        raise ValueError(f"exported decoder's greedy tokens differ from PyTorch's: {ort_tokens} vs {ref_tokens}")
    return max(float(np.abs(a - b).max()) for a, b in zip(ort_logits, ref_logits, strict=True))
