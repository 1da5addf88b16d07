"""Tests for the gettext parallel-text builder: synthetic .mo catalogs plus one check on /usr/share/locale."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.training.test_gettext_topics import _write_mo
from training.data.gettext_parallel import (
    ParallelPair,
    english_key,
    load_pairs,
    locale_language,
    multiway,
    normalise_pair,
    program_family,
    split_by_program,
    write_splits,
)
from training.data.gettext_topics import read_mo_msgids, read_mo_pairs

LOCALE_ROOT = Path("/usr/share/locale")


def test_read_mo_pairs_plural_context_and_charset(tmp_path: Path) -> None:
    mo = tmp_path / "de.mo"
    _write_mo(
        mo,
        {
            "Hello world": "Hallo Welt",
            "one file was removed\0%d files were removed": "eine Datei wurde entfernt\0%d Dateien",
            "menu\x04Open the selected document": "menu\x04Dokument öffnen",
            "not translated yet": "",
        },
    )
    assert sorted(read_mo_pairs(mo)) == [
        ("Hello world", "Hallo Welt"),
        ("Open the selected document", "Dokument öffnen"),
        ("not translated yet", ""),
        ("one file was removed", "eine Datei wurde entfernt"),
    ]
    latin1 = tmp_path / "latin1.mo"
    _write_mo(latin1, {"Cafe menu is not available": "Caf\xe9-Men\xfc nicht verf\xfcgbar"}, charset="ISO-8859-1")
    assert read_mo_pairs(latin1) == [("Cafe menu is not available", "Caf\xe9-Men\xfc nicht verf\xfcgbar")]
    assert read_mo_msgids(latin1) == ["Cafe menu is not available"]  # the old API is unchanged


def test_read_mo_pairs_skips_undecodable(tmp_path: Path) -> None:
    mo = tmp_path / "broken.mo"
    # Declared UTF-8, but one msgstr is Latin-1 bytes: that entry is skipped, the other kept.
    _write_mo(mo, {"Good entry here": "Guter Eintrag", "Bad entry here": "Xbel"})
    mo.write_bytes(mo.read_bytes().replace(b"Xbel", b"\xfcbel"))  # same length, a lone Latin-1 byte
    assert read_mo_pairs(mo) == [("Good entry here", "Guter Eintrag")]


def test_locale_language() -> None:
    assert locale_language("de") == "de"
    assert locale_language("zh_CN.UTF-8") == "zh_CN"
    assert locale_language("ja.euc-jp") == "ja"
    assert locale_language("zh_Hant") == "zh_TW"
    assert locale_language("zh_TW") == "zh_TW"
    assert locale_language("pt_BR") == "pt_BR"
    assert locale_language("sr@Latn") == "sr@latin"
    assert locale_language("sr@latin") == "sr@latin"
    assert locale_language("nb_NO") == "nb"
    assert locale_language("en@quot") is None


def test_program_family() -> None:
    assert program_family("psql-15") == program_family("postgres-15") == "postgresql"
    assert program_family("gtk20-properties") == program_family("glib20") == "gtk"
    assert program_family("libapt-pkg6.0") == "apt"
    assert program_family("wget-gnulib") == "wget"
    assert program_family("gstreamer-1.0") == "gstreamer"
    assert program_family("git") == "git"


@pytest.mark.parametrize(
    ("en", "x", "want"),
    [
        ("cannot open %s: %m\n", "kann %s nicht öffnen: %m", ("cannot open {}: {}", "kann {} nicht öffnen: {}")),
        ("%1$s of %2$lu files", "%2$lu Dateien: %1$s", ("{} of {} files", "{} Dateien: {}")),
        ("Hello {0}, ${HOME} set", "Hallo {0}, ${HOME} gesetzt", ("Hello {}, {} set", "Hallo {}, {} gesetzt")),
        ("100%% done", "100%% fertig", ("100% done", "100% fertig")),
        ("_Open the file", "Datei ö_ffnen", ("Open the file", "Datei öffnen")),
        ("&Save as new", "Neu &speichern", ("Save as new", "Neu speichern")),
        ("_Open the file", "ファイルを開く(_O)", ("Open the file", "ファイルを開く")),
        ("LC_ALL is not set", "LC_ALL ist nicht gesetzt", ("LC_ALL is not set", "LC_ALL ist nicht gesetzt")),
        ("one\n  two\tthree", "eins\nzwei   drei", ("one two three", "eins zwei drei")),
        ("Same %s", "Same %d", None),  # identical after normalisation
        ("%s", "%s ", None),
        ("_OK", "_OK", None),
    ],
)
def test_normalise_pair(en: str, x: str, want: tuple[str, str] | None) -> None:
    assert normalise_pair(en, x) == want
    if want is not None and "%%" not in en:  # idempotent (but a literal "% d" would read as a placeholder)
        assert normalise_pair(*want) == want


def _fake_root(tmp_path: Path) -> Path:
    """Two languages, several programs, a Latin-1 catalog, plurals, placeholders, mnemonics, shared strings."""
    root = tmp_path / "locale"
    shared = "could not open the file for reading"
    progs = {f"prog{i}": {f"message number {i}-{j} of this program": f"Nachricht {i}-{j}" for j in range(5)}
             for i in range(12)}
    for i, (name, entries) in enumerate(progs.items()):
        _write_mo(root / "de" / "LC_MESSAGES" / f"{name}.mo", {**entries, shared: f"Datei nicht lesbar {i}"})
        fr = {k: v.replace("Nachricht", "Message") for k, v in entries.items()}
        _write_mo(root / "fr" / "LC_MESSAGES" / f"{name}.mo", {**fr, shared.upper(): "fichier illisible"})
    _write_mo(
        root / "de" / "LC_MESSAGES" / "old.mo",
        {
            "_Quit the application right now": "Anwendung sofort _beenden",
            "removed %d old file from disk\0removed %d old files": "%d alte Datei entfernt\0%d alte Dateien",
            "this one was never translated": "",
            "short": "kurz",
            "Identical text in both languages here": "Identical text in both languages here",
            "Caf\xe9 menu is not available today": "Caf\xe9-Men\xfc heute nicht verf\xfcgbar",
        },
        charset="ISO-8859-1",
    )
    _write_mo(root / "en@quot" / "LC_MESSAGES" / "prog0.mo", {"message number 0-0 of this program": "“x”"})
    (root / "de" / "LC_MESSAGES" / "garbage.mo").write_bytes(b"not a catalog at all, definitely")
    return root


def test_load_pairs_synthetic(tmp_path: Path) -> None:
    root = _fake_root(tmp_path)
    pairs = load_pairs(["de", "fr"], min_words=5, locale_root=root)
    assert pairs == sorted(pairs) == load_pairs(["fr", "de"], min_words=5, locale_root=[root])
    old = {p.en: p.x for p in pairs if p.program == "old"}
    assert old == {
        "Quit the application right now": "Anwendung sofort beenden",
        "removed {} old file from disk": "{} alte Datei entfernt",
        "Caf\xe9 menu is not available today": "Caf\xe9-Men\xfc heute nicht verf\xfcgbar",
    }
    counts = Counter(p.lang for p in pairs)
    assert counts == {"de": 12 * 5 + 1 + 3, "fr": 12 * 5 + 1}
    # deduplicated per (en, lang): the shared string keeps the alphabetically first program's translation
    shared = [p for p in pairs if p.en == "could not open the file for reading"]
    assert shared == [ParallelPair("could not open the file for reading", "Datei nicht lesbar 0", "de", "prog0")]
    assert len({(p.en, p.lang) for p in pairs}) == len(pairs)
    assert load_pairs(["de"], min_words=7, locale_root=root) != load_pairs(["de"], min_words=5, locale_root=root)
    assert load_pairs(["de"], locale_root=tmp_path / "missing") == []


def _check_splits(parts: dict[str, list[ParallelPair]]) -> None:
    """No program family and no English message (up to case/punctuation) in two splits."""
    for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
        fam_a = {program_family(p.program) for p in parts[a]}
        fam_b = {program_family(p.program) for p in parts[b]}
        assert not fam_a & fam_b, (a, b, fam_a & fam_b)
        en_a = {english_key(p.en) for p in parts[a]}
        en_b = {english_key(p.en) for p in parts[b]}
        assert not en_a & en_b, (a, b, sorted(en_a & en_b)[:5])


def test_split_synthetic(tmp_path: Path) -> None:
    pairs = load_pairs(["de", "fr"], locale_root=_fake_root(tmp_path))
    parts = split_by_program(pairs, dev_fraction=0.2, test_fraction=0.2, seed=1)
    assert parts == split_by_program(pairs, dev_fraction=0.2, test_fraction=0.2, seed=1)
    assert all(parts[name] for name in ("train", "dev", "test"))
    _check_splits(parts)
    kept = [p for part in parts.values() for p in part]
    # only duplicates of an English message in a later split are dropped
    assert {english_key(p.en) for p in kept} == {english_key(p.en) for p in pairs}
    assert len(parts["train"]) > len(parts["dev"])
    with pytest.raises(ValueError):
        split_by_program(pairs, dev_fraction=0.5, test_fraction=0.5)


def test_multiway_and_write(tmp_path: Path) -> None:
    pairs = [
        ParallelPair("an English message here", "de1", "de", "a"),
        ParallelPair("an English message here", "fr1", "fr", "b"),
        ParallelPair("only in German, this one", "de2", "de", "a"),
    ]
    assert multiway(pairs, ["de", "fr"]) == [
        {"en": "an English message here", "program": "a", "translations": {"de": "de1", "fr": "fr1"}}
    ]
    files = write_splits({"train": pairs[2:], "dev": [], "test": pairs[:2]}, tmp_path / "out", ["de", "fr"])
    rows = [json.loads(line) for line in files["train"].read_text(encoding="utf-8").splitlines()]
    assert rows == [{"en": "only in German, this one", "x": "de2", "lang": "de", "program": "a"}]
    assert files["dev"].read_text() == ""
    assert len(files["test_multiway"].read_text().splitlines()) == 1


def test_cli_gettext_parallel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sampserve.commands import app
    from training.data import gettext_parallel

    root = _fake_root(tmp_path)
    real_load = gettext_parallel.load_pairs
    monkeypatch.setattr(gettext_parallel, "load_pairs", lambda langs, **kw: real_load(langs, locale_root=root, **kw))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "gettext-parallel", str(out), "--languages", "de", "fr"])
    assert result.exit_code == 0, result.output
    assert "de" in result.output and "fr" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["dev.jsonl", "test.jsonl", "test_multiway.jsonl", "train.jsonl"]
    langs = {json.loads(line)["lang"] for line in (out / "train.jsonl").read_text().splitlines()}
    assert langs == {"de", "fr"}


def test_real_catalogs_de_fr() -> None:
    if not any(LOCALE_ROOT.glob("de/LC_MESSAGES/*.mo")):
        pytest.skip("no German gettext catalogs installed")
    pairs = load_pairs(["de", "fr"], locale_root=LOCALE_ROOT)
    counts = Counter(p.lang for p in pairs)
    assert counts["de"] > 5000 and counts["fr"] > 5000, counts
    assert all(len(p.en.split()) >= 5 and p.en != p.x and "\n" not in p.x for p in pairs)
    parts = split_by_program(pairs)
    _check_splits(parts)
    for name in ("dev", "test"):
        assert Counter(p.lang for p in parts[name])["de"] > 500, name
