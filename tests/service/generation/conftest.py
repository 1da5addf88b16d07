"""A real tiny decoder for the engine tests: a random Llama-style model from the toolkit (RoPE,
grouped-query attention, RMSNorm, gated SiLU), exported once per session with the quantizer's
decoder export, beside a byte-level BPE tokenizer trained here and its head.json."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from service.generation.engine import GenerationEngine
from service.generation.graph import DecoderGraph
from service.generation.scheduler import EngineLimits
from service.repository import HEAD_FILE, ONNX_FILE, TOKENIZER_FILE, GenerationMeta, HeadMeta
from service.runtimes.onnxruntime import OnnxRuntime

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_ID = 0
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "Paris is the capital of France.",
    "Le renard brun saute par-dessus le chien paresseux.", "Übergrößenträger zahlen mehr.",
    "数字 1234 と 漢字 のテスト", "東京は日本の首都です。", "emoji 🙂👍🏽 and 🚀 rockets",
    "Привет, мир!", "def add(a, b):\n    return a + b", "Serving models fast and honestly.",
]
MAX_LENGTH = 128


def train_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """Byte-level BPE (as GPT-2, Llama 3, SmolLM2): multi-byte characters span several tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_tokenizer()


def _export(out: Path, tokenizer: Tokenizer) -> None:
    import torch

    from quantizer.export import export_decoder
    from training.checkpoint import Checkpoint, HeadInfo
    from training.config import ModelConfig
    from training.model import build_model

    torch.manual_seed(0)
    config = ModelConfig.model_validate(dict(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, dropout=0.0, attention_dropout=0.0, layer_norm_eps=1e-5, pad_token_id=EOS_ID,
        eos_token_id=EOS_ID, embedding=dict(parts=["word"], layernorm=False, max_position=MAX_LENGTH),
        encoder=dict(num_layers=2, layernorm_positioning="pre", layernorm="rms", feed_forward="gated",
                     activation="silu", bias=False, causal=True, position="rope", rope_theta=1e4),
        target=dict(name="lm", tie_weights=False)))
    model = build_model(config).eval()
    with torch.no_grad():  # BERT's std 0.02 makes every step's argmax the same token; larger weights vary
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.mul_(25 if "word" in name else 6)
    checkpoint = Checkpoint(model=model, head=HeadInfo(task="generation", max_length=MAX_LENGTH),
                            tokenizer=tokenizer, path=out)
    export_decoder(checkpoint, out / ONNX_FILE)


@pytest.fixture(scope="session")
def version_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """A version's files (model.onnx, tokenizer.json, head.json), exported once per session."""
    out = tmp_path_factory.mktemp("tiny-llama")
    _export(out, tokenizer)
    tokenizer.save(str(out / TOKENIZER_FILE))
    head = HeadMeta(input_names=["input_ids", "attention_mask", "position_ids"], max_length=MAX_LENGTH,
                    pad_token_id=EOS_ID, generation=GenerationMeta(
                        num_layers=2, num_kv_heads=2, head_dim=16, stop_token_ids=[EOS_ID],
                        chat_template=CHAT_TEMPLATE, eos_token=SPECIAL[0]))
    (out / HEAD_FILE).write_bytes(head.to_json())
    return out


@pytest.fixture(scope="session")
def graph(version_dir: Path) -> DecoderGraph:
    meta = HeadMeta.model_validate_json((version_dir / HEAD_FILE).read_text())
    assert meta.generation is not None
    return DecoderGraph(OnnxRuntime(version_dir / ONNX_FILE, threads=1).session, meta.generation)


@dataclass
class Engines:
    """Makes engines over the session's graph, and closes them after the test."""

    graph: DecoderGraph
    tokenizer: Tokenizer
    made: list[GenerationEngine]

    def __call__(self, observer: object = None, stop_ids: tuple[int, ...] = (EOS_ID,),
                 **limits: object) -> GenerationEngine:
        settings = {"max_model_len": MAX_LENGTH, "max_kv_tokens": 16 * MAX_LENGTH, **limits}
        engine = GenerationEngine(self.graph, self.tokenizer, EngineLimits(**settings),  # type: ignore[arg-type]
                                  stop_ids, EOS_ID, observer)  # type: ignore[arg-type]
        engine.start()
        self.made.append(engine)
        return engine


@pytest.fixture
async def engines(graph: DecoderGraph, tokenizer: Tokenizer) -> AsyncIterator[Engines]:
    made = Engines(graph, tokenizer, [])
    yield made
    for engine in made.made:
        await engine.close(drain=False)
