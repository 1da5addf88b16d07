"""Static checks of the server and the quantizer: ruff (pyproject's [tool.ruff]) and mypy ([tool.mypy])."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("service", "quantizer")


def _tool(name: str) -> list[str]:
    """The tool next to this interpreter (the virtualenv's), else on PATH, else skip."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return [found]


def _check(command: list[str], timeout: float) -> None:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{done.stdout}{done.stderr}"


def test_ruff() -> None:
    _check([*_tool("ruff"), "check", *CHECKED], timeout=120)


def test_mypy() -> None:
    _check([*_tool("mypy"), *CHECKED], timeout=600)
