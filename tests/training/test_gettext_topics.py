"""Tests for the gettext topic dataset: real catalogs from /usr/share/locale plus synthetic .mo files."""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import pytest

from training.data.gettext_topics import (
    TOPICS,
    load_gettext_topics,
    read_mo_msgids,
    split,
    write_jsonl,
)

LOCALE_ROOT = Path("/usr/share/locale")


def _write_mo(path: Path, entries: dict[str, str], charset: str = "UTF-8", big_endian: bool = False) -> None:
    """Write a minimal GNU .mo catalog (same layout as CPython's Tools/i18n/msgfmt.py)."""
    entries = {"": f"Content-Type: text/plain; charset={charset}\n", **entries}
    keys = sorted(entries)
    ids = b""
    strs = b""
    offsets = []
    for k in keys:
        kb, vb = k.encode(charset), entries[k].encode(charset)
        offsets.append((len(ids), len(kb), len(strs), len(vb)))
        ids += kb + b"\0"
        strs += vb + b"\0"
    e = ">" if big_endian else "<"
    n = len(keys)
    keystart = 7 * 4 + 16 * n
    valuestart = keystart + len(ids)
    koffsets: list[int] = []
    voffsets: list[int] = []
    for o1, l1, o2, l2 in offsets:
        koffsets += [l1, o1 + keystart]
        voffsets += [l2, o2 + valuestart]
    header = struct.pack(e + "7I", 0x950412DE, 0, n, 7 * 4, 7 * 4 + n * 8, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + struct.pack(e + f"{4 * n}I", *koffsets, *voffsets) + ids + strs)


@pytest.fixture(scope="module")
def records() -> list[dict]:
    try:
        return load_gettext_topics(LOCALE_ROOT)
    except FileNotFoundError as exc:  # image without the Debian catalogs
        pytest.skip(str(exc))


@pytest.mark.parametrize("big_endian", [False, True])
def test_read_tiny_mo_roundtrip(tmp_path: Path, big_endian: bool) -> None:
    mo = tmp_path / "tiny.mo"
    _write_mo(
        mo,
        {
            "Hello world": "Hallo Welt",
            "one file was removed\0%d files were removed": "eine Datei\0%d Dateien",
            "menu\x04Open the selected document": "Dokument öffnen",
        },
        big_endian=big_endian,
    )
    assert sorted(read_mo_msgids(mo)) == [
        "Hello world",
        "Open the selected document",
        "one file was removed",
    ]


def test_read_mo_non_utf8_charset(tmp_path: Path) -> None:
    mo = tmp_path / "latin1.mo"
    entries = {"Caf\xe9 menu is not available": "Caf\xe9-Men\xfc nicht verf\xfcgbar"}
    _write_mo(mo, entries, charset="ISO-8859-1")
    assert read_mo_msgids(mo) == ["Caf\xe9 menu is not available"]


def test_read_mo_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mo"
    bad.write_bytes(b"not a catalog at all, definitely")
    with pytest.raises(ValueError):
        read_mo_msgids(bad)


def test_read_real_mo_is_english() -> None:
    candidates = sorted(LOCALE_ROOT.glob("de/LC_MESSAGES/*.mo"))
    candidates = candidates or sorted(LOCALE_ROOT.glob("*/LC_MESSAGES/*.mo"))
    if not candidates:
        pytest.skip("no gettext catalogs installed")
    mo = max(candidates, key=lambda p: p.stat().st_size)
    msgids = read_mo_msgids(mo)
    assert len(msgids) > 50
    assert "" not in msgids
    common = {"the", "is", "not", "to", "of", "a", "file", "for", "in", "cannot", "invalid"}
    words = Counter(w.lower() for m in msgids for w in m.split())
    assert sum(words[w] for w in common) > 50, mo


def test_load_real_catalogs(records: list[dict]) -> None:
    counts = Counter(r["label"] for r in records)
    assert set(counts) <= set(TOPICS)
    assert len(counts) >= 4
    assert all(n >= 200 for n in counts.values()), counts
    assert all(n <= 1500 for n in counts.values()), counts
    labels_of: dict[str, set[str]] = {}
    for r in records:
        assert set(r) == {"text", "label"}
        assert len(r["text"].split()) >= 5
        assert r["text"] == " ".join(r["text"].split())
        labels_of.setdefault(r["text"], set()).add(r["label"])
    assert all(len(v) == 1 for v in labels_of.values())
    assert len(labels_of) == len(records)  # no duplicates either


def test_load_is_deterministic(records: list[dict]) -> None:
    assert load_gettext_topics(LOCALE_ROOT) == records


def test_split_real(records: list[dict], tmp_path: Path) -> None:
    train, dev, test = split(records, dev_fraction=0.1, test_fraction=0.1, seed=0)
    assert split(records, dev_fraction=0.1, test_fraction=0.1, seed=0) == (train, dev, test)
    keys = [{(r["text"], r["label"]) for r in part} for part in (train, dev, test)]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    assert len(train) + len(dev) + len(test) == len(records)
    assert keys[0] | keys[1] | keys[2] == {(r["text"], r["label"]) for r in records}
    total = Counter(r["label"] for r in records)
    for part, frac in ((dev, 0.1), (test, 0.1), (train, 0.8)):
        got = Counter(r["label"] for r in part)
        for label, n in total.items():
            assert abs(got[label] - frac * n) <= 1, (label, got[label], n)

    out = tmp_path / "sub" / "dev.jsonl"
    write_jsonl(dev, out)
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == dev


def _fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "locale"
    shared = "cannot open the requested file for reading"
    for lang in ("de", "fr"):
        _write_mo(
            root / lang / "LC_MESSAGES" / "git.mo",
            {
                "the branch has no upstream configured yet": "x",
                f"commit message {lang} is empty, aborting now": "x",
                shared: "x",
                "%s %s %s: %d %d": "x",  # mostly format specifiers
                "too short": "x",
            },
        )
    psql = {"connection to database server was lost": "x", shared: "x"}
    _write_mo(root / "de" / "LC_MESSAGES" / "psql-15.mo", psql)
    _write_mo(root / "de" / "LC_MESSAGES" / "unrelated.mo", {"this domain belongs to no topic at all": "x"})
    return root


def test_load_synthetic_root(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    recs = load_gettext_topics(root, min_words=5, max_per_topic=None, seed=3)
    assert sorted((r["label"], r["text"]) for r in recs) == [
        ("database", "connection to database server was lost"),
        ("version_control", "commit message de is empty, aborting now"),
        ("version_control", "commit message fr is empty, aborting now"),
        ("version_control", "the branch has no upstream configured yet"),
    ]
    capped = load_gettext_topics(root, min_words=5, max_per_topic=1, seed=3)
    assert Counter(r["label"] for r in capped) == {"database": 1, "version_control": 1}


def test_load_missing_catalogs_names_packages(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install"):
        load_gettext_topics(tmp_path / "does-not-exist")
    root = tmp_path / "one"
    _write_mo(root / "de" / "LC_MESSAGES" / "git.mo", {"the branch has no upstream configured yet": "x"})
    with pytest.raises(FileNotFoundError, match="git"):
        load_gettext_topics(root)


def test_split_small_and_invalid() -> None:
    recs = [{"text": f"t{i}", "label": "a" if i < 10 else "b"} for i in range(13)]
    train, dev, test = split(recs, seed=1)
    assert Counter(r["label"] for r in dev) == {"a": 1, "b": 1}
    assert Counter(r["label"] for r in test) == {"a": 1, "b": 1}
    assert len(train) == 9
    with pytest.raises(ValueError):
        split(recs, dev_fraction=0.5, test_fraction=0.5)
