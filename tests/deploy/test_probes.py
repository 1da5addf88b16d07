"""The chart's probes and compose's TLS healthcheck, run against the real server under mutual TLS.

The server is started the way the chart starts it: ``python -m service`` (the image's ENTRYPOINT)
with the rendered ConfigMap as its environment, the chart's mounted Secrets as files under a
temporary folder standing in for /etc/sampserve, and only the address and ports changed to free
loopback ones. The probes are the rendered exec commands, run as the kubelet would run them in the
container.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.conftest import ROOT
from tests.deploy.helm import merged_over, render
from tests.servers import Server

trustme = pytest.importorskip("trustme")
pytest.importorskip("helm_sdkpy", reason="the README's test command installs helm-sdkpy (Helm as a library)")

MOUNTS = "/etc/sampserve"
API_KEY = "k8s-test-key-0123456789"
# API key, mutual TLS with a separate probe certificate, metrics on their own port
VALUES = {"server": {"metricsPort": 9102, "apiKey": {"existingSecret": "sampserve-api-key"},
                     "tls": {"existingSecret": "sampserve-tls",
                             "clientCA": {"existingSecret": "sampserve-ca", "probeSecret": "sampserve-probe"}}}}
# the same without probeSecret: the probes present the server's own certificate
SERVER_CERT_VALUES = {"server": {**VALUES["server"], "tls": {"existingSecret": "sampserve-tls",
                                                             "clientCA": {"existingSecret": "sampserve-ca"}}}}


def _pem(leaf: trustme.LeafCert, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tls.crt").write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    (folder / "tls.key").write_bytes(leaf.private_key_pem.bytes())


@dataclass
class Pod:
    server: Server
    mounts: Path  # stands in for /etc/sampserve
    http_port: int
    metrics_port: int
    client: trustme.LeafCert
    ca: trustme.CA

    def local(self, argument: str) -> str:
        """A rendered path or port, as it is in this test's stand-in for the pod."""
        if argument.startswith(MOUNTS):
            return str(self.mounts) + argument[len(MOUNTS):]
        return str(self.http_port) if argument == "8000" else argument

    def context(self, client: trustme.LeafCert) -> ssl.SSLContext:
        """A client that verifies the server against the CA and presents ``client``'s certificate."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        client.configure_cert(context)
        return context


def _rendered(values: dict) -> dict:
    docs = render(merged_over(values))
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def pod(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    ca = trustme.CA()
    mounts = tmp_path_factory.mktemp("etc-sampserve")
    _pem(ca.issue_cert("127.0.0.1", "localhost"), mounts / "tls")
    probe = ca.issue_cert("probe.sampserve.test")
    _pem(probe, mounts / "probe-tls")
    (mounts / "client-ca").mkdir()
    ca.cert_pem.write_to_path(str(mounts / "client-ca" / "ca.crt"))
    (mounts / "api-key").mkdir()
    (mounts / "api-key" / "api-key").write_text(API_KEY + "\n")

    settings = _rendered(VALUES)["ConfigMap"]["data"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMPSERVE_")}
    env |= {k: v.replace(MOUNTS, str(mounts)) for k, v in settings.items()}
    env |= {"SAMPSERVE_REPO": str(repo), "SAMPSERVE_HOST": "127.0.0.1", "SAMPSERVE_HTTP_PORT": "0",
            "SAMPSERVE_GRPC_PORT": "0", "SAMPSERVE_METRICS_PORT": "0", "SAMPSERVE_THREADS": "1",
            "SAMPSERVE_DRAIN_GRACE_S": "2", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "service"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        lines.append(process.stdout.readline())  # type: ignore[union-attr]
        if "REST on " in lines[-1]:
            break
    else:
        process.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines))
    words = lines[-1].split()
    url = words[words.index("REST") + 2]
    metrics_url = words[words.index("metrics") + 2]
    assert url.startswith("https://") and metrics_url.startswith("https://"), lines[-1]
    server = Server(process, url, words[words.index("gRPC") + 2], lines)
    running = Pod(server, mounts, int(url.rsplit(":", 1)[1]), int(metrics_url.split(":")[2].split("/")[0]),
                  probe, ca)
    server.http.close()
    server.http = httpx.Client(base_url=url, timeout=30, verify=running.context(probe))
    try:
        while time.monotonic() < deadline and process.poll() is None:
            with suppress(httpx.TransportError):
                if server.http.get("/v2/health/ready").status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("server never became ready:\n" + server.output())
        yield running
    finally:
        assert server.stop() == 0, server.output()


def _run(command: list[str], pod: Pod, timeout: float) -> subprocess.CompletedProcess:
    """A rendered exec probe, as the kubelet runs it in the container (the image's python on PATH)."""
    assert command[0] == "python"
    started = time.monotonic()
    done = subprocess.run([sys.executable, *[pod.local(a) for a in command[1:]]], capture_output=True, text=True,
                          timeout=timeout)
    assert time.monotonic() - started < timeout
    return done


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def test_the_kubelets_https_probe_would_be_refused(pod: Pod) -> None:
    """Why the chart does not use httpGet under mutual TLS: the kubelet presents no client certificate."""
    with pytest.raises(httpx.TransportError), httpx.Client(verify=False, timeout=5) as kubelet:
        kubelet.get(f"https://127.0.0.1:{pod.http_port}/v2/health/live")


@pytest.mark.parametrize("values", [VALUES, SERVER_CERT_VALUES], ids=["probe-cert", "server-cert"])
def test_the_rendered_exec_probes_pass(pod: Pod, values: dict) -> None:
    container = _rendered(values)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    for probe in PROBES:
        done = _run(container[probe]["exec"]["command"], pod, container[probe]["timeoutSeconds"])
        assert done.returncode == 0, (probe, done.stderr)


def test_the_exec_probe_fails_on_an_error_status_and_on_a_refused_certificate(pod: Pod, tmp_path: Path) -> None:
    container = _rendered(VALUES)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    command = container["readinessProbe"]["exec"]["command"]
    timeout = container["readinessProbe"]["timeoutSeconds"]
    missing = [*command[:4], "/v2/models/no-such-model/ready", *command[5:]]
    done = _run(missing, pod, timeout)
    assert done.returncode == 1 and "/v2/models/no-such-model/ready: 40" in done.stderr, done.stderr
    _pem(trustme.CA().issue_cert("stranger.test"), tmp_path / "stranger")  # another CA's certificate
    stranger = [*command[:6], str(tmp_path / "stranger" / "tls.crt"), str(tmp_path / "stranger" / "tls.key")]
    done = _run(stranger, pod, timeout)
    assert done.returncode == 1 and done.stderr.startswith("/v2/health/ready: "), done.stderr


def test_the_chart_wired_key_and_metrics_port_work(pod: Pod) -> None:
    """The ConfigMap's file paths and metrics port, read by the real server."""
    body = {"model": "emb", "input": "hello"}
    assert pod.server.http.post("/v1/embeddings", json=body).status_code == 401
    reply = pod.server.http.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 200, reply.text
    assert pod.server.http.get("/metrics").status_code == 404  # not on the REST port
    with httpx.Client(verify=pod.context(pod.client), timeout=10) as scraper:
        metrics = scraper.get(f"https://127.0.0.1:{pod.metrics_port}/metrics")
    assert metrics.status_code == 200 and "sampserve_requests_total" in metrics.text


def test_the_compose_tls_healthcheck_passes_under_mutual_tls(pod: Pod) -> None:
    """docker-compose.yml's sampserve-tls healthcheck presents the server's certificate under mutual TLS."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["sampserve-tls"]
    test = service["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"]
    command = [sys.executable, *[a.replace("127.0.0.1:8000", f"127.0.0.1:{pod.http_port}") for a in test[2:]]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAMPSERVE_")}
    env |= {"SAMPSERVE_TLS_CERT_FILE": str(pod.mounts / "tls" / "tls.crt"),
            "SAMPSERVE_TLS_KEY_FILE": str(pod.mounts / "tls" / "tls.key")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=10)
    assert done.returncode != 0  # without mutual TLS configured it presents nothing, and is refused
    env["SAMPSERVE_TLS_CLIENT_CA_FILE"] = str(pod.mounts / "client-ca" / "ca.crt")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
