"""Synonym perturbation for EAR's robust training: English words swapped for WordNet synonyms.

Why WordNet: the method's authors drew substitutes from counter-fitted word-vector neighbours, a data file
without a licence; WordNet 3.0 (Princeton's licence) ships in Debian's ``wordnet-base``, so the synonyms
come from a registry package. It is read from ``/usr/share/wordnet`` when installed, else the package is
fetched with ``apt-get download`` and unpacked (``dpkg-deb -x``) into a cache folder: no root needed.

Which synonyms: for each word, the lemmas sharing a synset with one of its ``senses`` most frequent senses
per part of speech (WordNet's index files list senses by frequency), single words only. Placeholders
(``%s``, ``{name}``, ``$VAR``), words with digits or markup, and closed-class words (WordNet's homographs
of "it", "a", "in" are nouns) are never replaced, so a perturbed message keeps its slots and grammar.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from training.data.gettext_topics import _FORMAT_SPEC

__all__ = ["Synonyms", "load_synonyms", "perturb", "wordnet_dir"]

SYSTEM_WORDNET = Path("/usr/share/wordnet")
PACKAGE = "wordnet-base"
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
_WORD = re.compile(r"^([\"'(\[]*)([A-Za-z][a-z]+(?:-[a-z]+)*)([\"')\].,:;!?]*)$")
# Closed-class and very common words whose WordNet entries are unrelated homographs or senses that break
# the sentence ("it" -> "information technology", "be" -> "beryllium", "not" -> "non").
STOP_WORDS = frozenset([
    "a", "an", "the", "this", "that", "these", "those", "it", "its", "they", "them", "their", "there", "here",
    "he", "she", "we", "you", "your", "our", "my", "me", "us", "i", "is", "are", "was", "were", "be", "been",
    "being", "am", "do", "does", "did", "done", "has", "have", "had", "having", "can", "could", "will", "would",
    "shall", "should", "may", "might", "must", "not", "no", "nor", "and", "or", "but", "if", "then", "else",
    "than", "so", "as", "at", "by", "for", "from", "in", "into", "of", "on", "onto", "out", "over", "to", "up",
    "with", "without", "about", "after", "before", "under", "between", "through", "during", "per", "via", "all",
    "any", "each", "every", "some", "such", "own", "same", "other", "which", "what", "who", "whom", "whose",
    "when", "where", "why", "how", "also", "only", "just", "very", "too", "more", "most", "less", "least",
])
Synonyms = dict[str, tuple[str, ...]]


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sampserve" / PACKAGE


def wordnet_dir() -> Path:
    """The folder holding WordNet's ``index.*`` and ``data.*`` files, fetching the Debian package if needed."""
    for folder in (SYSTEM_WORDNET, _cache_root() / "usr/share/wordnet"):
        if (folder / "data.noun").is_file():
            return folder
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FileNotFoundError(f"WordNet not found in {SYSTEM_WORDNET}; install Debian's {PACKAGE} "
                                f"(apt-get install {PACKAGE})")
    root = _cache_root()
    with tempfile.TemporaryDirectory() as tmp:
        fetched = subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if fetched.returncode or not debs:
            raise FileNotFoundError(f"could not fetch {PACKAGE} with apt-get download: {fetched.stderr.strip()}")
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root.parent))  # beside its final place: the rename stays atomic
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(staging)], check=True)
        if not (root / "usr/share/wordnet/data.noun").is_file():
            shutil.rmtree(root, ignore_errors=True)
            staging.rename(root)  # atomic: a concurrent reader sees all of it or none
        else:
            shutil.rmtree(staging, ignore_errors=True)
    return root / "usr/share/wordnet"


def _synset_words(data_file: Path) -> dict[int, list[str]]:
    """Synset offset -> its lemmas, from a ``data.<pos>`` file (format: wndb(5WN))."""
    synsets: dict[int, list[str]] = {}
    with data_file.open(encoding="latin-1") as fh:
        for line in fh:
            if line.startswith("  "):  # the licence header
                continue
            fields = line.split(" ")
            count = int(fields[3], 16)
            synsets[int(fields[0])] = [fields[4 + 2 * i] for i in range(count)]
    return synsets


def _clean_lemma(lemma: str) -> str | None:
    """An adjective's ``(a)``-style marker dropped; multi-word lemmas (with "_") skipped."""
    lemma = re.sub(r"\(\w+\)$", "", lemma)
    return lemma.lower() if lemma.isalpha() else None


@lru_cache(maxsize=4)
def load_synonyms(folder: Path | None = None, senses: int = 2, max_per_word: int = 8) -> Synonyms:
    """Word -> its synonyms (sorted, at most ``max_per_word``, nearest senses first) for every WordNet lemma."""
    folder = folder or wordnet_dir()
    found: dict[str, list[str]] = {}
    for pos in PARTS_OF_SPEECH:
        synsets = _synset_words(folder / f"data.{pos}")
        with (folder / f"index.{pos}").open(encoding="latin-1") as fh:
            for line in fh:
                if line.startswith("  "):
                    continue
                fields = line.split()
                word = fields[0]
                if not word.isalpha():
                    continue
                pointers = int(fields[3])
                offsets = fields[6 + pointers:]  # synset_cnt, p_cnt, pointers, sense_cnt, tagsense_cnt, offsets
                kept = found.setdefault(word, [])
                for offset in offsets[:senses]:
                    for lemma in synsets[int(offset)]:
                        clean = _clean_lemma(lemma)
                        if clean and clean != word and clean not in kept:
                            kept.append(clean)
    return {word: tuple(words[:max_per_word]) for word, words in found.items() if words and word not in STOP_WORDS}


def _shape_like(original: str, replacement: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[0].isupper():
        return replacement[0].upper() + replacement[1:]
    return replacement


def perturb(text: str, synonyms: Synonyms, rng: random.Random) -> str:
    """Replace every replaceable word with a uniform draw from itself and its synonyms (the method's rule),
    keeping placeholders, punctuation, capitalisation and the spacing between words."""
    protected = [(m.start(), m.end()) for m in _FORMAT_SPEC.finditer(text)]
    pieces = re.split(r"(\s+)", text)
    position = 0
    out = []
    for piece in pieces:
        start, position = position, position + len(piece)
        match = _WORD.match(piece)
        inside = any(a < position and start < b for a, b in protected)
        if match and not inside:
            lead, word, trail = match.groups()
            choices = synonyms.get(word.lower())
            if choices and word.lower() not in STOP_WORDS:
                piece = lead + _shape_like(word, rng.choice((word.lower(), *choices))) + trail
        out.append(piece)
    return "".join(out)
