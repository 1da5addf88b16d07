"""The Dockerfiles (hadolint and our own rules) and docker-compose.yml (docker-compose and the Compose
Specification's schema, which Compose v2 reads)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import ROOT, system_tool, venv_tool

DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.gpu"]


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def requirements(path: Path) -> list[str]:
    """Requirement lines of a pip file, following ``-r`` includes."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r "):
            out += requirements(path.parent / line[3:].strip())
        elif line:
            out.append(line)
    return out


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    done = subprocess.run([venv_tool("hadolint"), "--format", "json", str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, json.dumps(json.loads(done.stdout or "[]"), indent=1)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_multistage_non_root_with_a_healthcheck(dockerfile: Path) -> None:
    steps = _instructions(dockerfile)
    assert sum(k == "FROM" for k, _ in steps) >= 2, "build and runtime stages"
    final = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM"):]
    users = [arg for k, arg in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    health = [arg for k, arg in final if k == "HEALTHCHECK"]
    assert health and "/v2/health/live" in health[0]
    entry = json.loads(next(arg for k, arg in final if k == "ENTRYPOINT"))
    assert entry == ["python", "-m", "service"]  # the server alone: the sampserve CLI imports torch
    assert any(k == "COPY" and "--from=build" in arg for k, arg in final)
    assert any(k == "ARG" and arg.startswith("MODEL_REPO") for k, arg in final)


@pytest.mark.parametrize("name", ["requirements-server.txt", "requirements-gpu.txt"])
def test_server_images_pin_every_dependency(name: str) -> None:
    """Every line pinned; one onnxruntime build; no training stack. The CPU image carries no torch, the GPU
    image torch's CUDA build for the PyTorch runtime."""
    lines = requirements(ROOT / "docker" / name)
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][\w.\-+]*", line) for line in lines), lines
    names = {line.split("==")[0].lower() for line in lines}
    assert not names & {"transformers", "sentence-transformers", "matplotlib"}
    assert len({"onnxruntime", "onnxruntime-gpu"} & names) == 1
    pins = dict(line.lower().split("==") for line in lines)
    if name == "requirements-gpu.txt":
        assert "torch" in pins and "safetensors" in pins
    else:
        assert "torch" not in pins


def test_compose_file_is_accepted_by_docker_compose() -> None:
    binary = system_tool("docker-compose", "docker-compose")
    done = subprocess.run([binary, "config", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _compose_spec_schema() -> dict:
    system_tool("docker-compose", "docker-compose")
    listing = subprocess.run(["dpkg", "-L", "docker-compose"], capture_output=True, text=True).stdout.split()
    schema = next(Path(p) for p in listing if p.endswith("compose_spec.json"))
    return json.loads(schema.read_text())


def test_compose_file_follows_the_compose_specification() -> None:
    """Compose v2 reads the Compose Specification; v1-only files (a `version` key, links, v2 resource
    keys) fail it or are deprecated there."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.Draft201909Validator(_compose_spec_schema()).validate(compose)
    assert "version" not in compose
    for name, service in compose["services"].items():
        assert not {"links", "external_links", "volumes_from", "cpu_shares", "mem_limit"} & set(service), name
        for ports in service.get("ports", []):
            assert ports.startswith("127.0.0.1:"), f"{name} publishes {ports} beyond loopback"


def test_compose_mounts_the_files_the_tests_check() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert (ROOT / services["sampserve"]["build"]["dockerfile"].split(":-")[-1].rstrip("}")).exists()
    mounts = {m.split(":")[0]: m.split(":")[1] for s in services.values() for m in s.get("volumes", [])}
    assert mounts["./docker/prometheus"] == "/etc/prometheus"
    assert mounts["./docker/grafana/provisioning"] == "/etc/grafana/provisioning"
    for host in mounts:
        assert (ROOT / host).exists(), host
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


def test_compose_passes_the_api_key_as_a_secret_file() -> None:
    """The key reaches the server as a compose secret (a file under /run/secrets), never as an
    environment value, from a host folder git ignores; Prometheus keeps scraping the REST port,
    where /metrics stays open under the key."""
    binary = system_tool("docker-compose", "docker-compose")
    done = subprocess.run([binary, "--profile", "tls", "config"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    files = {name: Path(secret["file"]) for name, secret in config["secrets"].items()}
    for path in files.values():
        assert path.parent == ROOT / "docker" / "secrets"
        if (ROOT / ".git").exists():
            ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT)
            assert ignored.returncode == 0, f"{path} is not git-ignored"
    from service.settings import Settings

    for name in ("sampserve", "sampserve-tls"):
        service = config["services"][name]
        environment = service["environment"]
        assert {k.removeprefix("SAMPSERVE_").lower() for k in environment} <= set(Settings.model_fields), name
        assert "SAMPSERVE_API_KEY" not in environment
        targets = {s["source"]: s.get("target", s["source"]) for s in service["secrets"]}
        for variable, value in environment.items():
            if variable.endswith("_FILE"):  # every file the server reads is a secret it is given
                assert value.startswith("/run/secrets/") and value.removeprefix("/run/secrets/") in \
                    targets.values(), (name, variable)
        assert environment["SAMPSERVE_API_KEY_FILE"] == f"/run/secrets/{targets['sampserve_api_key']}"
        assert "SAMPSERVE_METRICS_PORT" not in environment
        # the server exits within drain + 5 s of SIGTERM: compose waits longer before SIGKILL
        assert float(service["stop_grace_period"].removesuffix("s")) > float(environment["SAMPSERVE_DRAIN_GRACE_S"]) + 5
    tls = config["services"]["sampserve-tls"]
    assert tls["profiles"] == ["tls"]
    assert {"SAMPSERVE_TLS_CERT_FILE", "SAMPSERVE_TLS_KEY_FILE"} <= set(tls["environment"])
    assert "https://127.0.0.1:8000/v2/health/live" in " ".join(tls["healthcheck"]["test"])
    assert "SAMPSERVE_TLS_CERT_FILE" not in config["services"]["sampserve"]["environment"]
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["sampserve:8000"] and job["metrics_path"] == "/metrics"
    assert "8000" in {p.split(":")[-1].split("/")[0] for p in config["services"]["sampserve"]["ports"]}
