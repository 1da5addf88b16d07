"""REST: the Open Inference Protocol (KServe v2) plus task endpoints people call by hand.

Thin: each route validates its body (pydantic), calls the data plane, and maps errors through
``service.errors.HTTP_STATUS``. Errors are JSON: ``{"error": "..."}`` on the v2 routes as the
protocol says, and OpenAI's ``{"error": {"message", "type", "code"}}`` on the /v1 routes.
"""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field

from service.api.v2_infer import InferResponse, StrictBody, answer_infer, error_reply
from service.dataplane import DataPlane
from service.errors import HTTP_STATUS, InvalidInput, ServiceError
from service.metrics import Metrics
from service.models import ModelManager

SERVER_NAME = "sampserve"
SERVER_VERSION = "0.1.0"


class FastJSONResponse(JSONResponse):
    """orjson, numpy arrays serialized natively: stdlib json of 384-float embeddings was a quarter of
    the event loop's time at 64 clients (py-spy, docs/benchmarks.md)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# ---------------------------------------------------------------- schemas (task endpoints)


class EmbeddingsRequest(StrictBody):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    truncate: bool = Field(False, description="Cut inputs longer than the model's limit instead of a 400.")


class ClassifyRequest(StrictBody):
    model: str
    texts: list[str]
    text_pairs: list[str] | None = None
    top_k: int = Field(1, ge=1)
    truncate: bool = False


class SimilarityRequest(StrictBody):
    model: str
    pairs: list[list[str]]
    truncate: bool = False


class RerankRequest(StrictBody):
    model: str
    query: str
    documents: list[str]
    top_n: int | None = Field(None, ge=1)
    truncate: bool = False


# ---------------------------------------------------------------- helpers


def _error(exc: ServiceError, openai_style: bool) -> Response:
    if openai_style:
        status = HTTP_STATUS[exc.code]
        return JSONResponse({"error": {"message": exc.message, "type": exc.code.value, "code": status}}, status)
    reply = error_reply(exc)  # the v2 shape, as the infer door writes it
    return Response(reply.body, reply.status, media_type=reply.content_type)


# ---------------------------------------------------------------- the app


def create_app(models: ModelManager, dataplane: DataPlane, metrics: Metrics) -> FastAPI:
    app = FastAPI(title="sampserve", version=SERVER_VERSION, default_response_class=FastJSONResponse,
                  description="Open Inference Protocol v2 and task endpoints over a SAMP model repository.")
    app.state.draining = False

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return _error(exc, request.url.path.startswith("/v1"))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(InvalidInput(f"{where}: {first.get('msg')}" if where else str(first.get("msg"))),
                      request.url.path.startswith("/v1"))

    observe = metrics.observe_request

    # -- health and metadata (v2) --

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = models.ready() and not app.state.draining
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": []}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict:
        loaded = models.get(name, version)
        state = models.models[name]
        width = "embeddings" if loaded.config.task == "matching" else "logits"
        return {
            "name": name,
            "versions": [str(v) for v in sorted(state.versions)],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]},
                       {"name": "text_pair", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": width, "datatype": "FP32", "shape": [-1, -1]}],
            "parameters": {"task": loaded.config.task, "max_length": loaded.head.max_length,
                           "instances": len(loaded.runtimes),
                           "failed_versions": {str(k): v for k, v in state.failed.items()}},
        }

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        try:
            models.get(name, version)
        except ServiceError as exc:
            if exc.code.value == "not_found" and name not in models.models:
                raise
            return JSONResponse({"name": name, "ready": False}, 503)
        return JSONResponse({"name": name, "ready": True}, 200)

    @app.post("/v2/models/{name}/infer", response_model=InferResponse)
    @app.post("/v2/models/{name}/versions/{version}/infer", response_model=InferResponse)
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        """JSON, or the binary tensor extension (what tritonclient sends): a JSON header of
        ``Inference-Header-Content-Length`` bytes followed by the raw tensor bytes. (The server
        sends these requests to ``answer_infer`` before FastAPI; this route documents the call
        and serves the app where it runs without that door.)"""
        reply = await answer_infer(dataplane, metrics, name, version, await request.body(),
                                   request.headers.get("inference-header-content-length"))
        return Response(reply.body, reply.status, reply.headers, media_type=reply.content_type)

    # -- task endpoints (v1) --

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": SERVER_NAME, "task": state.config.task,
             "versions": sorted(state.versions)} for name, state in sorted(models.models.items())]}

    @app.post("/v1/embeddings", response_model=dict)
    async def embeddings(body: EmbeddingsRequest) -> Response:
        start = time.perf_counter()
        texts = [body.input] if isinstance(body.input, str) else body.input
        try:
            result = await dataplane.embed(body.model, texts, body.truncate)
        except ServiceError as exc:
            observe(body.model, "", "embeddings", exc.code.value, start)
            raise
        observe(body.model, result.version, "embeddings", "ok", start)
        def encode(row: np.ndarray) -> np.ndarray | str:
            if body.encoding_format == "base64":  # what the openai client asks for by default
                return base64.b64encode(row.astype("<f4").tobytes()).decode()
            return row.astype(np.float32)

        return FastJSONResponse({"object": "list", "model": body.model, "data": [
            {"object": "embedding", "index": i, "embedding": encode(row)} for i, row in enumerate(result.values)],
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}})

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict:
        start = time.perf_counter()
        try:
            result, ranked = await dataplane.classify(body.model, body.texts, body.text_pairs, body.top_k,
                                                      body.truncate)
        except ServiceError as exc:
            observe(body.model, "", "classify", exc.code.value, start)
            raise
        observe(body.model, result.version, "classify", "ok", start)
        return {"model": body.model, "version": result.version, "results": [
            {"label": top[0][0], "score": top[0][1], "top_k": [{"label": lab, "score": s} for lab, s in top]}
            for top in ranked]}

    @app.post("/v1/similarity")
    async def similarity(body: SimilarityRequest) -> dict:
        start = time.perf_counter()
        try:
            result, scores = await dataplane.similarity(body.model, body.pairs, body.truncate)
        except ServiceError as exc:
            observe(body.model, "", "similarity", exc.code.value, start)
            raise
        observe(body.model, result.version, "similarity", "ok", start)
        return {"model": body.model, "version": result.version, "scores": scores}

    @app.post("/v1/rerank")
    async def rerank(body: RerankRequest) -> dict:
        start = time.perf_counter()
        try:
            result, ranked = await dataplane.rerank(body.model, body.query, body.documents, body.truncate)
        except ServiceError as exc:
            observe(body.model, "", "rerank", exc.code.value, start)
            raise
        observe(body.model, result.version, "rerank", "ok", start)
        ranked = ranked[: body.top_n] if body.top_n else ranked
        return {"model": body.model, "version": result.version, "results": [
            {"index": i, "score": s, "document": body.documents[i]} for i, s in ranked]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
