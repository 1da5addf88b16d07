"""A real Prometheus scraping a real sampserve with docker/prometheus/prometheus.yml; promtool on the
rules; every query of the Grafana dashboard evaluated against that Prometheus."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from tests.deploy.conftest import ROOT, system_tool
from tests.servers import Server

PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "sampserve.json"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([system_tool("promtool", "prometheus"), *args], cwd=PROMETHEUS_DIR, capture_output=True,
                          text=True)


def test_promtool_accepts_config_and_rules() -> None:
    done = _promtool("check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    done = _promtool("check", "rules", "rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    done = _promtool("test", "rules", "rules.test.yml")
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prometheus(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """Prometheus with our config file, its one target pointed at the test server, scraping every second."""
    binary = system_tool("prometheus", "prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [urlparse(server.url).netloc]}]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    for rule_file in config["rule_files"]:
        shutil.copy(PROMETHEUS_DIR / rule_file, folder / rule_file)
    port = _free_port()
    process = subprocess.Popen([binary, f"--config.file={folder / 'prometheus.yml'}",
                                f"--storage.tsdb.path={folder / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        _until(lambda: client.get("/-/ready").status_code == 200 if process.poll() is None else _dead(process), 30)
        # a first scrape before any test's traffic, so that rates see the counters move
        up = _until(lambda: [t for t in client.get("/api/v1/targets").json()["data"]["activeTargets"]
                             if t["health"] == "up"], 30)
        assert up, client.get("/api/v1/targets").json()
        yield client
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=30)


def _dead(process: subprocess.Popen) -> bool:
    raise RuntimeError(f"prometheus exited: {process.stderr.read()[-2000:]}")  # type: ignore[union-attr]


def _until(check, seconds: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def _query(client: httpx.Client, expr: str) -> list[dict]:
    body = client.get("/api/v1/query", params={"query": expr}).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _traffic(server: Server) -> None:
    """Requests of every kind the dashboard shows: embeddings, classification, v2 infer, and errors."""
    http = server.http
    for i in range(40):
        texts = [f"sentence {i}", "a longer one " * (i % 7)]
        assert http.post("/v1/embeddings", json={"model": "emb", "input": texts}).status_code == 200
        texts = [f"cannot open file {i}"]
        assert http.post("/v1/classify", json={"model": "topics", "texts": texts}).status_code == 200
    assert http.post("/v2/models/emb/infer", json={"inputs": [
        {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}).status_code == 200
    for _ in range(3):  # a client error is counted by outcome
        assert http.post("/v1/embeddings", json={"model": "emb", "input": []}).status_code == 400


def _traffic_over_two_scrapes(prometheus: httpx.Client, server: Server) -> None:
    """Series appear at a model's first request; a rate needs them scraped before and after more traffic."""
    _traffic(server)
    seen = 'count(sampserve_request_duration_seconds_count{model=~"emb|topics"}) >= 2'
    assert _until(lambda: _query(prometheus, seen), 30)
    time.sleep(1.5)
    _traffic(server)


def test_prometheus_scrapes_the_server_and_answers_p99_and_rate(prometheus: httpx.Client, server: Server) -> None:
    _traffic_over_two_scrapes(prometheus, server)
    p99 = 'histogram_quantile(0.99, sum by (le) (rate(sampserve_request_duration_seconds_bucket{model="emb"}[1m])))'
    result = _until(lambda: [r for r in _query(prometheus, p99) if math.isfinite(float(r["value"][1]))], 30)
    assert result, _query(prometheus, p99)
    assert 0 < float(result[0]["value"][1]) < 10
    rate = 'sum by (model) (rate(sampserve_requests_total{model="emb"}[1m]))'
    assert float(_until(lambda: _query(prometheus, rate), 10)[0]["value"][1]) > 0
    recorded = 'model:sampserve_request_duration_seconds:p99_5m{model="emb"}'
    assert _until(lambda: [r for r in _query(prometheus, recorded) if math.isfinite(float(r["value"][1]))], 30)
    saturation = _until(lambda: _query(prometheus, 'model:sampserve_queue:saturation{model="emb"}'), 30)
    assert saturation and 0 <= float(saturation[0]["value"][1]) <= 1  # queue depth over the served capacity
    ready = _query(prometheus, "sampserve_model_ready")
    assert {r["metric"]["model"]: r["value"][1] for r in ready} == {"emb": "1", "topics": "1"}
    alerts = prometheus.get("/api/v1/rules", params={"type": "alert"}).json()["data"]["groups"]
    assert {rule["name"] for group in alerts for rule in group["rules"]} >= {"SampserveNoReadyVersion"}


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_dashboard_query_returns_data(prometheus: httpx.Client, server: Server) -> None:
    _traffic_over_two_scrapes(prometheus, server)
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][0]
    metric = re.fullmatch(r"label_values\((\w+), model\)", variable["query"]["query"]).group(1)  # type: ignore[union-attr]
    models = _until(lambda: prometheus.get("/api/v1/label/model/values", params={"match[]": metric}).json()["data"], 30)
    assert set(models) >= {"emb", "topics"}
    queries = _dashboard_queries()
    assert len(queries) >= 8
    for title, expr in queries:
        concrete = expr.replace("$__rate_interval", "1m").replace("$model", variable["allValue"])
        result = _until(lambda q=concrete: _query(prometheus, q), 20)
        assert result, f"panel {title!r}: no data for {concrete}"


def test_the_autoscaling_metric_query_returns_data(prometheus: httpx.Client, server: Server) -> None:
    """prometheus-adapter's rule for the HPA's queue-time metric, its placeholders filled in as the adapter
    fills them (group by the pod's label, match the pod), evaluated against the real Prometheus."""
    adapter = yaml.safe_load((ROOT / "k8s" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    chart = yaml.safe_load((ROOT / "k8s" / "sampserve" / "values.yaml").read_text())
    assert rule["name"]["as"] == chart["autoscaling"]["queueTime"]["metricName"]
    _traffic_over_two_scrapes(prometheus, server)
    query = rule["metricsQuery"].replace("<<.GroupBy>>", "instance").replace("<<.LabelMatchers>>", 'job="sampserve"')
    result = _until(lambda: [r for r in _query(prometheus, query) if math.isfinite(float(r["value"][1]))], 30)
    assert result and float(result[0]["value"][1]) >= 0
