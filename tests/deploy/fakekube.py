"""A fake Kubernetes API server on loopback, just enough for Helm's install action to run offline.

The Helm engine we can use here (PyPI's helm-sdkpy) has a lint action but no ``template`` action and
no client-side dry run. Its install action renders the chart with the real engine (values schema,
templates, ``fail`` calls) and then sends each manifest to the API server: this server stores what it
is sent and answers discovery, so the release's rendered manifest comes back from Helm itself.
Nothing here validates objects; tests validate the rendered manifests against the Kubernetes
schemas (kubernetes-validate) afterwards.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KUBE_VERSION = ("1", "30")

# group/version -> (plural, kind, namespaced) for every kind the chart may create.
RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [("pods", "Pod", True), ("services", "Service", True), ("configmaps", "ConfigMap", True),
           ("secrets", "Secret", True), ("serviceaccounts", "ServiceAccount", True),
           ("persistentvolumeclaims", "PersistentVolumeClaim", True), ("namespaces", "Namespace", False)],
    "apps/v1": [("deployments", "Deployment", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler", True)],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor", True)],
}


class _Handler(BaseHTTPRequestHandler):
    server: FakeKube  # type: ignore[assignment]

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return None

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self) -> None:
        self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                         "code": 404, "message": "not found"})

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/version":
            major, minor = KUBE_VERSION
            return self._json(200, {"major": major, "minor": minor, "gitVersion": f"v{major}.{minor}.0",
                                    "platform": "linux/amd64"})
        if path == "/openapi/v3":
            return self._json(200, {"paths": {}})
        if path == "/openapi/v2":  # an empty OpenAPI document: the client skips its own validation
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if path == "/api":
            return self._json(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})
        if path == "/apis":
            groups: dict[str, list[dict[str, str]]] = {}
            for group_version in RESOURCES:
                if "/" in group_version:
                    group, version = group_version.split("/")
                    groups.setdefault(group, []).append({"groupVersion": group_version, "version": version})
            return self._json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": v, "preferredVersion": v[0]} for g, v in groups.items()]})
        match = re.fullmatch(r"/api/(v1)|/apis/([^/]+/[^/]+)", path)
        if match:
            group_version = match.group(1) or match.group(2)
            if group_version not in RESOURCES:
                return self._not_found()
            return self._json(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                                    "resources": [{"name": plural, "singularName": kind.lower(), "namespaced": ns,
                                                   "kind": kind, "verbs": ["create", "delete", "get", "list",
                                                                           "patch", "update", "watch"]}
                                                  for plural, kind, ns in RESOURCES[group_version]]})
        if path in self.server.objects:
            return self._json(200, self.server.objects[path])
        plurals = {plural for kinds in RESOURCES.values() for plural, _, _ in kinds}
        if path.rsplit("/", 1)[-1] in plurals:  # a collection: list what was created under it
            items = [o for p, o in self.server.objects.items() if p.rsplit("/", 1)[0] == path]
            return self._json(200, {"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                                    "items": items})
        return self._not_found()

    def _store(self, status: int) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        # Helm's release record (a Secret) comes as protobuf from client-go's typed client: keep a stub
        body = json.loads(raw or b"{}") if "json" in self.headers.get("Content-Type", "") else {}
        metadata = body.setdefault("metadata", {})
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("resourceVersion", "1")
        path = self.path.split("?", 1)[0]
        key = path if self.command != "POST" else f"{path}/{metadata.get('name', '')}"
        self.server.objects[key] = body
        self._json(status, body)

    def do_POST(self) -> None:
        self._store(201)

    def do_PUT(self) -> None:
        self._store(200)

    def do_PATCH(self) -> None:
        self._store(200)

    def do_DELETE(self) -> None:
        self._json(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})


class FakeKube(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.objects: dict[str, dict[str, Any]] = {}
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> FakeKube:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()

    @property
    def kubeconfig(self) -> str:
        return (f"apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: "
                f"'http://127.0.0.1:{self.server_address[1]}'}}}}]\nusers: [{{name: fake, user: {{token: fake}}}}]\n"
                "contexts: [{name: fake, context: {cluster: fake, user: fake, namespace: default}}]\n"
                "current-context: fake\n")
