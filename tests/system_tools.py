"""Debian programs the tests use (Prometheus, docker-compose, espeak-ng), installed when missing: CI
runs as root, as the README's test command does on a fresh machine; where apt cannot run, the test is
skipped and says what to install."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest

_apt_lock = threading.Lock()
_apt_updated = False


def system_tool(binary: str, package: str) -> str:
    """The path of ``binary``, installing Debian's ``package`` when it is missing and apt can run."""
    global _apt_updated
    found = shutil.which(binary)
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(f"{binary} is not installed and apt-get cannot run here: apt-get install {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _apt_lock:
        if not _apt_updated:
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True, timeout=600)
            _apt_updated = True
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package], env=env,
                              capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"apt-get install {package} failed:\n{done.stderr[-2000:]}")
    found = shutil.which(binary)
    assert found, f"{package} installed no {binary}"
    return found
