"""The CPU image without Docker: its build stage replayed in a clean virtualenv (the same files copied,
the same RUN lines, the same requirements file), then served with its ENTRYPOINT and ENV."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from tests.deploy.conftest import ROOT
from tests.deploy.test_docker import _instructions
from tests.servers import start_server

DOCKERFILE = ROOT / "docker" / "Dockerfile"
IMAGE_VENV = "/opt/venv"


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for keyword, args in _instructions(DOCKERFILE):
        if keyword == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((keyword, args))
    return stages


def _ignored(relative: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = relative.split("/")
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(relative, p.removeprefix("**/"))
               or any(fnmatch.fnmatch(part, p.removeprefix("**/")) for part in parts) for p in patterns)


def _copy(sources: list[str], destination: str, workdir: Path) -> None:
    target = workdir / destination
    for source in sources:
        path = ROOT / source
        if path.is_dir():
            for file in path.rglob("*"):
                relative = file.relative_to(ROOT).as_posix()
                if file.is_file() and not _ignored(relative):
                    out = target / file.relative_to(path)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, out)
        else:
            assert not _ignored(source), f"{source} is excluded by .dockerignore"
            dest = target / path.name if destination.endswith("/") else target
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)


@pytest.mark.slow
def test_server_image_installs_and_serves_from_its_requirements_alone(tmp_path: Path, repo: Path) -> None:
    build, runtime = _stages()
    prefix = tmp_path / "venv"
    workdir = tmp_path / "src"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{prefix}/bin:{env['PATH']}"
    ran = []
    for keyword, args in build:
        if keyword == "COPY":
            *sources, destination = shlex.split(args)
            _copy(sources, destination, workdir)
        elif keyword == "RUN" and args.startswith("python -m venv"):
            assert args.split()[-1] == IMAGE_VENV
            venv.EnvBuilder(with_pip=True, clear=True).create(prefix)
        elif keyword == "RUN":
            command = args.replace(IMAGE_VENV, str(prefix))
            done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True,
                                  timeout=900)
            assert done.returncode == 0, f"{args}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
            ran.append(args)
        else:
            assert keyword in ("ENV", "WORKDIR"), f"the replay does not know {keyword}: keep the build stage simple"
    assert "pip install -r docker/requirements-server.txt" in ran and "pip install --no-deps ." in ran

    python = str(prefix / "bin" / "python")
    missing = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr
    # the image's pins satisfy every requirement of the base install (the server; the toolkit is an extra)
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout

    image_env = {}
    for keyword, args in runtime:
        if keyword == "ENV":
            image_env.update(dict(item.split("=", 1) for item in shlex.split(args) if not item.startswith("PATH=")))
    entry = json.loads(next(args for keyword, args in runtime if keyword == "ENTRYPOINT"))
    assert entry[0] == "python"
    # outside the tree, so nothing is imported from the checkout instead of the installed package
    server = start_server(repo, command=[python, *entry[1:]], env={**env, **image_env}, cwd=tmp_path)
    try:
        response = server.http.post("/v1/embeddings", json={"model": "emb", "input": ["hello from the image"]})
        assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) > 0
        health = next(args for keyword, args in runtime if keyword == "HEALTHCHECK")
        probe = json.loads(health[health.index("CMD") + 3:].strip())
        port = server.url.rsplit(":", 1)[1]
        probe = [python if p == "python" else p.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for p in probe]
        assert subprocess.run(probe, env=env, timeout=10).returncode == 0
        origin = subprocess.run([python, "-c", "import service; print(service.__file__)"], cwd=tmp_path, env=env,
                                capture_output=True, text=True).stdout
        assert str(prefix) in origin
    finally:
        assert server.stop() == 0
