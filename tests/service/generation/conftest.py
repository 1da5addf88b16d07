"""The engine tests run the suite's one tiny generator (tests/tiny_llama.py) as the server does: the
version ``tiny-llm/1`` the quantizer published into the generation repository (its model.onnx,
tokenizer.json and head.json), with engines made here under the limits each test asks for."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from service.generation.engine import GenerationEngine
from service.generation.graph import DecoderGraph
from service.generation.scheduler import EngineLimits
from service.repository import HEAD_FILE, ONNX_FILE, TOKENIZER_FILE, HeadMeta
from service.runtimes.onnxruntime import OnnxRuntime
from tests.service.generation_repo import CONTEXT, GENERATION_MODEL
from tests.tiny_llama import PAD_ID

MAX_LENGTH = 128
"""The engines' max_model_len unless a test says otherwise (the published version holds CONTEXT)."""


@pytest.fixture(scope="session")
def version_dir(generation_repo: Path) -> Path:
    """The published version's files (model.onnx, tokenizer.json, head.json)."""
    return generation_repo / GENERATION_MODEL / "1"


@pytest.fixture(scope="session")
def tokenizer(version_dir: Path) -> Tokenizer:
    """The tokenizer as published (the one the server loads)."""
    return Tokenizer.from_file(str(version_dir / TOKENIZER_FILE))


@pytest.fixture(scope="session")
def head_meta(version_dir: Path) -> HeadMeta:
    meta = HeadMeta.model_validate_json((version_dir / HEAD_FILE).read_text())
    assert meta.generation is not None and meta.max_length == CONTEXT and meta.pad_token_id == PAD_ID
    return meta


@pytest.fixture(scope="session")
def graph(version_dir: Path, head_meta: HeadMeta) -> DecoderGraph:
    assert head_meta.generation is not None
    return DecoderGraph(OnnxRuntime(version_dir / ONNX_FILE, threads=1).session, head_meta.generation)


@pytest.fixture(scope="session")
def fixed_batch_graph(version_dir: Path, head_meta: HeadMeta, tmp_path_factory: pytest.TempPathFactory
                      ) -> DecoderGraph:
    """The published graph as an export that left the batch axis fixed at 1 (no dynamic axis for it):
    it loads and warms up (one sequence), and onnxruntime refuses the first step of two sequences."""
    import onnx

    model = onnx.load(str(version_dir / ONNX_FILE))
    for tensor in model.graph.input:
        batch = tensor.type.tensor_type.shape.dim[0]
        batch.ClearField("dim_param")
        batch.dim_value = 1
    path = tmp_path_factory.mktemp("fixed-batch") / ONNX_FILE
    onnx.save(model, str(path))
    assert head_meta.generation is not None
    return DecoderGraph(OnnxRuntime(path, threads=1).session, head_meta.generation)


@dataclass
class Engines:
    """Makes engines over the session's graph, and closes them after the test."""

    graph: DecoderGraph
    tokenizer: Tokenizer
    made: list[GenerationEngine]

    def __call__(self, observer: object = None, stop_ids: tuple[int, ...] = (PAD_ID,),
                 graph: DecoderGraph | None = None, **limits: object) -> GenerationEngine:
        settings = {"max_model_len": MAX_LENGTH, "max_kv_tokens": 16 * MAX_LENGTH, **limits}
        engine = GenerationEngine(graph or self.graph, self.tokenizer,
                                  EngineLimits(**settings),  # type: ignore[arg-type]
                                  stop_ids, PAD_ID, observer)  # type: ignore[arg-type]
        engine.start()
        self.made.append(engine)
        return engine


@pytest.fixture
async def engines(graph: DecoderGraph, tokenizer: Tokenizer) -> AsyncIterator[Engines]:
    made = Engines(graph, tokenizer, [])
    yield made
    for engine in made.made:
        await engine.close(drain=False)
