"""Multi-stage cross-lingual distillation (issue #15): a small multilingual sentence encoder from a large one.

S = student, A = multilingual assistant, T = English teacher; en = an English sentence, x = its translation.

1. ``assistant``: A learns MSE(A(en), T(en)) + MSE(A(x), T(en)) (run only when an English teacher is given;
   without one T is A itself and A stays as it is);
2. ``bottleneck``: the student's embedding layer alone (narrow word table, projection, positions, LayerNorm)
   learns MSE(pool(S_emb(s)), pool(A_emb(s))) for s in {en, x};
3. ``recurrence``: the embeddings plus k layers cycled r times learn MSE(S(s), A(s)) for s in {en, x};
4. ``contrastive``: MSE between the in-batch similarity matrices cos(T(en_i), T(en_j)) and
   cos(S(en_i), S(x_j)), plus MSE(S(en), T(en)) + MSE(S(x), T(en)).

Every stage runs through the project's one ``Trainer`` (an objective over cached target vectors), writes a
toolkit checkpoint and ``metrics.json`` into its own folder, and is skipped when that file exists; a stage
stopped midway resumes from its last save. Teacher and assistant vectors are computed once and cached as
safetensors under ``out/cache``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.console import Console
from tokenizers import Tokenizer

from training.checkpoint import Checkpoint, HeadInfo, load_checkpoint
from training.crosslingual.embeddings import Output, cached_encode, encode
from training.crosslingual.metrics import report
from training.crosslingual.objectives import (
    AssistantMSE,
    ContrastiveStage,
    PairVectors,
    RelationLoss,
    TeacherMSE,
)
from training.crosslingual.student import BottleneckInit, LayerInit, StudentShape, build_student
from training.model import Model
from training.trainer import STATE_DIR, Trainer, TrainSettings

StageName = Literal["assistant", "bottleneck", "recurrence", "contrastive"]
STAGES: tuple[StageName, ...] = ("assistant", "bottleneck", "recurrence", "contrastive")
METRICS_FILE = "metrics.json"
SETTINGS_FILE = "settings.json"

console = Console(stderr=True)


class StageSettings(BaseModel):
    """One stage's optimisation budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=2, description="Translation pairs per step (two sentences each).")
    lr: float = Field(1e-4, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)


class DistillSettings(BaseModel):
    """Everything a distillation run depends on; written to ``out/settings.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    assistant: Path = Field(description="The multilingual model (our checkpoint): multilingual-e5-small.")
    teacher: Path | None = Field(None, description="English teacher checkpoint (all-MiniLM-L6-v2); None: the "
                                                   "assistant is its own teacher and stage 1 is skipped.")
    data: Path = Field(description="`sampserve data gettext-parallel`'s folder: train/dev/test.jsonl.")
    languages: tuple[str, ...] = ("de", "fr", "es", "it", "nl", "tr", "ru", "zh_CN", "ja")
    train_pairs: int = Field(2000, ge=1, description="Training pairs per language (a seeded sample).")
    dev_pairs: int = Field(100, ge=1, description="Dev pairs per language (loss after each stage).")
    test_pairs: int = Field(1000, ge=2, description="Test pairs per language, the first in file order.")
    shape: StudentShape = StudentShape()
    bottleneck_init: BottleneckInit = "svd"
    layer_init: LayerInit = "assistant"
    stages: tuple[StageName, ...] = ("assistant", "bottleneck", "recurrence", "contrastive")
    relation: RelationLoss = "relational"
    freeze_assistant_words: bool = Field(True, description="Stage 1 keeps A's word table (82% of it) fixed.")
    assistant_stage: StageSettings = StageSettings(steps=200, lr=5e-5)
    bottleneck_stage: StageSettings = StageSettings(steps=400, batch_size=256, lr=1.6e-4)
    recurrence_stage: StageSettings = StageSettings(steps=300, lr=1e-4)
    contrastive_stage: StageSettings = StageSettings(steps=300, lr=1e-4)
    max_length: int = Field(64, ge=8, description="Tokens per sentence, prefix included.")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="Autocast while training (eval is fp32).")
    seed: int = 0
    save_every: int = Field(100, ge=0)
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> DistillSettings:
        if list(self.stages) != sorted(self.stages, key=STAGES.index) or len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages run in the order {STAGES}, each once; got {self.stages}")
        if not [s for s in self.stages if s != "assistant"]:
            raise ValueError("name at least one student stage (bottleneck, recurrence, contrastive)")
        return self

    def stage(self, name: StageName) -> StageSettings:
        return getattr(self, f"{name}_stage")


@dataclass
class Pairs:
    """Translation pairs of one split: English side, other side, language, in a fixed order."""

    en: list[str]
    x: list[str]
    lang: list[str]

    def of(self, lang: str) -> tuple[list[str], list[str]]:
        rows = [i for i, code in enumerate(self.lang) if code == lang]
        return [self.en[i] for i in rows], [self.x[i] for i in rows]


def read_pairs(path: Path, languages: Sequence[str], per_language: int, sample_seed: int | None) -> Pairs:
    """``per_language`` pairs of each language from a ``{en, x, lang}`` JSONL file: a seeded sample, or the
    first in file order when ``sample_seed`` is None (as ``sampserve crosslingual-eval`` takes them)."""
    rows: dict[str, list[tuple[str, str]]] = {lang: [] for lang in languages}
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                if row["lang"] in rows:
                    rows[row["lang"]].append((row["en"], row["x"]))
    out = Pairs([], [], [])
    for lang in languages:
        kept = rows[lang]
        if not kept:
            raise ValueError(f"{path} has no pairs for language {lang!r}")
        if sample_seed is not None and len(kept) > per_language:
            kept = random.Random(f"{sample_seed}:{lang}").sample(kept, per_language)
        for en, x in kept[:per_language]:
            out.en.append(en)
            out.x.append(x)
            out.lang.append(lang)
    return out


class Vectors:
    """Target vectors of texts from one checkpoint, computed once per distinct text and cached."""

    def __init__(self, checkpoint: Checkpoint, cache_dir: Path, max_length: int, progress: bool) -> None:
        self.checkpoint, self.cache_dir, self.max_length, self.progress = checkpoint, cache_dir, max_length, progress

    def __call__(self, texts: list[str], output: Output) -> np.ndarray:
        distinct = list(dict.fromkeys(texts))
        vectors = cached_encode(self.checkpoint, distinct, self.cache_dir, max_length=self.max_length,
                                prefix=self.checkpoint.head.text_prefix, progress=self.progress, output=output)
        row = {text: i for i, text in enumerate(distinct)}
        return vectors[[row[t] for t in texts]]


class PairCollator:
    """Records ``{"index", "en_ids", "x_ids", "length"}`` -> one batch: both sides' ids in one (2B, L) tensor
    (English rows first) and the rows of each target array at the records' indices."""

    def __init__(self, pad_id: int, targets: dict[str, np.ndarray]) -> None:
        self.pad_id = pad_id
        self.targets = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in targets.items()}

    def __call__(self, records: list[dict], indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        sequences = [r["en_ids"] for r in records] + [r["x_ids"] for r in records]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        rows = torch.tensor([r["index"] for r in records])
        return {"input_ids": ids, "attention_mask": mask, **{k: v[rows] for k, v in self.targets.items()}}


def pair_records(tokenizer: Tokenizer, pairs: Pairs, prefix: str, max_length: int) -> list[dict]:
    """Tokenized pairs (prefix added, truncated) with the longer side's length for length grouping."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length=max_length)
    en = tok.encode_batch([prefix + t for t in pairs.en])
    x = tok.encode_batch([prefix + t for t in pairs.x])
    return [{"index": i, "en_ids": a.ids, "x_ids": b.ids, "length": max(len(a.ids), len(b.ids))}
            for i, (a, b) in enumerate(zip(en, x, strict=True))]


def evaluate_retrieval(checkpoint: Checkpoint, test: Pairs, languages: Sequence[str], max_length: int,
                       teacher_en: dict[str, np.ndarray] | None = None, output: Output = "served",
                       progress: bool = False, cache_dir: Path | None = None) -> dict:
    """``metrics.report`` of a checkpoint on the test pairs: retrieval acc@1 per language and mean, and the
    STS proxy when the teacher's English vectors are given. With ``cache_dir`` the vectors are cached."""
    per_language = {}
    for lang in languages:
        en, x = test.of(lang)
        kw: dict[str, Any] = {"max_length": max_length, "prefix": checkpoint.head.text_prefix,
                              "output": output, "progress": progress}
        vectors = (cached_encode(checkpoint, en + x, cache_dir, **kw) if cache_dir is not None
                   else encode(checkpoint, en + x, **kw))
        per_language[lang] = (vectors[:len(en)], vectors[len(en):])
    return report(per_language, teacher_en)


class Distillation:
    """One run: ``run()`` goes through the configured stages and returns the report (also in ``report.json``)."""

    def __init__(self, settings: DistillSettings, out: Path, cache: Path | None = None) -> None:
        """``cache`` (default ``out/cache``) holds the vectors; runs that share teachers can share it."""
        self.settings = settings
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        saved = self.out / SETTINGS_FILE
        current = settings.model_dump(mode="json", exclude={"progress"})
        if saved.is_file():
            previous = json.loads(saved.read_text())
            previous.pop("progress", None)
            if previous != current:
                raise ValueError(f"{self.out} holds a run with other settings ({saved}); use a new folder")
        else:
            saved.write_text(json.dumps(current, indent=2))
        s = settings
        self.train = read_pairs(s.data / "train.jsonl", s.languages, s.train_pairs, sample_seed=s.seed)
        self.dev = read_pairs(s.data / "dev.jsonl", s.languages, s.dev_pairs, sample_seed=s.seed)
        self.test = read_pairs(s.data / "test.jsonl", s.languages, s.test_pairs, sample_seed=None)
        self.cache = Path(cache) if cache is not None else self.out / "cache"

    # --- helpers ---------------------------------------------------------------------------------------

    def _vectors(self, checkpoint: Checkpoint) -> Vectors:
        return Vectors(checkpoint, self.cache, self.settings.max_length, self.settings.progress)

    def _teacher_test(self, teacher: Checkpoint) -> dict[str, np.ndarray]:
        vectors = self._vectors(teacher)
        return {lang: vectors(self.test.of(lang)[0], "served") for lang in self.settings.languages}

    def _records(self, tokenizer: Tokenizer, prefix: str) -> tuple[list[dict], list[dict]]:
        s = self.settings
        return (pair_records(tokenizer, self.train, prefix, s.max_length),
                pair_records(tokenizer, self.dev, prefix, s.max_length))

    def _train(self, name: StageName, model: Model, head: HeadInfo, tokenizer: Tokenizer,
               objective: Any, targets: Callable[[Pairs], dict[str, np.ndarray]]) -> dict:
        """Train one stage in ``out/<name>`` and return its trainer summary (resuming a stopped stage)."""
        s, stage = self.settings, self.settings.stage(name)
        folder = self.out / name
        if (folder / STATE_DIR).is_dir() and (folder / "model_config.json").is_file():
            model.load_state_dict(load_checkpoint(folder).model.state_dict())
            console.print(f"[bold]{name}[/]: resuming from {folder}")
        train_records, dev_records = self._records(tokenizer, head.text_prefix)
        train_collator = PairCollator(model.config.pad_token_id, targets(self.train))
        dev_collator = PairCollator(model.config.pad_token_id, targets(self.dev))
        settings = TrainSettings(batch_size=stage.batch_size, max_steps=stage.steps, lr=stage.lr,
                                 warmup_ratio=stage.warmup_ratio, weight_decay=stage.weight_decay,
                                 max_length=s.max_length, seed=s.seed, precision=s.precision,
                                 save_every=s.save_every, group_by_length=True, progress=s.progress)
        trainer = Trainer(model, tokenizer, head, dev_collator, settings, folder, objective=objective)
        started = time.perf_counter()
        with torch.no_grad():
            before = trainer.evaluate(dev_records)
        trainer.collator = train_collator
        result = trainer.train(train_records, None, resume=True)
        trainer.collator = dev_collator
        with torch.no_grad():
            dev = trainer.evaluate(dev_records)
        return {"steps": result.steps, "train_loss": result.train_loss, "dev_before": before, "dev": dev,
                "seconds": round(time.perf_counter() - started, 1)}

    def _finish(self, name: str, checkpoint: Checkpoint, training: dict | None, teacher_test: dict,
                output: Output = "served") -> dict:
        metrics = evaluate_retrieval(checkpoint, self.test, self.settings.languages, self.settings.max_length,
                                     teacher_test, output=output, progress=self.settings.progress,
                                     cache_dir=self.cache)
        result = {"stage": name, "parameters": checkpoint.model.num_parameters(), "output": output,
                  "training": training, **metrics}
        (self.out / name).mkdir(parents=True, exist_ok=True)
        (self.out / name / METRICS_FILE).write_text(json.dumps(result, indent=2))
        console.print(f"[bold]{name}[/]: mean acc@1 {metrics['mean']['acc@1']:.4f}, "
                      f"STS proxy {metrics['mean'].get('sts_proxy', float('nan')):.4f}, "
                      f"{result['parameters']:,} parameters")
        return result

    def _done(self, name: str) -> dict | None:
        path = self.out / name / METRICS_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    # --- the run ---------------------------------------------------------------------------------------

    def run(self) -> dict:
        s = self.settings
        original = load_checkpoint(s.assistant)
        english = load_checkpoint(s.teacher) if s.teacher is not None else None
        reference = english or original
        teacher_test = self._teacher_test(reference)
        results: dict[str, dict] = {}
        results["assistant_original"] = self._done("assistant_original") or self._finish(
            "assistant_original", original, None, teacher_test)
        assistant = self._assistant(original, english, teacher_test, results)
        teacher = english or assistant
        student = build_student(assistant.model, s.shape, s.bottleneck_init, s.layer_init, seed=s.seed)
        head = assistant.head.model_copy(update={
            "source": f"distilled from {s.assistant} ({s.shape.label}, stages {'+'.join(s.stages)})"})
        previous: Path | None = None
        for name in s.stages:
            if name == "assistant":
                continue
            done = self._done(name)
            if done is not None:
                results[name] = done
                previous = self.out / name
                continue
            if previous is not None:  # continue from the last finished stage's weights
                student.load_state_dict(load_checkpoint(previous).model.state_dict())
            training = self._student_stage(name, student, head, assistant, teacher)
            results[name] = self._finish(name, load_checkpoint(self.out / name), training, teacher_test,
                                         output="embedding" if name == "bottleneck" else "served")
            previous = self.out / name
        summary = {"settings": s.model_dump(mode="json"), "stages": results,
                   "final": str(previous) if previous else None}
        (self.out / "report.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _assistant(self, original: Checkpoint, english: Checkpoint | None, teacher_test: dict,
                   results: dict) -> Checkpoint:
        """Stage 1, or the assistant as it is when there is no English teacher or the stage is not asked."""
        if english is None or "assistant" not in self.settings.stages:
            return original
        folder = self.out / "assistant"
        if (done := self._done("assistant")) is None:
            model = original.model
            model.train()
            for name, param in model.named_parameters():
                param.requires_grad_(not (self.settings.freeze_assistant_words and name.startswith(
                    "embedding.parts.word")))
            teacher = self._vectors(english)
            training = self._train("assistant", model, original.head, original.tokenizer,
                                   TeacherMSE(PairVectors(model, "pooled")),
                                   lambda p: {"teacher_en": teacher(p.en, "pooled")})
            done = self._finish("assistant", load_checkpoint(folder), training, teacher_test)
        results["assistant"] = done
        return load_checkpoint(folder)

    def _student_stage(self, name: StageName, student: Model, head: HeadInfo, assistant: Checkpoint,
                       teacher: Checkpoint) -> dict:
        a, t = self._vectors(assistant), self._vectors(teacher)
        for param in student.parameters():
            param.requires_grad_(True)
        if name == "bottleneck":  # the embedding layer alone: the encoder layers get no gradient
            for param in student.encoder.parameters():
                param.requires_grad_(False)
            return self._train(name, student, head, assistant.tokenizer,
                               AssistantMSE(PairVectors(student, "embedding")),
                               lambda p: {"assistant_en": a(p.en, "embedding"), "assistant_x": a(p.x, "embedding")})
        if name == "recurrence":
            return self._train(name, student, head, assistant.tokenizer,
                               AssistantMSE(PairVectors(student, "pooled")),
                               lambda p: {"assistant_en": a(p.en, "pooled"), "assistant_x": a(p.x, "pooled")})
        return self._train(name, student, head, assistant.tokenizer,
                           ContrastiveStage(PairVectors(student, "pooled"), self.settings.relation),
                           lambda p: {"teacher_en": t(p.en, "pooled")})


def ensure_checkpoint(source: str | Path, folder: Path) -> Path:
    """``source`` when it is our checkpoint folder; else ``source`` (``e5-small``, ``minilm`` for the bundled
    all-MiniLM-L6-v2, a Hugging Face folder, a GGUF or E5S1 file) imported once into ``folder``."""
    from training.checkpoint import save_checkpoint
    from training.jobs import bundled_minilm_dir, import_source

    if Path(source).is_dir() and (Path(source) / "model_config.json").is_file():
        return Path(source)
    if not (folder / "model_config.json").is_file():
        imported, _ = import_source(bundled_minilm_dir() if str(source) == "minilm" else source)
        save_checkpoint(folder, imported.model, imported.head, imported.tokenizer)
    return folder


def crosslingual_settings(assistant: Path, data: Path) -> DistillSettings:
    """The served student's recipe (``sampserve up --with crosslingual``): the assistant as its own teacher,
    stages 2-4 at their default budgets, E=128 with the assistant's 12 layers applied once (``StudentShape()``;
    on dev, 3 layers cycled 4 times stayed far below it at this budget), nine languages."""
    return DistillSettings(assistant=assistant, teacher=None, data=data, progress=False,
                           stages=("bottleneck", "recurrence", "contrastive"))


def distill(settings: DistillSettings, out: Path, cache: Path | None = None) -> dict:
    """Run (or resume) the stages of ``settings`` in ``out``; returns the report."""
    return Distillation(settings, out, cache).run()
