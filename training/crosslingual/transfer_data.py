"""Zero-shot transfer data: the English gettext topic task for training, its translations for testing.

Why this shape: zero-shot cross-lingual transfer trains on labelled English only and tests on other
languages. The topic task (:mod:`training.data.gettext_topics`) labels each English UI message by the kind
of program it comes from, and Debian's catalogs hold those same messages translated by each program's
translation team; a held-out English message's translations carry its label. So the target-language test
sets are human translations of the English test messages, the same examples in every language, never seen
in training or model selection (the split is by message, dev is English only).

Files written (JSONL, one record a line):

- ``train.jsonl``: ``text``, ``label``, ``perturbed`` (``copies`` synonym-perturbed versions of ``text``);
- ``dev.jsonl``, ``test.en.jsonl``: English ``text``, ``label``;
- ``test.<lang>.jsonl``: ``text`` (the translation), ``en`` (its English message), ``label``;
- ``dev.<lang>.jsonl``: the same for the English dev messages: never for training or choosing a model, only
  for checking that quantization keeps the other languages' accuracy too;
- ``manifest.json``: the settings and counts.
"""

from __future__ import annotations

import json
import random
import struct
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from training.crosslingual.synonyms import load_synonyms, perturb
from training.data.gettext_parallel import locale_language
from training.data.gettext_topics import (
    _ASCII_PUNCT,
    _clean,
    _topic_of,
    load_gettext_topics,
    read_mo_pairs,
    split,
    write_jsonl,
)

__all__ = ["TRANSFER_LANGUAGES", "TransferData", "build_transfer_data", "ensure_transfer_data", "load_manifest",
           "read_jsonl", "translations", "write_translations"]

# The issue's six plus the other large catalogs' languages from different families and scripts.
TRANSFER_LANGUAGES: tuple[str, ...] = ("de", "fr", "es", "it", "pl", "ru", "tr", "zh_CN", "ja", "ko")
MANIFEST = "manifest.json"


class TransferData(BaseModel):
    """How the data set was built; saved as manifest.json beside it."""

    model_config = ConfigDict(extra="forbid")

    languages: list[str] = Field(default_factory=lambda: list(TRANSFER_LANGUAGES))
    seed: int = 0
    max_per_topic: int = Field(1500, ge=10)
    min_words: int = Field(5, ge=1)
    dev_fraction: float = 0.1
    test_fraction: float = 0.2
    copies: int = Field(3, ge=1, description="Synonym-perturbed copies per training message (the method: 3).")
    counts: dict[str, int] = Field(default_factory=dict)


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _normalise_translation(text: str) -> str:
    return " ".join(text.translate(_ASCII_PUNCT).split())


def translations(english: dict[str, str], languages: Sequence[str], min_words: int = 5,
                 locale_root: Path = Path("/usr/share/locale")) -> dict[str, dict[str, str]]:
    """``{lang: {english text: translation}}`` for the messages in ``english`` (text -> topic).

    A translation counts only when it comes from a catalog of the message's own topic and differs from the
    English; of several, the one from the alphabetically first catalog wins, so the output is deterministic.
    """
    found: dict[str, dict[str, str]] = defaultdict(dict)
    wanted = set(languages)
    for mo in sorted(Path(locale_root).glob("*/LC_MESSAGES/*.mo")):
        lang = locale_language(mo.parent.parent.name)
        topic = _topic_of(mo.stem)
        if lang not in wanted or topic is None:
            continue
        try:
            pairs = read_mo_pairs(mo)
        except (OSError, ValueError, struct.error):
            continue
        for msgid, msgstr in pairs:
            text = _clean(msgid, min_words) if msgstr else None
            if text is None or english.get(text) != topic or text in found[lang]:
                continue
            x = _normalise_translation(msgstr)
            if x and x != text:
                found[lang][text] = x
    return {lang: dict(found[lang]) for lang in languages}


def build_transfer_data(out: Path, settings: TransferData | None = None,
                        locale_root: Path = Path("/usr/share/locale")) -> TransferData:
    """Write the data set into ``out`` (see the module docstring) and return its manifest."""
    settings = settings or TransferData()
    records = load_gettext_topics(locale_root, min_words=settings.min_words,
                                  max_per_topic=settings.max_per_topic, seed=settings.seed)
    train, dev, test = split(records, settings.dev_fraction, settings.test_fraction, seed=settings.seed)
    synonyms = load_synonyms()
    rng = random.Random(settings.seed)
    train = [{**r, "perturbed": [perturb(r["text"], synonyms, rng) for _ in range(settings.copies)]} for r in train]
    out = Path(out)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(dev, out / "dev.jsonl")
    write_jsonl(test, out / "test.en.jsonl")
    counts = {"train": len(train), "dev": len(dev), "en": len(test)}
    counts |= write_translations(out, "test", test, settings, locale_root)
    counts |= {f"dev.{lang}": n for lang, n in write_translations(out, "dev", dev, settings, locale_root).items()}
    manifest = settings.model_copy(update={"counts": counts})
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=1))
    return manifest


def write_translations(out: Path, split_name: str, rows: list[dict], settings: TransferData,
                       locale_root: Path = Path("/usr/share/locale")) -> dict[str, int]:
    """Write ``<split>.<lang>.jsonl``: the translations of ``rows`` (English text, label) into each language."""
    found = translations({r["text"]: r["label"] for r in rows}, settings.languages, settings.min_words, locale_root)
    counts = {}
    for lang in settings.languages:
        translated = [{"text": found[lang][r["text"]], "en": r["text"], "label": r["label"]}
                      for r in rows if r["text"] in found[lang]]
        write_jsonl(translated, Path(out) / f"{split_name}.{lang}.jsonl")
        counts[lang] = len(translated)
    return counts


def ensure_transfer_data(folder: Path) -> Path:
    """``folder`` when it holds a data set (``train.jsonl``), else the default data set built into it."""
    if not (Path(folder) / "train.jsonl").is_file():
        build_transfer_data(folder)
    return Path(folder)


def load_manifest(folder: Path) -> TransferData | None:
    path = Path(folder) / MANIFEST
    return TransferData.model_validate_json(path.read_text()) if path.is_file() else None
