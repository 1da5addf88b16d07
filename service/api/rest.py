"""REST: the Open Inference Protocol (KServe v2) with Triton's generate extension, plus task endpoints
people call by hand and OpenAI's completions (service.api.openai, service.api.v2_generate).

Thin: each route parses its body (orjson, then a pydantic schema), calls the data plane, and maps
its errors through ``service.api.http_errors``. Limits, access and request ids are the gate's
(``service.api.gate``), in front of every route. Errors are JSON: ``{"error": "..."}`` on the v2 routes as the
protocol says, and OpenAI's ``{"error": {"message", "type", "code"}}`` on the /v1 routes.
"""

from __future__ import annotations

import base64
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field

from service.api import openai, v2_generate
from service.api.bodies import documented, parse_body
from service.api.http_errors import error_body
from service.api.v2_infer import InferRequest, InferResponse, StrictBody, answer_infer
from service.dataplane import DataPlane
from service.errors import InvalidInput, ServiceError
from service.metrics import Metrics

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


# ---------------------------------------------------------------- the app


def create_app(dataplane: DataPlane, metrics: Metrics, serve_metrics: bool = True, docs: bool = True) -> FastAPI:
    models = dataplane.models
    app = FastAPI(title="sampserve", version=SERVER_VERSION, default_response_class=FastJSONResponse,
                  description="Open Inference Protocol v2 and task endpoints over a SAMP model repository.",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        status, body = error_body(exc, request.url.path)
        return Response(body, status, media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        status, body = error_body(InvalidInput(f"{where}: {first.get('msg')}" if where else str(first.get("msg"))),
                                  request.url.path)
        return Response(body, status, media_type="application/json")

    # -- health and metadata (v2) --

    @app.get("/v2/health/live")
    async def live() -> JSONResponse:
        ok, reason = dataplane.live()
        return JSONResponse({"live": ok, **({"reason": reason} if reason else {})}, 200 if ok else 503)

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = dataplane.ready()
        return JSONResponse({"ready": ok}, 200 if ok else 503)

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": []}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict:
        return asdict(dataplane.model_metadata(name, version))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> JSONResponse:
        ok, reason = dataplane.model_ready(name, version)
        return JSONResponse({"name": name, "ready": ok, **({"reason": reason} if reason else {})},
                            200 if ok else 503)

    @app.post("/v2/models/{name}/infer", response_model=InferResponse, openapi_extra=documented(InferRequest))
    @app.post("/v2/models/{name}/versions/{version}/infer", response_model=InferResponse,
              openapi_extra=documented(InferRequest))
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        """JSON, or the binary tensor extension (what tritonclient sends): a JSON header of
        ``Inference-Header-Content-Length`` bytes followed by the raw tensor bytes. (The server
        sends these requests to ``answer_infer`` before FastAPI; this route documents the call
        and serves the app where it runs without that door.)"""
        reply = await answer_infer(dataplane, name, version, await request.body(),
                                   request.headers.get("inference-header-content-length"))
        return Response(reply.body, reply.status, reply.headers, media_type=reply.content_type)

    # -- text generation: Triton's generate extension (v2) and OpenAI's completions (v1) --

    app.include_router(v2_generate.router(dataplane))
    app.include_router(openai.router(dataplane))

    # -- task endpoints (v1) --

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": SERVER_NAME,
             "task": state.config.task if state.config else None, "versions": sorted(state.versions),
             **({"ready": False, "reason": state.reason()} if not state.versions else {"ready": True})}
            for name, state in sorted(models.models.items())]}

    @app.post("/v1/embeddings", response_model=dict, openapi_extra=documented(EmbeddingsRequest))
    async def embeddings(request: Request) -> Response:
        body = await parse_body(request, EmbeddingsRequest)
        texts = [body.input] if isinstance(body.input, str) else body.input
        result = await dataplane.embed(body.model, texts, body.truncate)

        def encode(row: np.ndarray) -> np.ndarray | str:
            if body.encoding_format == "base64":  # what the openai client asks for by default
                return base64.b64encode(row.astype("<f4").tobytes()).decode()
            return row.astype(np.float32)

        return FastJSONResponse({"object": "list", "model": body.model, "data": [
            {"object": "embedding", "index": i, "embedding": encode(row)} for i, row in enumerate(result.values)],
            "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}})

    @app.post("/v1/classify", openapi_extra=documented(ClassifyRequest))
    async def classify(request: Request) -> dict:
        body = await parse_body(request, ClassifyRequest)
        result, ranked = await dataplane.classify(body.model, body.texts, body.text_pairs, body.top_k, body.truncate)
        return {"model": body.model, "version": result.version, "results": [
            {"label": top[0][0], "score": top[0][1], "top_k": [{"label": lab, "score": s} for lab, s in top]}
            for top in ranked]}

    @app.post("/v1/similarity", openapi_extra=documented(SimilarityRequest))
    async def similarity(request: Request) -> dict:
        body = await parse_body(request, SimilarityRequest)
        result, scores = await dataplane.similarity(body.model, body.pairs, body.truncate)
        return {"model": body.model, "version": result.version, "scores": scores}

    @app.post("/v1/rerank", openapi_extra=documented(RerankRequest))
    async def rerank(request: Request) -> dict:
        body = await parse_body(request, RerankRequest)
        result, ranked = await dataplane.rerank(body.model, body.query, body.documents, body.truncate)
        ranked = ranked[: body.top_n] if body.top_n else ranked
        return {"model": body.model, "version": result.version, "results": [
            {"index": i, "score": s, "document": body.documents[i]} for i, s in ranked]}

    if serve_metrics:
        @app.get("/metrics")
        async def prometheus() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
