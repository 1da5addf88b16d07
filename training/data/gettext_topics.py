"""A small, real, labelled English text-classification dataset built offline from gettext catalogs.

Why: training and evaluation need genuine (not synthetic) labelled English text without network access.
Debian packages ship compiled gettext catalogs at ``/usr/share/locale/<lang>/LC_MESSAGES/<domain>.mo``;
the *msgids* in those catalogs are the English UI messages of one program, identical across languages.
The program (gettext domain) is a natural label, and merging related domains gives a handful of topics
(databases, version control, security, ...).

The ``.mo`` format is parsed directly with :mod:`struct` instead of :class:`gettext.GNUTranslations`,
because the latter decodes every catalog's metadata as declared and fails on catalogs with broken or
non-UTF-8 charsets (e.g. ``net-tools``). :func:`read_mo_pairs` also returns the translations, for
:mod:`training.data.gettext_parallel`.
"""

from __future__ import annotations

import codecs
import fnmatch
import json
import math
import random
import re
import struct
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "TOPICS",
    "TOPIC_PACKAGES",
    "load_gettext_topics",
    "read_mo_msgids",
    "read_mo_pairs",
    "split",
    "write_jsonl",
]

# Topic -> gettext domain patterns (``fnmatch`` globs, case-sensitive). Chosen from what a Debian 12
# image with PostgreSQL, git, binutils, GTK2 etc. ships; each topic yields well over 1500 messages of
# >= 5 words there. Domains matching no topic (libc, systemd, iso_*, xkeyboard-config, ...) are ignored.
TOPICS: dict[str, tuple[str, ...]] = {
    "database": (
        "postgres-*",
        "psql-*",
        "pg_*",
        "pgscripts-*",
        "libpq5-*",
        "initdb-*",
        "plpgsql-*",
        "ecpg*",
    ),
    "version_control": ("git",),
    "security": ("gnupg2", "mit-krb5", "gnutls30", "Linux-PAM", "shadow", "polkit-1"),
    "packaging": (
        "dpkg",
        "dpkg-dev",
        "apt",
        "libapt-pkg*",
        "python-apt",
        "PackageKit",
        "software-properties",
        "appstream",
    ),
    "gui": ("gtk20*", "glib20", "gdk-pixbuf", "gsettings-desktop-schemas", "at-spi2-core"),
    "shell_tools": (
        "coreutils",
        "findutils",
        "diffutils",
        "tar",
        "bash",
        "procps-ng",
        "grep",
        "sed",
        "psmisc",
        "wget",
        "xz",
        "man-db",
    ),
    "toolchain": (
        "binutils",
        "bfd",
        "gas",
        "ld",
        "gold",
        "opcodes",
        "gprof",
        "elfutils",
        "make",
        "gettext-tools",
    ),
}

# Debian packages that ship the catalogs of each topic (used in the error message when data is missing).
TOPIC_PACKAGES: dict[str, tuple[str, ...]] = {
    "database": ("postgresql-15", "postgresql-client-15", "libpq5"),
    "version_control": ("git",),
    "security": ("gnupg-l10n", "krb5-locales", "libgnutls30", "libpam-runtime", "login"),
    "packaging": ("dpkg", "libdpkg-perl", "apt", "python-apt-common", "appstream"),
    "gui": ("libgtk2.0-common", "libglib2.0-data", "libgdk-pixbuf2.0-common", "gsettings-desktop-schemas"),
    "shell_tools": ("coreutils", "findutils", "diffutils", "tar", "bash", "procps", "grep", "sed", "wget"),
    "toolchain": ("binutils-common", "make", "gettext", "libelf1"),
}

_MO_MAGIC_LE = 0x950412DE
_MO_MAGIC_BE = 0xDE120495

# printf-style (%s, %1$-10.3lld, %%), Python (%(name)s, {0}, {name!r}), shell ($VAR, ${VAR}), Qt (%1).
_FORMAT_SPEC = re.compile(
    r"%(?:\([A-Za-z_]\w*\))?(?:\d+\$)?[-+ #0']*(?:\*|\d+)?(?:\.(?:\*|\d+))?"
    r"(?:hh|h|ll|l|L|q|j|z|Z|t|I64|I32)?[diouxXeEfFgGaAcCsSpn%]"
    r"|%<\w+>|%\d+|\{[\w.!:]*\}|\$\{?\w+\}?"
)
_WORD_WITH_LETTERS = re.compile(r"[A-Za-z]{2,}")
_CHARSET = re.compile(rb"charset=([A-Za-z0-9_.:-]+)", re.IGNORECASE)
# Typographic punctuation -> ASCII: only some programs (glib, gtk) use curly quotes, which would otherwise
# be a trivial non-lexical cue for the label.
_ASCII_PUNCT = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'}
    | {"\u2013": "-", "\u2014": "-", "\u2026": "...", "\u00a0": " "}
)


def _decode(raw: bytes, charset: str) -> str:
    """Decode with the catalog's declared charset, falling back to UTF-8 then Latin-1 (never fails)."""
    for enc in (charset, "utf-8"):
        try:
            return raw.decode(enc)
        except (LookupError, UnicodeDecodeError):
            continue
    return raw.decode("latin-1")


def _parse_mo(path: Path) -> tuple[list[tuple[bytes, bytes]], str]:
    """Return the raw ``(msgid, msgstr)`` byte strings of a ``.mo`` file and its declared charset.

    Parsed with ``struct`` so catalogs with odd charsets still load; the header entry (empty msgid) is
    kept so callers see the file as written. Raises ``ValueError`` for files that are not ``.mo`` catalogs.
    """
    data = Path(path).read_bytes()
    if len(data) < 20:
        raise ValueError(f"{path}: too short to be a .mo file")
    (magic,) = struct.unpack("<I", data[:4])
    if magic == _MO_MAGIC_LE:
        endian = "<"
    elif magic == _MO_MAGIC_BE:
        endian = ">"
    else:
        raise ValueError(f"{path}: bad .mo magic 0x{magic:08x}")
    _revision, count, orig_off, trans_off = struct.unpack(endian + "4I", data[4:20])

    def table(offset: int) -> list[bytes]:
        end = offset + 8 * count
        if end > len(data):
            raise ValueError(f"{path}: string table out of range")
        pairs = list(struct.iter_unpack(endian + "2I", data[offset:end]))
        if any(off + length > len(data) for length, off in pairs):
            raise ValueError(f"{path}: string out of range")
        return [data[off : off + length] for length, off in pairs]

    entries = list(zip(table(orig_off), table(trans_off)))
    charset = "utf-8"
    for raw_id, raw_str in entries:
        if raw_id == b"":  # header entry: its msgstr declares the charset
            m = _CHARSET.search(raw_str)
            if m:
                charset = m.group(1).decode("ascii")
            break
    return entries, charset


def _first_form(raw: bytes) -> bytes:
    """Drop a ``msgctxt`` prefix (``ctx\\x04``) and keep the first of ``\\0``-separated plural forms."""
    if b"\x04" in raw:
        raw = raw.split(b"\x04", 1)[1]
    return raw.split(b"\x00", 1)[0]


def read_mo_msgids(path: Path) -> list[str]:
    """Return the msgids of a compiled gettext catalog, in file order.

    Parsed with ``struct`` so catalogs with odd charsets still load. The empty header msgid is skipped,
    a ``msgctxt`` prefix (``ctx\\x04msgid``) is removed and plural entries yield their singular form.
    Raises ``ValueError`` for files that are not ``.mo`` catalogs.
    """
    entries, charset = _parse_mo(path)
    return [_decode(raw, charset) for raw in (_first_form(raw_id) for raw_id, _ in entries) if raw]


def read_mo_pairs(path: Path) -> list[tuple[str, str]]:
    """Return ``(msgid, msgstr)`` for every non-header entry of a compiled catalog, in file order.

    Both sides lose a ``msgctxt`` prefix and keep their first plural form. The msgid is decoded as in
    :func:`read_mo_msgids`; the msgstr strictly with the declared charset (UTF-8 when the declared name is
    unknown to Python), and entries whose msgstr cannot be decoded are skipped rather than guessed, since
    a mis-decoded translation is worse than none. Untranslated (empty) msgstrs are returned as ``""``.
    Raises ``ValueError`` for files that are not ``.mo`` catalogs.
    """
    entries, charset = _parse_mo(path)
    try:
        codec = codecs.lookup(charset).name
    except LookupError:
        codec = "utf-8"
    pairs: list[tuple[str, str]] = []
    for raw_id, raw_str in entries:
        msgid = _first_form(raw_id)
        if not msgid:
            continue
        try:
            msgstr = _first_form(raw_str).decode(codec)
        except UnicodeDecodeError:
            continue
        pairs.append((_decode(msgid, charset), msgstr))
    return pairs


def _topic_of(domain: str) -> str | None:
    """The topic whose patterns match ``domain``, or None (first match in TOPICS order wins)."""
    for topic, patterns in TOPICS.items():
        if any(fnmatch.fnmatchcase(domain, p) for p in patterns):
            return topic
    return None


def _clean(text: str, min_words: int) -> str | None:
    """Normalise whitespace and reject strings that are too short, non-English or mostly markup."""
    text = " ".join(text.translate(_ASCII_PUNCT).split())
    words = text.split(" ")
    if len(words) < min_words:
        return None
    if len(text) - len(text.encode("ascii", "ignore")) > 0.1 * len(text):
        return None
    stripped = _FORMAT_SPEC.sub(" ", text)
    non_space = len(stripped) - stripped.count(" ")
    letters = sum(map(str.isalpha, stripped))
    if non_space == 0 or letters < 0.6 * non_space:
        return None
    real_words = [w for w in stripped.split() if _WORD_WITH_LETTERS.search(w)]
    if len(real_words) < max(3, math.ceil(0.6 * min_words)) or len(real_words) < 0.5 * len(words):
        return None
    return text


def _collect_domain_msgids(locale_root: Path) -> dict[str, set[str]]:
    """Union raw msgids per topic-relevant domain over every language directory."""
    per_domain: dict[str, set[str]] = defaultdict(set)
    for mo in sorted(locale_root.glob("*/LC_MESSAGES/*.mo")):
        if _topic_of(mo.stem) is None:
            continue
        try:
            per_domain[mo.stem].update(read_mo_msgids(mo))
        except (OSError, ValueError, struct.error):
            continue  # unreadable or corrupt catalog: skip it rather than fail the whole dataset
    return per_domain


def load_gettext_topics(
    locale_root: Path = Path("/usr/share/locale"),
    min_words: int = 5,
    max_per_topic: int | None = 1500,
    seed: int = 0,
) -> list[dict]:
    """Build ``[{"text", "label"}]`` records from the gettext catalogs under ``locale_root``.

    Messages are unioned per domain across languages, cleaned, labelled by topic; strings occurring in
    domains of two or more topics are dropped as ambiguous. Each topic is subsampled (seeded) to
    ``max_per_topic`` and the result is shuffled with ``seed``, so equal arguments give equal output.
    Raises ``FileNotFoundError`` when fewer than two topics have any data.
    """
    locale_root = Path(locale_root)
    texts_by_topic: dict[str, set[str]] = defaultdict(set)
    if locale_root.is_dir():
        for domain, msgids in _collect_domain_msgids(locale_root).items():
            topic = _topic_of(domain)
            assert topic is not None
            for raw in msgids:
                text = _clean(raw, min_words)
                if text is not None:
                    texts_by_topic[topic].add(text)

    topics_of_text: dict[str, set[str]] = defaultdict(set)
    for topic, texts in texts_by_topic.items():
        for text in texts:
            topics_of_text[text].add(topic)

    records: list[dict] = []
    for topic in sorted(texts_by_topic):
        texts = sorted(t for t in texts_by_topic[topic] if len(topics_of_text[t]) == 1)
        if max_per_topic is not None and len(texts) > max_per_topic:
            texts = sorted(random.Random(f"{seed}:{topic}").sample(texts, max_per_topic))
        records.extend({"text": t, "label": topic} for t in texts)

    found = {r["label"] for r in records}
    if len(found) < 2:
        packages = sorted({p for pkgs in TOPIC_PACKAGES.values() for p in pkgs})
        raise FileNotFoundError(
            f"gettext catalogs under {locale_root} give data for {len(found)} topic(s) "
            f"({', '.join(sorted(found)) or 'none'}); at least 2 are needed. Install the catalogs with "
            f"`apt-get install {' '.join(packages)}` (and make sure /etc/dpkg/dpkg.cfg.d/ does not "
            f"path-exclude /usr/share/locale, as slim Docker images do)."
        )
    random.Random(seed).shuffle(records)
    return records


def split(
    records: Sequence[dict],
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[dict], list[dict], list[dict]]:
    """Deterministic stratified train/dev/test split: each label keeps its proportion in every part.

    Per label, ``round(n * fraction)`` records go to dev and test (at least one each when the fraction
    is positive and the label has >= 3 records); the rest go to train. Each part is shuffled with ``seed``.
    """
    if dev_fraction < 0 or test_fraction < 0 or dev_fraction + test_fraction >= 1:
        raise ValueError("need 0 <= dev_fraction, test_fraction and dev_fraction + test_fraction < 1")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_label[r["label"]].append(i)

    train: list[dict] = []
    dev: list[dict] = []
    test: list[dict] = []
    for label in sorted(by_label):
        idx = by_label[label]
        random.Random(f"{seed}:{label}").shuffle(idx)
        n = len(idx)
        n_test = round(n * test_fraction)
        n_dev = round(n * dev_fraction)
        if n >= 3:
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_dev = max(n_dev, 1 if dev_fraction > 0 else 0)
        test.extend(records[i] for i in idx[:n_test])
        dev.extend(records[i] for i in idx[n_test : n_test + n_dev])
        train.extend(records[i] for i in idx[n_test + n_dev :])
    for k, part in enumerate((train, dev, test)):
        random.Random(f"{seed}:part{k}").shuffle(part)
    return train, dev, test


def write_jsonl(records: Iterable[dict], path: Path) -> None:
    """Write one JSON object per line (UTF-8), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
