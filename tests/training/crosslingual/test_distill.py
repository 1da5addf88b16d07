"""The four distillation stages on tiny models and a tiny synthetic parallel corpus: each stage's loss falls,
each checkpoint loads as the student, a finished run resumes without retraining, and the student builder
and objectives do what their docstrings say."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from training.checkpoint import HeadInfo, load_checkpoint, save_checkpoint
from training.config import ModelConfig
from training.crosslingual.distill import STAGES, DistillSettings, StageSettings, distill, read_pairs
from training.crosslingual.embeddings import sentence_vectors
from training.crosslingual.objectives import ContrastiveStage, PairVectors
from training.crosslingual.student import StudentShape, build_student, student_config
from training.model import build_model

WORDS = ["file", "open", "save", "could", "not", "be", "the", "a", "disk", "error", "read", "write", "user",
         "network", "found", "missing", "folder", "name", "invalid", "option", "cannot", "create", "delete"]
LANGS = {"rv": lambda w: w[::-1], "up": lambda w: w.upper() + "q"}  # two made-up "languages"


def _corpus(tmp: Path) -> Path:
    """train/dev/test.jsonl of {en, x, lang}: 5-8 word sentences and their word-by-word 'translations'."""
    rng = random.Random(0)
    data = tmp / "data"
    data.mkdir()
    for split, count in (("train", 96), ("dev", 16), ("test", 24)):
        with (data / f"{split}.jsonl").open("w") as fh:
            for lang, word_map in LANGS.items():
                for _ in range(count):
                    en = [rng.choice(WORDS) for _ in range(rng.randint(5, 8))]
                    x = " ".join(word_map(w) for w in en)
                    fh.write(json.dumps({"en": " ".join(en), "x": x, "lang": lang, "program": split}) + "\n")
    return data


def _tokenizer() -> Tokenizer:
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in WORDS:
        for form in (w, *(f(w) for f in LANGS.values())):
            vocab.setdefault(form, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _model_dir(tmp: Path, name: str, layers: int, seed: int) -> Path:
    tok = _tokenizer()
    config = ModelConfig.model_validate({
        "vocab_size": tok.get_vocab_size(), "hidden_size": 32, "num_heads": 4, "intermediate_size": 64,
        "dropout": 0.0, "attention_dropout": 0.0, "pad_token_id": 0,
        "embedding": {"parts": ["word", "pos", "seg"], "max_position": 32},
        "encoder": {"num_layers": layers}, "target": {"name": "contrastive", "pooling": "mean", "normalize": True}})
    torch.manual_seed(seed)
    folder = tmp / name
    save_checkpoint(folder, build_model(config), HeadInfo(task="matching", max_length=32), tok)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[DistillSettings, Path, dict]:
    tmp = tmp_path_factory.mktemp("distill")
    stage = StageSettings(steps=40, batch_size=8, lr=3e-3, warmup_ratio=0.0)
    settings = DistillSettings(
        assistant=_model_dir(tmp, "assistant", layers=4, seed=1), teacher=_model_dir(tmp, "teacher", 2, seed=2),
        data=_corpus(tmp), languages=tuple(LANGS), train_pairs=96, dev_pairs=16, test_pairs=24,
        shape=StudentShape(embedding_size=8, unique_layers=1, cycles=2), bottleneck_init="random",
        max_length=16, precision="fp32",
        assistant_stage=stage, bottleneck_stage=stage, recurrence_stage=stage, contrastive_stage=stage,
        save_every=10, progress=False)
    out = tmp / "run"
    return settings, out, distill(settings, out)


def test_every_stage_lowers_its_dev_loss_and_writes_a_loadable_checkpoint(tiny_run) -> None:
    settings, out, report = tiny_run
    assert list(report["stages"]) == ["assistant_original", *STAGES]
    assistant_params = load_checkpoint(settings.assistant).model.num_parameters()
    for name in STAGES:
        row = report["stages"][name]
        training = row["training"]
        assert training["steps"] == 40
        assert training["dev"]["loss"] < 0.9 * training["dev_before"]["loss"], (name, training)
        checkpoint = load_checkpoint(out / name)
        assert checkpoint.model.num_parameters() == row["parameters"]
        assert set(row["languages"]) == set(LANGS) and 0.0 <= row["mean"]["acc@1"] <= 1.0
    student = load_checkpoint(out / "contrastive")
    assert student.config.embedding.embedding_size == 8 and student.config.encoder.unique_layers == 1
    assert student.config.encoder.num_layers == 2
    assert student.model.num_parameters() < assistant_params / 2
    assert report["final"] == str(out / "contrastive")


def test_a_finished_run_resumes_without_training_and_a_lost_stage_result_is_rebuilt(tiny_run) -> None:
    settings, out, report = tiny_run
    weights = (out / "recurrence" / "model.safetensors").stat().st_mtime_ns
    (out / "contrastive" / "metrics.json").unlink()
    again = distill(settings, out)
    assert (out / "recurrence" / "model.safetensors").stat().st_mtime_ns == weights  # skipped: metrics.json
    assert again["stages"]["recurrence"] == report["stages"]["recurrence"]
    # the contrastive stage resumed at its last step: same weights, same retrieval
    assert again["stages"]["contrastive"]["mean"] == report["stages"]["contrastive"]["mean"]
    with pytest.raises(ValueError, match="other settings"):
        distill(settings.model_copy(update={"seed": 1}), out)


def test_without_a_teacher_stage_one_is_skipped_and_the_assistant_teaches(tiny_run, tmp_path: Path) -> None:
    settings, _, _ = tiny_run
    stage = StageSettings(steps=3, batch_size=8)
    solo = settings.model_copy(update={"teacher": None, "stages": ("contrastive",), "contrastive_stage": stage})
    report = distill(solo, tmp_path / "solo")
    assert list(report["stages"]) == ["assistant_original", "contrastive"]


def test_stages_must_come_in_order() -> None:
    with pytest.raises(ValueError, match="order"):
        DistillSettings(assistant=Path("a"), data=Path("d"), stages=("recurrence", "bottleneck"))


def test_a_full_width_student_with_every_layer_reproduces_the_assistant(tmp_path: Path) -> None:
    assistant = load_checkpoint(_model_dir(tmp_path, "a", layers=3, seed=3)).model.eval()
    ids = torch.randint(2, assistant.config.vocab_size, (4, 7))
    mask = torch.ones_like(ids)
    # E = hidden: the SVD keeps every direction, so the factorized table is the assistant's table
    student = build_student(assistant, StudentShape(embedding_size=32, unique_layers=3, cycles=1)).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(ids, mask), assistant(ids, mask), atol=1e-4, rtol=1e-4)
        narrow = build_student(assistant, StudentShape(embedding_size=8, unique_layers=1, cycles=3)).eval()
        random_init = build_student(assistant, StudentShape(embedding_size=8, unique_layers=1, cycles=3),
                                    bottleneck_init="random").eval()
        target = sentence_vectors(assistant, ids, mask, output="embedding")
        svd_error = (sentence_vectors(narrow, ids, mask, output="embedding") - target).pow(2).mean()
        random_error = (sentence_vectors(random_init, ids, mask, output="embedding") - target).pow(2).mean()
    assert svd_error < random_error  # the truncated SVD starts closer to the assistant's embeddings
    config = student_config(assistant.config, StudentShape(embedding_size=8, unique_layers=1, cycles=3))
    assert config.encoder.num_layers == 3 and config.encoder.weight_layers == 1
    assert config.embedding.parts[0] == "factorized_word"


def test_the_contrastive_objective_is_zero_when_the_student_is_the_teacher() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(6, 16)
    vectors = torch.cat([teacher, teacher])  # S(en) = S(x) = T(en)
    module = PairVectors(torch.nn.Identity())  # type: ignore[arg-type]
    loss, metrics = ContrastiveStage(module, "relational").loss(vectors, {"teacher_en": teacher})
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and set(metrics) == {"mse", "relational"}
    shuffled = torch.cat([teacher, teacher[torch.randperm(6)]])
    assert float(ContrastiveStage(module, "relational").loss(shuffled, {"teacher_en": teacher})[0]) > 0.01
    infonce, _ = ContrastiveStage(module, "infonce").loss(vectors, {"teacher_en": teacher})
    assert 0 < float(infonce) < 1.0  # the diagonal wins at scale 20
    assert set(ContrastiveStage(module, "none").loss(vectors, {"teacher_en": teacher})[1]) == {"mse"}


def test_read_pairs_samples_per_language_with_a_seed_or_takes_the_first(tmp_path: Path) -> None:
    data = _corpus(tmp_path)
    first = read_pairs(data / "test.jsonl", ["up"], 5, sample_seed=None)
    lines = [json.loads(line) for line in (data / "test.jsonl").open()]
    assert first.en == [r["en"] for r in lines if r["lang"] == "up"][:5]
    a = read_pairs(data / "train.jsonl", ["rv", "up"], 10, sample_seed=0)
    b = read_pairs(data / "train.jsonl", ["rv", "up"], 10, sample_seed=0)
    assert a == b and a.lang.count("rv") == 10
    with pytest.raises(ValueError, match="no pairs"):
        read_pairs(data / "train.jsonl", ["zz"], 3, sample_seed=0)
