"""The text heads' input side: a version's head.json text_prefix goes before every text it tokenizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.errors import InvalidInput
from service.heads import MatchingHead
from service.repository import HEAD_FILE, list_versions


def _version(repo: Path, tmp_path: Path, prefix: str | None) -> Path:
    source = repo / "emb" / str(list_versions(repo / "emb")[-1])
    version = tmp_path / "1"
    shutil.copytree(source, version)
    head = json.loads((version / HEAD_FILE).read_text())
    head.pop("text_prefix", None)
    if prefix is not None:
        head["text_prefix"] = prefix
    (version / HEAD_FILE).write_text(json.dumps(head))
    return version


def test_text_prefix_is_prepended_and_counted_in_the_length_limit(repo: Path, tmp_path: Path) -> None:
    plain = MatchingHead(_version(repo, tmp_path / "plain", None))
    prefixed = MatchingHead(_version(repo, tmp_path / "prefixed", "query: "))
    text = "cannot lock ref"
    assert prefixed.encode([text])[0].ids == plain.encode(["query: " + text])[0].ids
    assert prefixed.encode([text, "disk full"])[1].ids == plain.encode(["query: disk full"])[0].ids
    words = " ".join(["w"] * (plain.max_length - 2))  # [CLS] w ... w [SEP]: exactly the limit
    assert len(plain.encode([words])[0].ids) == plain.max_length  # fits without the prefix ...
    with pytest.raises(InvalidInput, match="at most"):
        prefixed.encode([words])  # ... but not with it
