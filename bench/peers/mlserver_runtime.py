"""Minimal MLServer 1.7.1 runtime: the serving benchmark's *peer*, not project code.

It serves the project's exported sentence-embedding ONNX file (inputs int64
``input_ids``/``attention_mask``/``token_type_ids``, output float ``embeddings``
(batch, 384), already pooled and normalised) with the ``tokenizer.json`` that
sits beside it, the way a user would write a custom runtime from MLServer's
docs: one BYTES input ``text`` (one string per row) in, one FP32 output
``embeddings`` out, decoded/encoded with MLServer's own codecs.

It runs under the separate peer venv (/tmp/mlserver-env), never the project's.
Model settings read: ``parameters.uri`` (folder with ``model.onnx`` and
``tokenizer.json``, or the ``.onnx`` file itself) and
``parameters.extra.intra_op_num_threads`` (default 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse
from tokenizers import Tokenizer

MAX_TOKENS = 256


class OnnxEmbeddingRuntime(MLModel):
    """Text in (BYTES ``text``), L2-normalised FP32 ``embeddings`` out."""

    async def load(self) -> bool:
        params = self.settings.parameters
        uri = Path(params.uri if params and params.uri else ".")
        model_path = uri if uri.suffix == ".onnx" else uri / "model.onnx"
        extra = (params.extra if params else None) or {}

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(extra.get("intra_op_num_threads", 2))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        self._session = ort.InferenceSession(
            str(model_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._input_names = {i.name for i in self._session.get_inputs()}

        self._tokenizer = Tokenizer.from_file(str(model_path.parent / "tokenizer.json"))
        self._tokenizer.enable_truncation(max_length=MAX_TOKENS)
        self._tokenizer.enable_padding()  # pad to the longest in the batch
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        text_input = next((i for i in payload.inputs if i.name == "text"), None)
        if text_input is None:
            raise ValueError("request needs a BYTES input named 'text'")
        texts = StringCodec.decode_input(text_input)

        encodings = self._tokenizer.encode_batch(texts)
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        feeds = {k: v for k, v in feeds.items() if k in self._input_names}
        (embeddings,) = self._session.run(["embeddings"], feeds)

        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[NumpyCodec.encode_output("embeddings", embeddings.astype(np.float32))],
        )
