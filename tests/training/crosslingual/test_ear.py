"""EAR on a tiny model: each loss term has the sign and gradient the method needs, the inner states come from
the classifier's own forward pass, the synonym perturbation keeps placeholders and labels, and a short run
trains, evaluates every target language and reads back when finished."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.training.crosslingual.test_distill import LANGS, WORDS, _tokenizer
from training.checkpoint import HeadInfo, load_checkpoint, save_checkpoint
from training.config import ModelConfig
from training.crosslingual.ear import (
    EarCollator,
    EarObjective,
    EarSettings,
    attention_pull,
    embedding_push,
    reinitialise_from,
    start_alignment,
    train_ear,
)
from training.crosslingual.synonyms import load_synonyms, perturb
from training.model import build_model
from training.tokenization import configured

LABELS = ["disk", "network"]


def _model(layers: int = 2, seed: int = 0):
    tok = _tokenizer()
    config = ModelConfig.model_validate({
        "vocab_size": tok.get_vocab_size(), "hidden_size": 32, "num_heads": 4, "intermediate_size": 64,
        "dropout": 0.0, "attention_dropout": 0.0, "pad_token_id": 0,
        "embedding": {"parts": ["word", "pos", "seg"], "max_position": 32},
        "encoder": {"num_layers": layers}, "target": {"name": "cls", "pooling": "mean", "num_labels": 2}})
    torch.manual_seed(seed)
    return build_model(config), tok


def _batch(tok, texts: list[str], perturbed: list[str], paired: bool = True) -> dict:
    collator = EarCollator(configured(tok, 32, 0), 0, LABELS, "", paired)
    records = [{"text": t, "perturbed": p, "label": LABELS[i % 2]} for i, (t, p) in enumerate(zip(texts, perturbed))]
    return collator(records, list(range(len(records))), 0)


def test_inner_states_come_from_the_classifier_pass() -> None:
    model, tok = _model()
    model.eval()
    batch = _batch(tok, ["could not open the file", "network error"], ["could not read the folder", "network"])
    out = model.encode(batch["input_ids"], batch["attention_mask"], attention_layer=1)
    served = model(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(model.target(out.hidden, batch["attention_mask"]), served)
    assert torch.equal(out.embedded, model.embedding(batch["input_ids"]))
    assert out.attention.shape == (4, 4, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    assert torch.allclose(out.attention.sum(-1), torch.ones(4, 4, batch["input_ids"].shape[1]))
    assert int((batch["attention_mask"][1] == 0).sum()) > 0
    assert torch.all(out.attention[1][:, :, batch["attention_mask"][1] == 0] == 0)  # padding gets no attention
    assert model.encode(batch["input_ids"], batch["attention_mask"]).attention is None
    with pytest.raises(ValueError):
        model.encode(batch["input_ids"], attention_layer=2)


def test_embedding_push_is_a_distance_that_descent_increases() -> None:
    mask = torch.ones(4, 5)
    same = torch.randn(2, 5, 8).repeat(2, 1, 1)
    assert float(embedding_push(same, mask)) == 0.0
    embedded = torch.randn(4, 5, 8, requires_grad=True)
    before = embedding_push(embedded, mask)
    assert float(before.detach()) > 0
    (-0.1 * before).backward()  # the term as the loss adds it: minus alpha times the push
    with torch.no_grad():
        after = embedding_push(embedded - 1.0 * embedded.grad, mask)
    assert float(after) > float(before.detach())
    padded = mask.clone()
    padded[:, 3:] = 0  # padding does not count: changing padded positions leaves the term unchanged
    moved = embedded.detach().clone()
    moved[:, 3:] += 5
    assert torch.allclose(embedding_push(moved, padded), embedding_push(embedded.detach(), padded))


def test_attention_pull_is_a_distance_that_descent_reduces() -> None:
    mask = torch.ones(4, 6)
    maps = torch.softmax(torch.randn(2, 2, 6, 6), -1)
    assert float(attention_pull(maps.repeat(2, 1, 1, 1), mask)) == 0.0
    logits = torch.randn(4, 2, 6, 6, requires_grad=True)
    before = attention_pull(torch.softmax(logits, -1), mask)
    assert float(before.detach()) > 0
    before.backward()
    with torch.no_grad():
        after = attention_pull(torch.softmax(logits - 50.0 * logits.grad, -1), mask)
    assert float(after) < float(before.detach())
    # The gradient reaches both views (no stop-gradient), and positions padded in either view do not count.
    assert float(logits.grad[:2].abs().sum()) > 0 and float(logits.grad[2:].abs().sum()) > 0
    padded = mask.clone()
    padded[2, 4:] = 0
    changed = torch.softmax(logits.detach(), -1).clone()
    changed[0, :, 4:, :] = 0.5
    changed[0, :, :, 4:] = 0.5
    base = torch.softmax(logits.detach(), -1)
    assert torch.allclose(attention_pull(changed, padded), attention_pull(base, padded))


@pytest.mark.parametrize("parts", [(False, False, False), (True, False, False), (True, True, True),
                                   (False, True, True)])
def test_objective_adds_the_switched_on_terms(parts: tuple[bool, bool, bool]) -> None:
    robust, push, pull = parts
    model, tok = _model()
    settings = EarSettings(start=Path("."), data=Path("."), robust_targets=robust, embedding_push=push,
                           attention_pull=pull, alpha=0.3, beta=2.0, layer=1)
    objective = EarObjective(model, settings)
    batch = _batch(tok, ["could not open the file", "network error found"], ["could not read the folder", "network"],
                   paired=settings.paired)
    assert batch["input_ids"].shape[0] == (4 if settings.paired else 2)
    loss, metrics = objective.loss(objective.module(**objective.inputs(batch)), batch)
    expected = (metrics["ce"] + metrics.get("ce_perturbed", 0) - 0.3 * metrics.get("push", 0)
                + 2.0 * metrics.get("pull", 0))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert ("ce_perturbed" in metrics) == robust and ("push" in metrics) == push and ("pull" in metrics) == pull
    assert settings.label() == ("baseline" if not any(parts) else "+".join(
        n for n, on in zip(("RT", "EP", "AP"), parts) if on))
    with pytest.raises(ValueError, match="beyond"):
        EarObjective(model, settings.model_copy(update={"attention_pull": True, "layer": 2}))


def test_reinitialise_from_is_a_fixed_fresh_start() -> None:
    model, _ = _model(layers=2)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    reinitialise_from(model, 1, seed=3)
    after = model.state_dict()
    low, high = "encoder.layers.0.feed_forward.inner.weight", "encoder.layers.1.feed_forward.inner.weight"
    assert torch.equal(after[low], first[low])
    assert not torch.equal(after[high], first[high])
    again, _ = _model(layers=2, seed=5)
    reinitialise_from(again, 1, seed=3)
    assert torch.equal(again.state_dict()[high], after[high])


SYNONYMS = {"file": ("register", "data"), "open": ("unfastened",), "error": ("mistake", "fault"),
            "name": ("epithet",), "read": ("scan",)}


def test_perturbation_keeps_placeholders_punctuation_and_case() -> None:
    rng = random.Random(0)
    text = "Could not open file %s: %m; the {name} entry in ${HOME}/file.txt has an Error!"
    seen = set()
    for _ in range(50):
        out = perturb(text, SYNONYMS, rng)
        seen.add(out)
        for slot in ("%s:", "%m;", "{name}", "${HOME}/file.txt", "Could not", "the"):
            assert slot in out
        assert len(out.split()) == len(text.split())
        assert out.endswith("!") and out.split()[-1][0].isupper()
    assert len(seen) > 5  # words do change
    assert any("register %s" in s or "data %s" in s for s in seen)


def test_wordnet_synonyms_are_real() -> None:
    synonyms = load_synonyms()
    assert len(synonyms) > 30_000
    assert "mistake" in synonyms["error"]
    assert "it" not in synonyms and "be" not in synonyms  # closed-class homographs are never replaced


def _transfer_data(tmp: Path) -> Path:
    """A topic task over the made-up languages: label = whether the message mentions the network."""
    rng = random.Random(1)
    data = tmp / "data"
    data.mkdir()

    def message() -> dict:
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 7))]
        label = "network" if "network" in words or "user" in words else "disk"
        return {"text": " ".join(words), "label": label}

    def write(name: str, rows: list[dict]) -> None:
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    train = [message() for _ in range(160)]
    for r in train:
        r["perturbed"] = [" ".join(rng.choice(WORDS) if rng.random() < 0.2 else w for w in r["text"].split())
                          for _ in range(3)]
    write("train.jsonl", train)
    write("dev.jsonl", [message() for _ in range(32)])
    test = [message() for _ in range(48)]
    write("test.en.jsonl", test)
    for lang, word_map in LANGS.items():
        write(f"test.{lang}.jsonl", [{"text": " ".join(word_map(w) for w in r["text"].split()), "en": r["text"],
                                      "label": r["label"]} for r in test])
    return data


def test_a_short_run_trains_evaluates_and_resumes(tmp_path: Path) -> None:
    data = _transfer_data(tmp_path)
    model, tok = _model()
    start = tmp_path / "start"
    save_checkpoint(start, model, HeadInfo(task="matching", max_length=32), tok)
    settings = EarSettings(start=start, data=data, steps=40, batch_size=16, lr=3e-3, layer=1, max_length=32,
                           precision="fp32", keep_checkpoint=True)
    metrics = train_ear(settings, tmp_path / "run", progress=False)
    assert metrics["label"] == "RT+EP+AP" and metrics["steps"] == 40
    assert metrics["accuracy"]["en"] > 0.7  # it learned the English task
    history = metrics["history"]  # the training curves: every term, every step
    assert [row["step"] for row in history] == list(range(1, 41))
    assert {"ce", "ce_perturbed", "push", "pull"} <= set(history[0])
    assert sum(r["ce"] for r in history[-5:]) < sum(r["ce"] for r in history[:5])
    assert set(metrics["hits"]) == {"en", *LANGS} and len(metrics["hits"]["rv"]) == 48
    assert set(metrics["alignment"]) == set(LANGS) and 0 <= metrics["alignment"]["rv"]["retrieval"] <= 1
    served = load_checkpoint(tmp_path / "run")
    assert served.head.task == "classification" and served.head.labels == LABELS
    assert not (tmp_path / "run" / "trainer_state").exists()
    again = train_ear(settings.model_copy(update={"steps": 1}), tmp_path / "run", progress=False)
    assert again == metrics  # finished: read back, not retrained
    before = start_alignment(start, data, list(LANGS))
    assert set(before) == set(LANGS)


def test_sampserve_transfer_runs_the_baseline_and_prints_every_language(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    data = _transfer_data(tmp_path)
    model, tok = _model()
    start = tmp_path / "start"
    save_checkpoint(start, model, HeadInfo(task="matching", max_length=32), tok)
    done = subprocess.run(
        [sys.executable, "-m", "sampserve.cli", "transfer", str(tmp_path / "base"), "--start", str(start),
         "--data", str(data), "--no-robust-targets", "--no-embedding-push", "--no-attention-pull",
         "--steps", "6", "--batch-size", "16", "--lr", "3e-3"],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "baseline: zero-shot transfer" in done.stdout
    for row in ("en (trained)", "rv", "up", "mean"):
        assert row in done.stdout
    metrics = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert metrics["label"] == "baseline" and metrics["steps"] == 6
    assert {"ce", "accuracy"} <= set(metrics["history"][0]) and "push" not in metrics["history"][0]
    missing = subprocess.run([sys.executable, "-m", "sampserve.cli", "transfer", str(tmp_path / "x"), "--start",
                              str(tmp_path / "nothing"), "--data", str(data)], capture_output=True, text=True,
                             timeout=120, check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_translations_come_from_the_messages_own_topic_and_differ_from_the_english(tmp_path: Path) -> None:
    from tests.training.test_gettext_topics import _write_mo
    from training.crosslingual.transfer_data import translations

    message = "could not lock the reference file for %s"
    _write_mo(tmp_path / "de/LC_MESSAGES/git.mo", {message: "Konnte die Referenzdatei für %s nicht sperren",
                                                   "untranslated message stays in english": ""})
    _write_mo(tmp_path / "fr/LC_MESSAGES/coreutils.mo", {message: "mauvais sujet: autre programme"})
    _write_mo(tmp_path / "fr/LC_MESSAGES/git.mo", {message: message})  # a copy of the English is no translation
    _write_mo(tmp_path / "zh_Hans/LC_MESSAGES/git.mo", {message: "无法锁定  %s 的引用文件"})
    found = translations({message: "version_control", "untranslated message stays in english": "version_control"},
                         ["de", "fr", "zh_CN"], locale_root=tmp_path)
    assert found == {"de": {message: "Konnte die Referenzdatei für %s nicht sperren"}, "fr": {},
                     "zh_CN": {message: "无法锁定 %s 的引用文件"}}
