"""k8s/kserve: the manifests validate strictly against KServe's own CRD schemas (vendored in
k8s/kserve/crds), agree with the server's flags, and KServe's storage initializer (PyPI kserve-storage)
replayed on a local repository gives a folder the server serves."""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from jsonschema import Draft7Validator

from tests.servers import start_server

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "k8s" / "kserve"
CRDS = {"ClusterServingRuntime": ("serving.kserve.io_clusterservingruntimes.yaml.gz", "v1alpha1"),
        "InferenceService": ("serving.kserve.io_inferenceservices.yaml.gz", "v1beta1")}
OBJECT_META = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
    "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
    "namespace": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's openAPIV3Schema as JSON Schema, strict where the API server would prune: an object
    accepts only its declared properties unless it says x-kubernetes-preserve-unknown-fields (a field
    the API server would silently drop is a mistake in a manifest, so here it fails)."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema:
        out["properties"] = {name: strict(sub) for name, sub in schema["properties"].items()}
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    elif schema.get("type") == "object" and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "items" in schema:
        out["items"] = strict(schema["items"])
    for combinator in ("allOf", "anyOf", "oneOf"):
        if combinator in schema:
            out[combinator] = [strict(sub) for sub in schema[combinator]]
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def validator(kind: str) -> Draft7Validator:
    file, version = CRDS[kind]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the InferenceService CRD is 2 MB of YAML
    crd = yaml.load(gzip.decompress((KSERVE / "crds" / file).read_bytes()), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = strict(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version}"}
    schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind", "metadata", "spec"})
    return Draft7Validator(schema)


def manifests() -> list[dict]:
    docs = [doc for path in sorted(KSERVE.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert {doc["kind"] for doc in docs} == set(CRDS)
    return docs


def errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(doc["kind"]).iter_errors(doc)]


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifests_validate_strictly_against_kserves_crd_schemas(doc: dict) -> None:
    assert errors(doc) == []


def test_the_strict_schemas_catch_a_misspelt_field_and_a_wrong_type() -> None:
    """The check above can fail: an unknown field KServe would prune, and a type it would refuse."""
    runtime, isvc = (next(d for d in manifests() if d["kind"] == kind) for kind in CRDS)
    misspelt = {**isvc, "spec": {"predictor": {**isvc["spec"]["predictor"], "storageURI": "pvc://x"}}}
    assert any("storageURI" in e for e in errors(misspelt))
    wrong = {**runtime, "spec": {**runtime["spec"], "protocolVersions": "v2"}}
    assert any("protocolVersions" in e for e in errors(wrong))


def test_runtimes_run_the_server_with_its_own_flags_on_the_ports_kserve_routes() -> None:
    from service.cli_flags import settings_from_args

    docs = manifests()
    runtimes = [d for d in docs if d["kind"] == "ClusterServingRuntime"]
    assert {r["metadata"]["name"] for r in runtimes} == {"sampserve", "sampserve-gpu"}
    for runtime in runtimes:
        spec = runtime["spec"]
        assert set(spec["protocolVersions"]) == {"v2", "grpc-v2"}
        (container,) = spec["containers"]
        assert container["name"] == "kserve-container"  # the name KServe merges the predictor into
        settings = settings_from_args(container["args"])  # every arg is a real flag, validated
        assert str(settings.repo) == "/mnt/models" and settings.model_control_mode == "none"
        assert [p["containerPort"] for p in container["ports"]] == [settings.http_port]
        for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
            assert container[probe]["httpGet"] == {"path": path, "port": settings.http_port}
        context = container["securityContext"]
        assert context["runAsNonRoot"] and not context["allowPrivilegeEscalation"] and context["readOnlyRootFilesystem"]
        assert container["resources"]["limits"].get("nvidia.com/gpu") == ("1" if "gpu" in runtime["metadata"]["name"]
                                                                          else None)
    formats = {f["name"] for r in runtimes for f in r["spec"]["supportedModelFormats"]}
    for isvc in (d for d in docs if d["kind"] == "InferenceService"):
        model = isvc["spec"]["predictor"]["model"]
        assert model["modelFormat"]["name"] in formats and model["runtime"] in {"sampserve", "sampserve-gpu"}
        grpc_port = settings_from_args(runtimes[0]["spec"]["containers"][0]["args"]).grpc_port
        if model["protocolVersion"] == "grpc-v2":  # KServe routes h2c to the port the server's gRPC listens on
            assert model["ports"] == [{"name": "h2c", "containerPort": grpc_port, "protocol": "TCP"}]


def test_storage_initializer_replay_serves_the_linked_repository(repo: Path, tmp_path: Path) -> None:
    """kserve-storage's own download of a local (PVC-like) path into /mnt/models: it symlinks each model
    folder; the server, started as the runtime starts it (snapshot mode), serves what it linked."""
    storage = pytest.importorskip("kserve_storage", reason="the README's test command installs kserve-storage")
    import tritonclient.http as triton

    mounted = tmp_path / "mnt" / "models"
    assert storage.Storage.download(str(repo), str(mounted)) == str(mounted)
    assert sorted(p.name for p in mounted.iterdir()) == ["emb", "topics"]
    assert all(p.is_symlink() for p in mounted.iterdir())
    server = start_server(mounted, "--model-control-mode", "none")
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        index = client.get_model_repository_index()
        assert {(m["name"], m["state"]) for m in index} == {("emb", "READY"), ("topics", "READY")}
        text = triton.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array([b"merge two branches", b"print a file"], dtype=object))
        rows = client.infer("emb", [text]).as_numpy("embeddings")
        assert rows.shape[0] == 2 and np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3)
    finally:
        client.close()
        assert server.stop() == 0
