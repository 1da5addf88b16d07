"""Real parallel text (an English UI message and its human translation) from Debian's gettext catalogs.

Why: cross-lingual distillation and retrieval evaluation need genuine translations, offline. Every
``<root>/<locale>/LC_MESSAGES/<domain>.mo`` pairs a program's English msgids with one language's
msgstrs, written by that program's translation team. Messages are normalised the same way on both
sides (placeholders -> ``{}``, mnemonics removed, whitespace collapsed, see :func:`normalise_pair`).

Splits are by *program family* (:func:`program_family`): all messages of related gettext domains go to
one split, so that near-identical messages of one code base never straddle train and test; an English
message that occurs in several families is kept only in the earliest split (train, dev, test) it falls in.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import struct
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from training.data.gettext_topics import _FORMAT_SPEC, read_mo_pairs, write_jsonl

__all__ = [
    "DEFAULT_LANGUAGES",
    "DEFAULT_LOCALE_ROOTS",
    "SPLITS",
    "ParallelPair",
    "english_key",
    "load_pairs",
    "locale_language",
    "multiway",
    "normalise_pair",
    "program_family",
    "split_by_program",
    "write_splits",
]

DEFAULT_LANGUAGES: tuple[str, ...] = ("de", "fr", "es", "it", "nl", "tr", "ru", "zh_CN", "ja")
# /usr/share/locale plus vim's own catalogs (vim ships them under its runtime directory).
DEFAULT_LOCALE_ROOTS: tuple[Path, ...] = (Path("/usr/share/locale"), *sorted(Path("/usr/share/vim").glob("vim*/lang")))
SPLITS: tuple[str, ...] = ("train", "dev", "test")
PLACEHOLDER = "{}"

# Locale directory names that mean the same language as another one.
_LOCALE_ALIASES: dict[str, str] = {
    "zh_Hans": "zh_CN",
    "zh_Hant": "zh_TW",
    "sr@Latn": "sr@latin",
    "nb_NO": "nb",
    "no": "nb",
    "pt_PT": "pt",
    "kw_GB": "kw",
}
# Pseudo-locales that are English rewritten (quotes, Shavian script), not translations.
_NOT_TRANSLATIONS = {"en@quot", "en@boldquot", "en@shaw"}

# gettext domains of one code base or package, which share (near-)identical messages; anything else is
# its own family after dropping a version suffix ("-15") and a "-gnulib" helper-domain suffix.
_FAMILIES: dict[str, tuple[str, ...]] = {
    "postgresql": ("postgres-*", "psql-*", "pg_*", "pgscripts-*", "libpq5-*", "initdb-*", "plpgsql-*", "ecpg*"),
    "iso-codes": ("iso_*",),
    "apt": ("apt", "libapt-*", "python-apt"),
    "dpkg": ("dpkg", "dpkg-*"),
    "binutils": ("binutils", "bfd", "gas", "ld", "gold", "opcodes", "gprof"),
    "gettext": ("gettext-*",),
    "gtk": ("gtk20*", "glib20", "gdk-pixbuf", "gsettings-desktop-schemas", "at-spi2-core"),
}

# A GTK/Qt mnemonic: "_" or "&" before a letter or digit, optionally in the CJK form "(_F)" / "(&F)".
_MNEMONIC_GROUP = re.compile(r"\s*\([_&]\w\)")
_MNEMONIC = re.compile(r"[_&](?=\w)")
_MNEMONIC_EN = re.compile(r"(?<!\w)[_&](?=[^\W_])")
_KEY_WORDS = re.compile(r"[^\W_]+")
# The topic dataset's placeholder pattern plus glibc's "%m" (strerror(errno)), common in C programs' messages.
_PLACEHOLDERS = re.compile(_FORMAT_SPEC.pattern + r"|%m")


@dataclass(frozen=True, order=True)
class ParallelPair:
    """One English message and its translation into ``lang``, from the gettext domain ``program``."""

    en: str
    x: str
    lang: str
    program: str


def locale_language(dirname: str) -> str | None:
    """Language code of a locale directory name, or None for English pseudo-locales.

    Drops a charset suffix (vim's ``ja.euc-jp``, ``zh_CN.UTF-8``), maps aliases (``zh_Hans`` -> ``zh_CN``,
    ``nb_NO`` -> ``nb``) and keeps regions and scripts otherwise (``zh_TW``, ``pt_BR``, ``sr@latin``).
    """
    base, _, modifier = dirname.partition("@")
    name = base.split(".", 1)[0] + (f"@{modifier}" if modifier else "")
    if name in _NOT_TRANSLATIONS:
        return None
    return _LOCALE_ALIASES.get(name, name)


def program_family(domain: str) -> str:
    """The code base a gettext domain belongs to: the unit that :func:`split_by_program` keeps together."""
    for family, patterns in _FAMILIES.items():
        if any(fnmatch.fnmatchcase(domain, p) for p in patterns):
            return family
    return re.sub(r"-\d+(\.\d+)*$", "", domain.removesuffix("-gnulib"))


def _has_mnemonic(en: str) -> bool:
    """True when the English message carries exactly one mnemonic marker (and no other "_" or "&").

    Requiring a single marker at a word start keeps identifiers (``LC_ALL``, ``_NET_WM_NAME``) and
    literal ampersands ("R&D", "this & that") intact.
    """
    return en.count("_") + en.count("&") == 1 and _MNEMONIC_EN.search(en) is not None


def _strip_mnemonic(text: str) -> str:
    """Remove one mnemonic: a CJK-style "(_F)" group if present, else the first "_"/"&" before a letter."""
    stripped, n = _MNEMONIC_GROUP.subn("", text, count=1)
    return stripped if n else _MNEMONIC.sub("", text, count=1)


def _normalise(text: str) -> str:
    """NFC, placeholders -> ``{}`` ("%%" is a literal percent sign), whitespace and newlines collapsed."""
    text = unicodedata.normalize("NFC", text).replace("%%", "\0")
    text = _PLACEHOLDERS.sub(PLACEHOLDER, text).replace("\0", "%")
    return " ".join(text.split())


def normalise_pair(en: str, x: str) -> tuple[str, str] | None:
    """Normalise a (msgid, msgstr) pair identically on both sides, or None when it is not a translation.

    Mnemonics are removed from both sides only when the English has one (so a translation's underscores
    in identifiers survive). None when either side is empty afterwards or the translation equals the English.
    """
    if _has_mnemonic(en):
        en, x = _strip_mnemonic(en), _strip_mnemonic(x)
    en, x = _normalise(en), _normalise(x)
    if not en or not x or en == x:
        return None
    return en, x


def _word_count(text: str) -> int:
    """Words with at least one letter: placeholders and numbers do not make a message longer."""
    return sum(any(c.isalpha() for c in w) for w in text.split())


def english_key(en: str) -> str:
    """Case-, punctuation- and placeholder-blind form of an English message, to catch trivial variants."""
    return " ".join(_KEY_WORDS.findall(en.lower()))


def _catalogs(roots: Sequence[Path], languages: set[str]) -> list[tuple[str, Path]]:
    """``(lang, .mo path)`` for every catalog of a wanted language under the roots, in a fixed order."""
    found: list[tuple[str, Path]] = []
    for root in roots:
        for mo in sorted(Path(root).glob("*/LC_MESSAGES/*.mo")):
            lang = locale_language(mo.parent.parent.name)
            if lang in languages:
                found.append((lang, mo))
    return found


def load_pairs(
    languages: Iterable[str] = DEFAULT_LANGUAGES,
    min_words: int = 5,
    locale_root: Path | Sequence[Path] = DEFAULT_LOCALE_ROOTS,
) -> list[ParallelPair]:
    """Normalised translation pairs from every catalog of ``languages`` under ``locale_root``, sorted.

    Keeps English messages of at least ``min_words`` words (after normalisation). Deduplicated per
    ``(en, lang)``: of several translations, the one from the alphabetically first program wins (then the
    first translation in sorted order), so equal inputs give equal output. Unreadable catalogs are skipped.
    """
    roots = [locale_root] if isinstance(locale_root, (str, Path)) else list(locale_root)
    best: dict[tuple[str, str], ParallelPair] = {}
    for lang, mo in _catalogs(roots, set(languages)):
        try:
            raw_pairs = read_mo_pairs(mo)
        except (OSError, ValueError, struct.error):
            continue
        for raw_en, raw_x in raw_pairs:
            pair = normalise_pair(raw_en, raw_x) if raw_x else None
            if pair is None or _word_count(pair[0]) < min_words:
                continue
            candidate = ParallelPair(en=pair[0], x=pair[1], lang=lang, program=mo.stem)
            key = (candidate.en, lang)
            if key not in best or (candidate.program, candidate.x) < (best[key].program, best[key].x):
                best[key] = candidate
    return sorted(best.values())


def _hash(seed: int, name: str) -> str:
    """A stable, seed-dependent order for families (Python's ``hash`` is salted per process)."""
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def _assign_families(sizes: dict[str, int], fractions: Sequence[float], seed: int) -> dict[str, int]:
    """Assign each family to a split index: families in hashed order go where the pair deficit is largest.

    Deterministic for a seed, and close to the target fractions by pair count when no family dominates.
    """
    total = sum(sizes.values())
    targets = [f * total for f in fractions]
    filled = [0] * len(fractions)
    assignment: dict[str, int] = {}
    for family in sorted(sizes, key=lambda f: _hash(seed, f)):
        k = max(range(len(fractions)), key=lambda i: (targets[i] - filled[i], -i))
        assignment[family] = k
        filled[k] += sizes[family]
    return assignment


def split_by_program(
    pairs: Sequence[ParallelPair],
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> dict[str, list[ParallelPair]]:
    """Split into ``{"train", "dev", "test"}`` so that no program family and no English message crosses.

    Families are assigned by a seeded hash with target fractions by pair count. An English message (compared
    by :func:`english_key`, so case and punctuation variants count as one) lands in the earliest split
    (train, dev, test) of any family it occurs in; its pairs in later splits are dropped.
    """
    if dev_fraction < 0 or test_fraction < 0 or dev_fraction + test_fraction >= 1:
        raise ValueError("need 0 <= dev_fraction, test_fraction and dev_fraction + test_fraction < 1")
    sizes = Counter(program_family(p.program) for p in pairs)
    fractions = (1 - dev_fraction - test_fraction, dev_fraction, test_fraction)
    split_of_family = _assign_families(dict(sizes), fractions, seed)
    keys = [english_key(p.en) for p in pairs]
    splits = [split_of_family[program_family(p.program)] for p in pairs]
    first_split: dict[str, int] = {}
    for key, k in zip(keys, splits):
        first_split[key] = min(k, first_split.get(key, k))
    parts: dict[str, list[ParallelPair]] = {name: [] for name in SPLITS}
    for p, key, k in zip(pairs, keys, splits):
        if first_split[key] == k:
            parts[SPLITS[k]].append(p)
    return parts


def multiway(pairs: Iterable[ParallelPair], languages: Sequence[str]) -> list[dict]:
    """``{"en", "program", "translations": {lang: x}}`` for English messages translated into every language.

    Why: a retrieval test where each query has one answer in every language needs the same messages in
    all of them. Give it one split's pairs (normally test's) so nothing leaks.
    """
    by_en: dict[str, dict[str, ParallelPair]] = defaultdict(dict)
    for p in pairs:
        if p.lang in languages:
            by_en[p.en][p.lang] = p
    rows = []
    for en in sorted(by_en):
        found = by_en[en]
        if all(lang in found for lang in languages):
            program = min(found[lang].program for lang in languages)
            rows.append({"en": en, "program": program, "translations": {lang: found[lang].x for lang in languages}})
    return rows


def write_splits(parts: dict[str, list[ParallelPair]], out: Path, languages: Sequence[str]) -> dict[str, Path]:
    """Write ``<split>.jsonl`` (one pair a line) and ``test_multiway.jsonl``; return the files written."""
    out = Path(out)
    files: dict[str, Path] = {}
    for name, part in parts.items():
        files[name] = out / f"{name}.jsonl"
        write_jsonl((asdict(p) for p in part), files[name])
    files["test_multiway"] = out / "test_multiway.jsonl"
    write_jsonl(multiway(parts["test"], languages), files["test_multiway"])
    return files
