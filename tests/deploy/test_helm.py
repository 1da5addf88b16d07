"""The Helm chart, checked by the real Helm engine and the Kubernetes schemas."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.deploy.helm import CHART, lint, merged_values, render

pytest.importorskip("helm_sdkpy", reason="the README's test command installs helm-sdkpy (Helm as a library)")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBE_VERSIONS = ("1.30", "1.33")
CPU = CHART / "values-cpu.yaml"
GPU = CHART / "values-gpu.yaml"


def _kinds(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


def _server(docs: list[dict]) -> dict:
    return _kinds(docs)["Deployment"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("values_files", [(), (CPU,), (GPU,)], ids=["defaults", "cpu", "gpu"])
def test_lints_clean(values_files: tuple[Path, ...]) -> None:
    assert lint(*values_files) == []


@pytest.mark.parametrize("bad", [
    {"replicaCount": "two"},
    {"server": {"httpPort": 70000}},
    {"modelRepository": {"source": "s3"}},
    {"gpu": {"enabled": "yes"}},
    {"unknownKey": 1},
], ids=["string-replicas", "port-range", "unknown-source", "bool-as-string", "unknown-key"])
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


@pytest.mark.parametrize("values_files", [(), (CPU,), (GPU,)], ids=["defaults", "cpu", "gpu"])
def test_rendered_manifests_validate_against_kubernetes_schemas(values_files: tuple[Path, ...]) -> None:
    docs = render(merged_values(*values_files))
    kinds = _kinds(docs)
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= set(kinds)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: no Kubernetes schema; checked by hand below
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


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


def test_probes_drain_and_settings_match_the_server() -> None:
    values = merged_values()
    docs = render(values)
    pod = _server(docs)
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    sleep = values["preStopSleepSeconds"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(sleep)]
    assert pod["terminationGracePeriodSeconds"] == sleep + values["server"]["drainGraceSeconds"] + 10
    settings = _kinds(docs)["ConfigMap"]["data"]
    assert settings["SAMPSERVE_DRAIN_GRACE_S"] == str(values["server"]["drainGraceSeconds"])
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
