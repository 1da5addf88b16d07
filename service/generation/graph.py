"""The decoder graph behind one onnxruntime session: prefill and decode are the same call.

Checks the graph against the contract (service.generation's docstring) when loaded, so a version
whose graph does not match its head.json fails to load instead of failing its first request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.generation.cache import KVCache, left_pad
from service.repository import GenerationMeta

TOKEN_INPUTS = ("input_ids", "attention_mask", "position_ids")


def cache_names(layers: int, prefix: str) -> list[str]:
    """``past_key_values.{i}.key|value`` or ``present.{i}.key|value``, in graph order."""
    return [f"{prefix}.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


class DecoderGraph:
    def __init__(self, session: Any, meta: GenerationMeta) -> None:
        """``session``: an onnxruntime InferenceSession (or anything with its ``run`` and
        ``get_inputs``/``get_outputs``)."""
        self.session = session
        self.layers, self.kv_heads, self.head_dim = meta.num_layers, meta.num_kv_heads, meta.head_dim
        self.past_names = cache_names(self.layers, "past_key_values")
        self.output_names = ["logits", *cache_names(self.layers, "present")]
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        missing = [n for n in (*TOKEN_INPUTS, *self.past_names) if n not in inputs]
        missing += [n for n in self.output_names if n not in outputs]
        if missing:
            raise ValueError(f"the decoder graph does not match head.json's generation block "
                             f"({self.layers} layers): missing {', '.join(missing[:6])}")
        shape = list(inputs[self.past_names[0]].shape)
        if len(shape) != 4 or any(isinstance(got, int) and got != want
                                  for got, want in ((shape[1], self.kv_heads), (shape[3], self.head_dim))):
            raise ValueError(f"graph input {self.past_names[0]} has shape {shape}; head.json says "
                             f"(batch, {self.kv_heads}, past, {self.head_dim})")
        batch = inputs["input_ids"].shape[0]
        self.fixed_batch: int | None = batch if isinstance(batch, int) else None
        """The graph's batch size when the export fixed it (None: any batch, as the exporter writes)."""
        vocab = outputs["logits"].shape[-1]
        self.vocab_size: int | None = vocab if isinstance(vocab, int) else None
        """The graph's vocabulary (None when its logits' last axis is symbolic)."""

    @classmethod
    def load(cls, path: Path, meta: GenerationMeta, threads: int | None = None, spinning: bool = True) -> DecoderGraph:
        """A session with the server's onnxruntime options (service.runtimes.onnxruntime)."""
        from service.runtimes.onnxruntime import OnnxRuntime

        return cls(OnnxRuntime(path, threads, spinning).session, meta)

    def empty_cache(self) -> KVCache:
        return KVCache.empty(self.layers, self.kv_heads, self.head_dim)

    def run(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
            past: KVCache | None) -> tuple[np.ndarray, KVCache]:
        """One call: ``ids``/``positions`` (B, T), ``mask`` (B, P+T) over past and new tokens;
        returns the last position's (B, V) logits and the cache with the new tokens appended."""
        arrays = past.arrays if past is not None else [
            np.zeros((ids.shape[0], self.kv_heads, 0, self.head_dim), dtype=np.float32)] * (2 * self.layers)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feed.update(zip(self.past_names, arrays, strict=True))
        logits, *present = self.session.run(self.output_names, feed)
        return logits, KVCache(present, mask)

    def prefill(self, rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, KVCache]:
        """Left-padded prompts through the graph with an empty cache."""
        ids, mask = left_pad(rows, pad_id)
        positions = (np.cumsum(mask, axis=1) - 1).clip(min=0).astype(np.int64)
        return self.run(ids, mask, positions, None)

    def decode(self, last_ids: list[int], cache: KVCache) -> tuple[np.ndarray, KVCache]:
        """One new token per row of ``cache``."""
        ids = np.asarray(last_ids, dtype=np.int64)[:, None]
        mask = np.concatenate([cache.mask, np.ones((cache.batch, 1), dtype=np.int64)], axis=1)
        return self.run(ids, mask, cache.positions(), cache)
