"""The server's life under load: hot swap of versions, a corrupt version, overload, SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import httpx

from service.repository import publish

from tests.servers import start_server

from .conftest import ClosedLoop, set_queue_size

BODY = {"model": "emb", "input": ["the database system is shutting down", "cannot lock ref"]}


class Load(ClosedLoop):
    """REST clients on threads, each with its own connection, counting status codes."""

    def __init__(self, url: str, clients: int, body: dict = BODY) -> None:
        super().__init__(clients)
        self.url, self.body = url, body

    def connect(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def call(self, client: httpx.Client) -> tuple[int | str, str]:
        try:
            response = client.post("/v2/models/emb/infer", json={"inputs": [
                {"name": "text", "shape": [2], "datatype": "BYTES", "data": self.body["input"]}]})
        except httpx.TransportError as exc:  # not accepted: connection refused or closed
            return type(exc).__name__, ""
        version = response.json().get("model_version", "") if response.status_code == 200 else ""
        return response.status_code, version


def _publish_copy_of(repo: Path, model: str, version: int) -> Path:
    source = repo / model / str(version)
    files = {p.name: p for p in source.iterdir() if p.name != "manifest.json"}
    return publish(repo / model, files)


def _publish_corrupt_copy(repo: Path, model: str, version: int) -> Path:
    """A version whose model file does not match its manifest, appearing in one rename (as a real
    publisher's would), so the server can only ever see it whole."""
    staging = repo / model / ".tmp-corrupt"
    shutil.copytree(repo / model / str(version), staging)
    with open(staging / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00corrupt\x00")
    manifest = json.loads((staging / "manifest.json").read_text())
    number = max(int(p.name) for p in (repo / model).iterdir() if p.name.isdigit()) + 1
    manifest["version"] = number
    (staging / "manifest.json").write_text(json.dumps(manifest))
    return staging.rename(repo / model / str(number))


def _metadata(server) -> dict:
    response = server.http.get("/v2/models/emb")
    assert response.status_code == 200, response.text
    return response.json()


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_new_version_under_load_swaps_with_zero_failures_and_a_corrupt_one_never_serves(private_repo, monkeypatch):
    monkeypatch.setenv("SAMPSERVE_POLL_INTERVAL_S", "0.2")
    server = start_server(private_repo)
    try:
        with Load(server.url, clients=4) as load:
            time.sleep(1.0)
            _publish_copy_of(private_repo, "emb", 1)  # version 2
            _wait(lambda: load.versions["2"] > 20)
            _publish_corrupt_copy(private_repo, "emb", 2)  # version 3
            _wait(lambda: "3" in _metadata(server)["parameters"]["failed_versions"])
            time.sleep(0.5)
        assert set(load.codes) == {200}, load.codes  # zero failed requests across the swap
        meta = _metadata(server)
        assert meta["versions"] == ["2"]  # version 1 retired by the policy (latest 1); 3 refused
        assert "model.onnx" in meta["parameters"]["failed_versions"]["3"]
        assert server.http.get("/v2/health/ready").status_code == 200
        metrics = server.http.get("/metrics").text
        assert 'sampserve_model_load_failures_total{model="emb",version="3"} 1.0' in metrics
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0


def test_overload_gets_fast_429_and_loses_no_accepted_request(private_repo):
    set_queue_size(private_repo, "emb", 6)
    server = start_server(private_repo)
    try:
        with Load(server.url, clients=16) as load:
            time.sleep(4.0)
        assert load.codes[200] > 0 and load.codes[429] > 0, load.codes
        assert set(load.codes) <= {200, 429}, load.codes  # every request answered: served or refused
        refused = server.http.get("/metrics").text
        assert 'outcome="resource_exhausted"' in refused
        start = time.perf_counter()
        with Load(server.url, clients=16):
            time.sleep(0.5)
            t0 = time.perf_counter()
            response = server.http.post("/v2/models/emb/infer", json={"inputs": [
                {"name": "text", "shape": [2], "datatype": "BYTES", "data": BODY["input"]}]})
            elapsed = time.perf_counter() - t0
        assert response.status_code in (200, 429)
        if response.status_code == 429:
            assert elapsed < 1.0  # refused at once, not after queueing
        assert time.perf_counter() - start < 30
    finally:
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0


def test_sigterm_under_load_drains_accepted_requests_and_exits_0(private_repo):
    server = start_server(private_repo)
    with Load(server.url, clients=8) as load:
        time.sleep(1.5)
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=30)
        time.sleep(0.2)
    assert code == 0
    assert load.codes[200] > 0
    failed = {k: v for k, v in load.codes.items() if isinstance(k, int) and k != 200}
    assert not failed, load.codes  # accepted requests all succeeded; later ones were refused at connect
