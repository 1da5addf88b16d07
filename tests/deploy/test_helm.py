"""The Helm chart, checked by the real Helm engine and the Kubernetes schemas."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from tests.deploy.helm import CHART, lint, merged_over, merged_values, render

pytest.importorskip("helm_sdkpy", reason="the README's test command installs helm-sdkpy (Helm as a library)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBE_VERSIONS = ("1.30", "1.33")
CPU = CHART / "values-cpu.yaml"
GPU = CHART / "values-gpu.yaml"


def _kinds(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


def _server(docs: list[dict]) -> dict:
    return _kinds(docs)["Deployment"]["spec"]["template"]["spec"]


def _container(docs: list[dict]) -> dict:
    return _server(docs)["containers"][0]


def _validate(docs: list[dict]) -> None:
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: no Kubernetes schema; checked by hand
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


API_KEY = {"server": {"apiKey": {"existingSecret": "sampserve-api-key", "key": "token"}}}
TLS = {"server": {"tls": {"existingSecret": "sampserve-tls"}}}
MTLS = {"server": {"tls": {"existingSecret": "sampserve-tls", "clientCA": {"existingSecret": "sampserve-ca"}}}}
MTLS_PROBE_CERT = {"server": {"tls": {"existingSecret": "sampserve-tls", "clientCA": {
    "existingConfigMap": "trust-bundle", "key": "bundle.pem", "probeSecret": "sampserve-probe"}}}}
METRICS_PORT = {"server": {"metricsPort": 9102}, "serviceMonitor": {"enabled": True}}
EVERYTHING = {"server": {**API_KEY["server"], **MTLS["server"], **METRICS_PORT["server"],
                         "otlpEndpoint": "http://otel-collector:4318/v1/traces"},
              "serviceMonitor": {"enabled": True, "tlsConfig": {
                  "ca": {"secret": {"name": "sampserve-ca", "key": "ca.crt"}},
                  "cert": {"secret": {"name": "prometheus-client", "key": "tls.crt"}},
                  "keySecret": {"name": "prometheus-client", "key": "tls.key"}}}}
SCENARIOS = {"api-key": API_KEY, "tls": TLS, "mtls": MTLS, "mtls-probe-cert": MTLS_PROBE_CERT,
             "metrics-port": METRICS_PORT, "everything": EVERYTHING}

# values key (under server, grpc.* under server.grpc) -> the server setting it becomes
VALUE_SETTINGS = {
    "httpPort": "http_port", "grpcPort": "grpc_port", "metricsPort": "metrics_port", "threads": "threads",
    "instances": "instances", "pollIntervalSeconds": "poll_interval_s", "strictReadiness": "strict_readiness",
    "requestTimeoutSeconds": "request_timeout_s", "runtimeTimeoutSeconds": "runtime_timeout_s",
    "maxHungCalls": "max_hung_calls", "maxTextsPerRequest": "max_texts_per_request",
    "maxTextChars": "max_text_chars", "maxBodyBytes": "max_body_bytes", "maxConnections": "max_connections",
    "idleTimeoutSeconds": "idle_timeout_s", "headerTimeoutSeconds": "header_timeout_s",
    "bodyTimeoutSeconds": "body_timeout_s", "docs": "docs", "logFormat": "log_format", "accessLog": "access_log",
    "otlpEndpoint": "otlp_endpoint", "drainGraceSeconds": "drain_grace_s",
    "grpc.maxMessageBytes": "grpc_max_message_bytes",
    "grpc.maxConcurrentStreams": "grpc_max_concurrent_streams",
    "grpc.maxConnectionIdleSeconds": "grpc_max_connection_idle_s",
    "grpc.maxConnectionAgeSeconds": "grpc_max_connection_age_s",
    "grpc.maxConnectionAgeGraceSeconds": "grpc_max_connection_age_grace_s",
    "grpc.keepaliveMinPingIntervalSeconds": "grpc_keepalive_min_ping_interval_s",
    "grpc.handshakeTimeoutSeconds": "grpc_handshake_timeout_s",
}


@pytest.mark.parametrize("values_files", [(), (CPU,), (GPU,)], ids=["defaults", "cpu", "gpu"])
def test_lints_clean(values_files: tuple[Path, ...]) -> None:
    assert lint(*values_files) == []


@pytest.mark.parametrize("bad", [
    {"replicaCount": "two"},
    {"server": {"httpPort": 70000}},
    {"modelRepository": {"source": "s3"}},
    {"gpu": {"enabled": "yes"}},
    {"unknownKey": 1},
    {"server": {"idleTimeoutSeconds": -1}},
    {"server": {"runtimeTimeoutSeconds": 0}},
    {"server": {"headerTimeoutSeconds": "10s"}},
    {"server": {"grpc": {"maxConnectionAgeSeconds": -600}}},
    {"server": {"maxTextChars": 8}},
    {"server": {"maxConnections": 0}},
    {"server": {"metricsPort": 0}},
    {"server": {"logFormat": "xml"}},
    {"server": {"strictReadiness": "yes"}},
    {"server": {"otlpEndpoint": "otel:4318"}},
    {"server": {"apiKey": {"value": "hunter2"}}},  # no place for a key in plain text
    {"server": {"apiKey": {"key": ""}}},
    {"server": {"tls": {"existingSecret": "Not_A_Name"}}},
    {"probes": {"liveness": {"timeoutSeconds": 0}}},
], ids=["string-replicas", "port-range", "unknown-source", "bool-as-string", "unknown-key", "negative-timeout",
        "zero-runtime-timeout", "timeout-as-string", "negative-grpc-age", "tiny-max-text-chars",
        "no-connections", "metrics-port-zero", "unknown-log-format", "strict-readiness-string",
        "otlp-without-scheme", "plain-text-api-key", "empty-secret-key", "bad-secret-name", "zero-probe-timeout"])
def test_lint_rejects_bad_values(tmp_path: Path, bad: dict) -> None:
    values_file = tmp_path / "bad.yaml"
    values_file.write_text(yaml.safe_dump(bad))
    assert ("error", "values.yaml") in lint(values_file)


def test_install_reports_schema_errors_by_field() -> None:
    with pytest.raises(Exception, match="replicaCount"):
        render(merged_values() | {"replicaCount": 0})
    with pytest.raises(Exception, match="existingClaim"):
        render(merged_values() | {"modelRepository": {"source": "pvc", "mountPath": "/models",
                                                       "pvc": {"create": False, "existingClaim": ""}}})
    with pytest.raises(Exception, match="minReplicas must not exceed"):
        render(merged_values() | {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2,
                                                  "queueTime": {"enabled": False}}})
    with pytest.raises(Exception, match="idleTimeoutSeconds"):
        render(merged_over({"server": {"idleTimeoutSeconds": -5}}))
    with pytest.raises(Exception, match=r"needs server\.tls\.existingSecret"):
        render(merged_over({"server": {"tls": {"clientCA": {"existingSecret": "sampserve-ca"}}}}))
    with pytest.raises(Exception, match="not both"):
        render(merged_over({"server": {"tls": {"existingSecret": "t", "clientCA": {
            "existingSecret": "a", "existingConfigMap": "b"}}}}))
    with pytest.raises(Exception, match="only used under mutual TLS"):
        render(merged_over({"server": {"tls": {"existingSecret": "t", "clientCA": {"probeSecret": "p"}}}}))
    with pytest.raises(Exception, match="metricsPort must differ"):
        render(merged_over({"server": {"metricsPort": 8000}}))


@pytest.mark.parametrize("values_files", [(), (CPU,), (GPU,)], ids=["defaults", "cpu", "gpu"])
def test_rendered_manifests_validate_against_kubernetes_schemas(values_files: tuple[Path, ...]) -> None:
    docs = render(merged_values(*values_files))
    kinds = _kinds(docs)
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= set(kinds)
    _validate(docs)


@pytest.mark.parametrize("over", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_secured_manifests_validate_against_kubernetes_schemas(over: dict) -> None:
    docs = render(merged_over(over))
    assert "Secret" not in _kinds(docs)  # the chart only ever mounts Secrets that exist
    _validate(docs)


def test_cpu_install_needs_no_gpu_and_runs_locked_down() -> None:
    docs = render(merged_values(CPU))
    pod = _server(docs)
    container = pod["containers"][0]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert "nodeSelector" not in pod and "tolerations" not in pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    claim = _kinds(docs)["PersistentVolumeClaim"]["metadata"]["name"]
    assert {"name": "models", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}} in pod["volumes"]


def test_gpu_install_asks_for_gpus_on_gpu_nodes() -> None:
    docs = render(merged_values(GPU))
    pod = _server(docs)
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":gpu")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    hpa = _kinds(docs)["HorizontalPodAutoscaler"]["spec"]
    assert {m["type"] for m in hpa["metrics"]} == {"Resource", "Pods"}
    assert "replicas" not in _kinds(docs)["Deployment"]["spec"]  # the HPA owns the replica count
    monitor = _kinds(docs)["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert monitor["spec"]["selector"]["matchLabels"] == _kinds(docs)["Service"]["spec"]["selector"]
    # the ServiceMonitor scrapes; no pod annotations inviting a second scrape
    assert "prometheus.io/scrape" not in _kinds(docs)["Deployment"]["spec"]["template"]["metadata"]["annotations"]


def test_probes_drain_and_settings_match_the_server() -> None:
    values = merged_values()
    docs = render(values)
    pod = _server(docs)
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTP"
    sleep = values["preStopSleepSeconds"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(sleep)]
    assert pod["terminationGracePeriodSeconds"] == sleep + values["server"]["drainGraceSeconds"] + 10
    # SIGTERM comes after the preStop sleep, and the server exits within drainGraceSeconds + 5 of it
    assert pod["terminationGracePeriodSeconds"] > sleep + values["server"]["drainGraceSeconds"] + 5
    # liveness: a 503 for stuck runtime calls restarts the pod, after failures spread over >= 30 s,
    # each answer given more than the kubelet's default 1 s
    live = container["livenessProbe"]
    assert live["failureThreshold"] >= 3 and 30 <= live["failureThreshold"] * live["periodSeconds"] <= 60
    assert live["timeoutSeconds"] >= 3
    settings = _kinds(docs)["ConfigMap"]["data"]
    assert settings["SAMPSERVE_DRAIN_GRACE_S"] == str(values["server"]["drainGraceSeconds"])
    assert settings["SAMPSERVE_LOG_FORMAT"] == "json" and settings["SAMPSERVE_DOCS"] == "false"
    assert settings["SAMPSERVE_GRPC_MAX_CONNECTION_AGE_S"] == "600"
    assert not {"SAMPSERVE_METRICS_PORT", "SAMPSERVE_OTLP_ENDPOINT", "SAMPSERVE_API_KEY_FILE",
                "SAMPSERVE_TLS_CERT_FILE"} & set(settings)
    assert settings["SAMPSERVE_MAX_BODY_BYTES"] == str(values["server"]["maxBodyBytes"])
    assert settings["SAMPSERVE_INSTANCES"] == str(values["server"]["instances"])
    # every variable the chart sets is a real server setting (extra="forbid" would refuse the rest)
    from service.settings import Settings

    assert {k.removeprefix("SAMPSERVE_").lower() for k in settings} <= set(Settings.model_fields)
    ports = {p["name"]: p["port"] for p in _kinds(docs)["Service"]["spec"]["ports"]}
    assert ports == {"http": values["server"]["httpPort"], "grpc": values["server"]["grpcPort"]}


def test_init_container_copies_the_repository_into_the_pod() -> None:
    values = merged_values() | {"modelRepository": {"source": "initContainer", "mountPath": "/models",
                                                    "initContainer": {"image": "registry.example/models:7",
                                                                      "sourcePath": "/repo/", "sizeLimit": "2Gi"}}}
    docs = render(values)
    pod = _server(docs)
    init = pod["initContainers"][0]
    assert init["image"] == "registry.example/models:7"
    assert init["command"] == ["cp", "-R", "/repo/.", "/repository/"]
    assert {"name": "models", "emptyDir": {"sizeLimit": "2Gi"}} in pod["volumes"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)


def test_api_key_comes_from_the_secret_as_a_file() -> None:
    docs = render(merged_over(API_KEY))
    pod, container = _server(docs), _container(docs)
    settings = _kinds(docs)["ConfigMap"]["data"]
    path = settings["SAMPSERVE_API_KEY_FILE"]
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "sampserve-api-key"
    assert volume["secret"]["items"] == [{"key": "token", "path": path.rsplit("/", 1)[1]}]
    assert volume["secret"]["defaultMode"] == 0o440  # the pod's fsGroup reads it, nobody else
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": path.rsplit("/", 1)[0], "readOnly": True}
    assert "env" not in container  # nothing beside the ConfigMap: the key is never an env value
    assert "SAMPSERVE_API_KEY" not in settings


@pytest.mark.parametrize("over", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_config_map_holds_paths_never_key_material(over: dict) -> None:
    docs = render(merged_over(over))
    settings = _kinds(docs)["ConfigMap"]["data"]
    for name, value in settings.items():
        assert "BEGIN" not in value and "PRIVATE" not in value, name
        if name.endswith("_FILE"):
            assert value.startswith("/etc/sampserve/"), (name, value)
    mounted = {m["mountPath"] for m in _container(docs)["volumeMounts"]}
    for name, value in settings.items():
        if name.endswith("_FILE"):  # every file the server is told to read is mounted
            assert value.rsplit("/", 1)[0] in mounted, name


def test_tls_switches_the_probes_to_https() -> None:
    docs = render(merged_over(TLS))
    container, settings = _container(docs), _kinds(docs)["ConfigMap"]["data"]
    assert settings["SAMPSERVE_TLS_CERT_FILE"] == "/etc/sampserve/tls/tls.crt"
    assert settings["SAMPSERVE_TLS_KEY_FILE"] == "/etc/sampserve/tls/tls.key"
    assert "SAMPSERVE_TLS_CLIENT_CA_FILE" not in settings
    for probe, path in (("startupProbe", "/v2/health/live"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http", "scheme": "HTTPS"}
    (volume,) = [v for v in _server(docs)["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == "sampserve-tls"
    assert {i["key"] for i in volume["secret"]["items"]} == {"tls.crt", "tls.key"}
    annotations = _kinds(docs)["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scheme"] == "https"
    assert {p["name"]: p["appProtocol"] for p in _kinds(docs)["Service"]["spec"]["ports"]} == {
        "http": "https", "grpc": "grpc"}


def exec_probe(container: dict, probe: str) -> list[str]:
    command = container[probe]["exec"]["command"]
    assert command[:2] == ["python", "-c"] and "httpGet" not in container[probe]
    return command


@pytest.mark.parametrize("over", [MTLS, MTLS_PROBE_CERT], ids=["server-cert", "probe-cert"])
def test_mutual_tls_probes_present_a_client_certificate(over: dict) -> None:
    docs = render(merged_over(over))
    container, pod = _container(docs), _server(docs)
    settings = _kinds(docs)["ConfigMap"]["data"]
    assert settings["SAMPSERVE_TLS_CLIENT_CA_FILE"] == "/etc/sampserve/client-ca/ca.crt"
    cert_dir = "/etc/sampserve/probe-tls" if over is MTLS_PROBE_CERT else "/etc/sampserve/tls"
    for probe, path in (("startupProbe", "/v2/health/live"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        command = exec_probe(container, probe)
        port, probe_path, timeout, cert, key = command[3:]
        assert (port, probe_path, cert, key) == ("8000", path, f"{cert_dir}/tls.crt", f"{cert_dir}/tls.key")
        assert 1 <= int(timeout) < container[probe]["timeoutSeconds"]  # the script gives up first
        compile(command[2], probe, "exec")
    volumes = {v["name"]: v for v in pod["volumes"]}
    if over is MTLS_PROBE_CERT:
        assert volumes["client-ca"]["configMap"] == {"name": "trust-bundle", "defaultMode": 0o444,
                                                     "items": [{"key": "bundle.pem", "path": "ca.crt"}]}
        assert volumes["probe-tls"]["secret"]["secretName"] == "sampserve-probe"
    else:
        assert volumes["client-ca"]["secret"]["secretName"] == "sampserve-ca"
        assert "probe-tls" not in volumes
    for volume in volumes.values():  # a secret volume the container does not mount is a typo
        assert volume["name"] in {m["name"] for m in container["volumeMounts"]}


def test_metrics_port_is_a_container_port_a_service_port_and_the_scrape_target() -> None:
    docs = render(merged_over(METRICS_PORT))
    kinds = _kinds(docs)
    assert kinds["ConfigMap"]["data"]["SAMPSERVE_METRICS_PORT"] == "9102"
    assert {"name": "metrics", "containerPort": 9102, "protocol": "TCP"} in _container(docs)["ports"]
    ports = {p["name"]: p for p in kinds["Service"]["spec"]["ports"]}
    assert ports["metrics"]["port"] == 9102 and ports["metrics"]["targetPort"] == "metrics"
    annotations = kinds["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9102" and annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/scheme"] == "http"
    assert kinds["ServiceMonitor"]["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics",
                                                              "interval": "15s"}]
    # without it, /metrics stays on the REST port, which the annotations name
    docs = render(merged_values())
    assert _kinds(docs)["Deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    assert "metrics" not in {p["name"] for p in _container(docs)["ports"]}
    # podAnnotations of the same name win (no duplicate keys)
    docs = render(merged_over({"podAnnotations": {"prometheus.io/scrape": "false", "team": "search"}}))
    annotations = _kinds(docs)["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false" and annotations["team"] == "search"
    assert annotations["prometheus.io/port"] == "8000"


def test_service_monitor_scrapes_over_tls_with_the_given_tls_config() -> None:
    docs = render(merged_over(EVERYTHING))
    (endpoint,) = _kinds(docs)["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == EVERYTHING["serviceMonitor"]["tlsConfig"]


def _setting_bounds(field: str) -> dict[str, float]:
    from service.settings import Settings

    bounds = {}
    for item in Settings.model_fields[field].metadata:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(item, name, None) is not None:
                bounds[name] = getattr(item, name)
    return bounds


def test_schema_bounds_are_no_looser_than_the_servers() -> None:
    """Helm refuses what the server would refuse at start, so a bad value fails the install, not the pods."""
    from service.settings import Settings

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["server"]
    values = merged_values()["server"]
    keys = {k for k in values if k not in ("grpc", "apiKey", "tls")} | {f"grpc.{k}" for k in values["grpc"]}
    assert keys == set(VALUE_SETTINGS), "a server value without its setting in VALUE_SETTINGS"
    for key, field in VALUE_SETTINGS.items():
        assert field in Settings.model_fields, field
        entry = schema["properties"][key] if "." not in key else \
            schema["properties"]["grpc"]["properties"][key.split(".")[1]]
        assert "type" in entry or "enum" in entry, key
        bounds = _setting_bounds(field)
        low = entry.get("minimum", entry.get("exclusiveMinimum"))
        if "ge" in bounds:
            assert low is not None and low >= bounds["ge"], key
        if "gt" in bounds:
            assert ("exclusiveMinimum" in entry and entry["exclusiveMinimum"] >= bounds["gt"]) or \
                entry.get("minimum", bounds["gt"]) > bounds["gt"], key
        if "le" in bounds:
            assert entry.get("maximum", float("inf")) <= bounds["le"], key


@pytest.mark.parametrize("over", [{}, EVERYTHING], ids=["defaults", "everything"])
def test_the_server_accepts_every_variable_the_chart_sets(over: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import Settings

    settings = _kinds(render(merged_over(over)))["ConfigMap"]["data"]
    for name in [n for n in os.environ if n.startswith("SAMPSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    parsed = Settings()
    values = merged_over(over)["server"]
    for key, field in VALUE_SETTINGS.items():
        value = values[key] if "." not in key else values["grpc"][key.split(".")[1]]
        if value in (None, ""):
            assert getattr(parsed, field) is None, key
        else:
            assert getattr(parsed, field) == value, key
    assert (parsed.api_key_file is not None) == bool(over)
    assert parsed.tls == bool(over) and (parsed.tls_client_ca_file is not None) == bool(over)
