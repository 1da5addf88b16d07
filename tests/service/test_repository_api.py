"""The v2 model repository extension with tritonclient over HTTP and gRPC: index, load, unload under
explicit model control (key required), and refused in the default poll mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.servers import start_server

KEY = "repo-test-key"


def auth() -> dict[str, str]:
    """A fresh header dict each call: tritonclient.http adds its own headers (ints) to the dict it is given."""
    return {"authorization": f"Bearer {KEY}"}


def _index(client, **kwargs) -> dict[str, list[tuple[str, str]]]:
    """{model: [(version, state), ...]} from tritonclient.http's index."""
    rows: dict[str, list[tuple[str, str]]] = {}
    for row in client.get_model_repository_index(**kwargs):
        rows.setdefault(row["name"], []).append((row.get("version", ""), row["state"]))
    return rows


def _embed(client, headers: dict) -> np.ndarray:
    import tritonclient.http as triton_http

    tensor = triton_http.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"a repository test"], dtype=object))
    return client.infer("emb", [tensor], headers=headers).as_numpy("embeddings")


def _broken_model(repo: Path) -> None:
    """A model folder whose only version's weights do not match its manifest."""
    shutil.copytree(repo / "emb", repo / "broken")
    config = json.loads((repo / "broken" / "config.json").read_text())
    (repo / "broken" / "config.json").write_text(json.dumps({**config, "name": "broken"}))
    with open(repo / "broken" / "1" / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00corrupt\x00")


def test_explicit_mode_loads_and_unloads_through_tritonclient_http_and_grpc(private_repo):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    _broken_model(private_repo)
    server = start_server(private_repo, "--model-control-mode", "explicit", "--load-models", "topics",
                          env={"SAMPSERVE_API_KEY": KEY})
    http = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    grpc = triton_grpc.InferenceServerClient(server.grpc_target)
    try:
        assert "model_repository" in server.http.get("/v2", headers=auth()).json()["extensions"]
        # the key guards the index and both mutations, on both transports
        with pytest.raises(InferenceServerException, match=r"401|Bearer"):
            http.get_model_repository_index()
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            grpc.load_model("emb")
        assert not http.is_model_ready("emb", headers=auth())

        # at start: topics (asked for) is ready; emb waits for a load call, with the reason
        index = _index(http, headers=auth())
        assert index["topics"] == [("1", "READY")] and index["emb"] == [("", "UNAVAILABLE")]
        assert index["broken"] == [("", "UNAVAILABLE")]
        reason = server.http.get("/v2/models/emb/ready", headers=auth()).json()["reason"]
        assert "explicit" in reason and "load" in reason
        assert server.http.post("/v2/models/emb/infer", headers=auth(), json={"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}).status_code == 503

        http.load_model("emb", headers=auth())
        assert http.is_model_ready("emb", headers=auth())
        assert _embed(http, auth()).shape[0] == 1
        assert _index(http, headers=auth(), query_params=None)["emb"] == [("1", "READY")]
        ready_only = grpc.get_model_repository_index(headers=auth(), as_json=True)["models"]
        assert {m["name"] for m in ready_only if m.get("state") == "READY"} == {"emb", "topics"}

        grpc.unload_model("emb", headers=auth(), unload_dependents=True)
        assert not grpc.is_model_ready("emb", headers=auth())
        assert _index(http, headers=auth())["emb"] == [("", "UNAVAILABLE")]
        grpc.load_model("emb", headers=auth())  # and back, over gRPC
        assert grpc.is_model_ready("emb", headers=auth())

        # a model whose version fails: the load call fails with the reason, and the index keeps it
        with pytest.raises(InferenceServerException, match=r"did not load.*model\.onnx") as failed:
            http.load_model("broken", headers=auth())
        assert failed.value.status() == "409"
        with pytest.raises(InferenceServerException, match="FAILED_PRECONDITION"):
            grpc.load_model("broken", headers=auth())
        assert _index(http, headers=auth())["broken"] == [("1", "UNAVAILABLE")]
        assert http.is_server_ready(headers=auth())  # a failed load does not take the server out of rotation

        # what this server cannot do is refused by name, before any work
        with pytest.raises(InferenceServerException, match="not in the repository") as missing:
            http.load_model("nope", headers=auth())
        assert missing.value.status() == "404"
        with pytest.raises(InferenceServerException, match="config and file: overrides"):
            http.load_model("emb", headers=auth(), config='{"backend": "python"}')
        with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
            grpc.load_model("emb", headers=auth(), files={"file:1/model.onnx": b"x"}, config="{}")
        bad = server.http.post("/v2/repository/models/emb/unload", headers=auth(), json={"parameters": {"x": 1}})
        assert bad.status_code == 400 and "unknown 'x'" in bad.json()["error"]
        assert server.http.post("/v2/repository/index", headers=auth(), content=b"{").status_code == 400
    finally:
        http.close()
        grpc.close()
        assert server.stop() == 0


def test_poll_mode_serves_the_index_and_refuses_load_and_unload(server):
    import tritonclient.grpc as triton_grpc
    import tritonclient.http as triton_http
    from tritonclient.utils import InferenceServerException

    http = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
    grpc = triton_grpc.InferenceServerClient(server.grpc_target)
    try:
        assert _index(http) == {"emb": [("1", "READY")], "topics": [("1", "READY")]}
        assert len(grpc.get_model_repository_index().models) == 2
        with pytest.raises(InferenceServerException, match="explicit") as refused:
            http.unload_model("emb")
        assert refused.value.status() == "403"
        with pytest.raises(InferenceServerException, match="PERMISSION_DENIED"):
            grpc.load_model("emb")
        assert http.is_model_ready("emb")  # nothing changed
    finally:
        http.close()
        grpc.close()


def test_explicit_mode_needs_a_key_and_load_models_needs_explicit_mode():
    with pytest.raises(ValidationError, match="needs api_key"):
        Settings(model_control_mode="explicit")
    with pytest.raises(ValidationError, match="load_models applies"):
        Settings(load_models=["emb"])
    assert Settings(model_control_mode="explicit", api_key="k", load_models=["*"]).load_models == ["*"]
