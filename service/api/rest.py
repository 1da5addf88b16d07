"""REST: the Open Inference Protocol (KServe v2) with Triton's generate extension, plus task endpoints
people call by hand and OpenAI's completions (service.api.openai, service.api.v2_generate).

Thin: each route parses its body (orjson, then a pydantic schema), calls the data plane, and maps
its errors through ``service.api.http_errors``. Limits, access and request ids are the gate's
(``service.api.gate``), in front of every route. Errors are JSON: ``{"error": "..."}`` on the v2 routes as the
protocol says, and OpenAI's ``{"error": {"message", "type", "code"}}`` on the /v1 routes.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field

from service.api import openai, repository, v2_generate
from service.api.bodies import documented, parse_body
from service.api.embeddings import EmbeddingsRequest, answer_embeddings
from service.api.http_errors import error_body
from service.api.v2_infer import InferRequest, InferResponse, StrictBody, answer_infer
from service.dataplane import EXTENSIONS, DataPlane
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


class RerankDocument(StrictBody):
    text: str


class RerankRequest(StrictBody):
    """Cohere's and Jina's rerank body (what vLLM and KServe's Hugging Face runtime accept)."""

    model: str
    query: str
    documents: list[str | RerankDocument] = Field(description="Texts, or objects with a 'text' field.")
    top_n: int | None = Field(None, ge=1, description="Return only the best top_n results.")
    return_documents: bool = Field(False, description="Echo each result's document as {'text': ...}.")
    truncate: bool = False

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class TokenizeRequest(StrictBody):
    """vLLM's tokenize body."""

    model: str
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(StrictBody):
    model: str
    tokens: list[int]


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
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

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
    app.include_router(repository.router(dataplane))

    # -- task endpoints (v1) --

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "owned_by": SERVER_NAME,
             "task": state.config.task if state.config else None, "versions": sorted(state.versions),
             **({"ready": False, "reason": state.reason()} if not state.versions else {"ready": True})}
            for name, state in sorted(models.models.items())]}

    @app.post("/v1/embeddings", response_model=dict, openapi_extra=documented(EmbeddingsRequest))
    async def embeddings_route(request: Request) -> Response:
        """OpenAI's embeddings (the server sends these requests to ``answer_embeddings`` before FastAPI;
        this route documents the call and serves the app where it runs without that door)."""
        reply = await answer_embeddings(dataplane, await request.body())
        return Response(reply.body, reply.status, reply.headers, media_type=reply.content_type)

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
    @app.post("/v2/rerank", openapi_extra=documented(RerankRequest))
    @app.post("/rerank", openapi_extra=documented(RerankRequest))
    async def rerank(request: Request) -> dict:
        body = await parse_body(request, RerankRequest)
        documents = body.texts()
        result, ranked = await dataplane.rerank(body.model, body.query, documents, body.truncate)
        ranked = ranked[: body.top_n] if body.top_n else ranked
        results: list[dict[str, Any]] = [
            {"index": i, "relevance_score": score, **({"document": {"text": documents[i]}} if body.return_documents
                                                      else {})} for i, score in ranked]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": body.model, "version": result.version,
                "results": results, "usage": {"total_tokens": result.tokens},
                "meta": {"billed_units": {"search_units": 1}}}

    @app.post("/tokenize", openapi_extra=documented(TokenizeRequest))
    async def tokenize(request: Request) -> dict:
        body = await parse_body(request, TokenizeRequest)
        ids, strings, limit = await dataplane.tokenize(body.model, body.prompt, body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": limit,
                **({"token_strs": strings} if body.return_token_strs else {})}

    @app.post("/detokenize", openapi_extra=documented(DetokenizeRequest))
    async def detokenize(request: Request) -> dict:
        body = await parse_body(request, DetokenizeRequest)
        return {"prompt": dataplane.detokenize(body.model, body.tokens)}

    if serve_metrics:
        @app.get("/metrics")
        async def prometheus() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
