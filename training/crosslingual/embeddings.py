"""Sentence embeddings of many texts from a contrastive checkpoint, batched by length, optionally cached.

The distillation stages of issue #15 regress a student onto fixed teacher vectors, so ``cached_encode``
stores each (checkpoint, texts, prefix, max_length) result once as safetensors (no pickle) and reads it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from training.checkpoint import WEIGHTS_FILE, Checkpoint, load_checkpoint
from training.components.pooling import POOLING
from training.model import Model

CACHE_KEY_VERSION = 1  # bump when the encoding itself changes, so old cache files stop matching

Output = Literal["served", "pooled", "embedding"]
"""Which vector of a sentence: the served one (pooled, normalized when the head normalizes), the pooled final
states before any normalization, or the pooled embedding-layer output (no encoder layer)."""


def sentence_vectors(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None, output: Output = "served") -> torch.Tensor:
    """(B, T) token ids -> (B, H) sentence vectors of the kind ``output`` names, with the model's pooling.

    The distillation losses compare un-normalized pooled vectors ("pooled", "embedding"), as the multi-stage
    distillation code does; retrieval uses the served ones."""
    return several_vectors(model, input_ids, attention_mask, token_type_ids, (output,))[output]


def several_vectors(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None, outputs: tuple[Output, ...]) -> dict[str, torch.Tensor]:
    """Each of ``outputs`` for the same batch, from one encoder pass (a classifier's logits are its "served"
    output, so its evaluation gets logits and pooled states together)."""
    pool = POOLING[model.config.target.pooling]
    hidden = None
    vectors: dict[str, torch.Tensor] = {}
    for output in outputs:
        if output == "embedding":
            vectors[output] = pool(model.embedding(input_ids, token_type_ids), attention_mask)
            continue
        if hidden is None:
            hidden = model.encode(input_ids, attention_mask, token_type_ids).hidden
        if output == "served" and model.decoder is not None:
            vectors[output] = model(input_ids, attention_mask, token_type_ids)
        else:
            served = output == "served"
            vectors[output] = model.target(hidden, attention_mask) if served else pool(hidden, attention_mask)
    return vectors


def _checkpoint(checkpoint: Checkpoint | Path | str) -> Checkpoint:
    return checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(Path(checkpoint))


def encode(checkpoint: Checkpoint | Path | str, texts: list[str], batch_size: int = 64, max_length: int = 64,
           prefix: str = "", progress: bool = False, output: Output = "served") -> np.ndarray:
    """``prefix + text`` for each text -> the model's ``output`` vectors (default: the served output, pooled
    and normalized for a contrastive head) as float32 (N, d), in the order of ``texts``.

    Texts are tokenized once (truncated to ``max_length``, capped by the head's max_length), sorted by
    token count and run in batches padded to their longest, under ``torch.inference_mode``."""
    return encode_several(checkpoint, texts, (output,), batch_size, max_length, prefix, progress)[output]


def encode_several(checkpoint: Checkpoint | Path | str, texts: list[str], outputs: tuple[Output, ...],
                   batch_size: int = 64, max_length: int = 64, prefix: str = "",
                   progress: bool = False) -> dict[str, np.ndarray]:
    """:func:`encode` for several outputs at once, from one pass over the texts."""
    ck = _checkpoint(checkpoint)
    limit = min(max_length, ck.head.max_length)
    tokenizer = Tokenizer.from_str(ck.tokenizer.to_str())
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=limit)
    encodings = tokenizer.encode_batch([prefix + t for t in texts])
    order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
    pad = ck.config.pad_token_id
    device = next(ck.model.parameters()).device
    out: dict[str, np.ndarray] = {}
    batches = range(0, len(order), batch_size)
    if progress:
        from rich.progress import track

        batches = track(batches, description=f"encoding {len(texts)} texts", transient=True)
    was_training = ck.model.training
    ck.model.eval()
    with torch.inference_mode():
        for start in batches:
            rows = order[start:start + batch_size]
            width = max(len(encodings[i].ids) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            types = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                e = encodings[i]
                ids[r, :len(e.ids)] = torch.tensor(e.ids)
                mask[r, :len(e.ids)] = 1
                types[r, :len(e.ids)] = torch.tensor(e.type_ids)
            found = several_vectors(ck.model, ids.to(device), mask.to(device), types.to(device), outputs)
            for name, tensor in found.items():
                vectors = tensor.float().cpu().numpy()
                if name not in out:
                    out[name] = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
                out[name][rows] = vectors
    ck.model.train(was_training)
    for name in outputs:  # no texts: the width comes from the config
        out.setdefault(name, np.empty((0, ck.config.hidden_size), dtype=np.float32))
    return out


def weights_fingerprint(checkpoint: Checkpoint) -> str:
    """Identifies the weights: the weights file's resolved path, mtime and size when the checkpoint folder
    has one (``save_checkpoint`` replaces the file, so a retrained model gets a new mtime), else a hash of
    the in-memory state dict."""
    weights = Path(checkpoint.path) / WEIGHTS_FILE
    if weights.is_file():
        stat = weights.stat()
        return f"{weights.resolve()}:{stat.st_mtime_ns}:{stat.st_size}"
    digest = hashlib.sha256()
    for name, tensor in sorted(checkpoint.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return f"state:{digest.hexdigest()}"


def cache_key(checkpoint: Checkpoint, texts: list[str], prefix: str, max_length: int,
              output: Output = "served") -> str:
    """SHA-256 over the weights' fingerprint, the texts, the prefix, max_length and the output kind."""
    digest = hashlib.sha256()
    head = {"v": CACHE_KEY_VERSION, "weights": weights_fingerprint(checkpoint), "prefix": prefix,
            "max_length": max_length, "count": len(texts)}
    if output != "served":  # served keys stay as they were, so existing cache files keep matching
        head["output"] = output
    digest.update(json.dumps(head, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


def cached_encode(checkpoint: Checkpoint | Path | str, texts: list[str], cache_dir: Path | str,
                  batch_size: int = 64, max_length: int = 64, prefix: str = "", progress: bool = False,
                  output: Output = "served") -> np.ndarray:
    """``encode``, read from ``cache_dir/<key>.safetensors`` when there, else computed and written there
    (atomically: a temp file renamed into place)."""
    ck = _checkpoint(checkpoint)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{cache_key(ck, texts, prefix, max_length, output)}.safetensors"
    if path.is_file():
        return load_file(str(path))["embeddings"]
    vectors = encode(ck, texts, batch_size=batch_size, max_length=max_length, prefix=prefix, progress=progress,
                     output=output)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".safetensors", dir=cache_dir)
    os.close(fd)
    try:
        save_file({"embeddings": np.ascontiguousarray(vectors)}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return vectors
