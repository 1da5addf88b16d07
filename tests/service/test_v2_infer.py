"""The fast door (behind the gate, as served) against FastAPI's own routes for v2 infer and
/v1/embeddings: one implementation each, the same answers."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from service.api.gate import Gate
from service.api.rest import create_app
from service.api.door import FastDoor
from service.dataplane import DataPlane
from service.metrics import Metrics
from service.models import ModelManager
from service.settings import Settings


@pytest.fixture
async def clients(repo: Path):
    settings = Settings(repo=repo, threads=1, instances=1, max_body_bytes=4096)
    metrics = Metrics()
    models = ModelManager(settings, metrics)
    await models.refresh()
    dataplane = DataPlane(models, settings, metrics)
    app = create_app(dataplane, metrics)
    door = Gate(FastDoor(app, dataplane), metrics, settings.max_body_bytes, settings.body_timeout_s, None, False)
    async with (httpx.AsyncClient(transport=httpx.ASGITransport(app=door), base_url="http://door") as via_door,
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as via_app):
        yield via_door, via_app, metrics
    await models.close()


def _infer(texts: list[str]) -> dict:
    return {"id": "r1", "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}


@pytest.mark.parametrize("path, body, status", [
    ("/v2/models/emb/infer", _infer(["hello world", "a second text"]), 200),
    ("/v2/models/emb/versions/1/infer", _infer(["hello world"]), 200),
    ("/v2/models/emb/infer", {"inputs": [{"name": "img", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}, 400),
    ("/v2/models/nope/infer", _infer(["hello"]), 404),
    ("/v2/models/emb/versions/9/infer", _infer(["hello"]), 404),
    ("/v1/embeddings", {"model": "emb", "input": ["hello world", "a second text"]}, 200),
    ("/v1/embeddings", {"model": "emb", "input": "hello", "encoding_format": "base64", "dimensions": 8}, 200),
    ("/v1/embeddings", {"model": "emb", "input": [[101, 7592, 102]]}, 200),
    ("/v1/embeddings", {"model": "emb", "input": [1.5]}, 400),
    ("/v1/embeddings", {"model": "emb", "input": "x", "dimensions": 100000}, 400),
    ("/v1/embeddings", {"model": "nope", "input": "x"}, 404),
])
async def test_the_door_answers_as_the_fastapi_route_does(clients, path, body, status):
    via_door, via_app, _ = clients
    door, app = await via_door.post(path, json=body), await via_app.post(path, json=body)
    assert door.status_code == app.status_code == status
    assert door.headers["content-type"] == app.headers["content-type"]
    assert door.json() == app.json()


async def test_binary_extension_through_the_door(clients):
    via_door, via_app, _ = clients
    header = b'{"inputs":[{"name":"text","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":9}}],' \
             b'"outputs":[{"name":"embeddings","parameters":{"binary_data":true}}]}'
    body = header + (5).to_bytes(4, "little") + b"hello"
    headers = {"Inference-Header-Content-Length": str(len(header))}
    door = await via_door.post("/v2/models/emb/infer", content=body, headers=headers)
    app = await via_app.post("/v2/models/emb/infer", content=body, headers=headers)
    assert door.status_code == 200 and door.content == app.content
    assert door.headers["inference-header-content-length"] == app.headers["inference-header-content-length"]


async def test_other_routes_and_methods_pass_through(clients):
    via_door, _, _ = clients
    assert (await via_door.get("/v2/health/live")).json() == {"live": True}
    assert (await via_door.get("/v2/models/emb/infer")).status_code == 405  # FastAPI's answer


async def test_an_oversized_body_is_refused_and_counted(clients):
    via_door, _, metrics = clients
    response = await via_door.post("/v2/models/emb/infer", json=_infer(["x" * 5000]))
    assert response.status_code == 413 and "limit" in response.json()["error"]
    ok = await via_door.post("/v2/models/emb/infer", json=_infer(["fine"]))
    assert ok.status_code == 200
    assert metrics.requests.labels("emb", "1", "infer", "ok")._value.get() == 1
