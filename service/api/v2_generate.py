"""Triton's generate extension to the Open Inference Protocol: ``POST /v2/models/{m}[/versions/{v}]/generate``
answers ``{"model_name", "model_version", "text_output", "finish_reason"}`` once, and ``/generate_stream``
sends one server-sent event of that shape per delta (``text_output`` the new text; no ``[DONE]``,
as Triton sends none).

A request is ``{"text_input": "...", "parameters": {...}}`` with the sampling parameters of
``SamplingParams`` (greedy unless ``temperature`` is given) plus ``stream``, which the path already
decides and is therefore ignored. Errors are the protocol's ``{"error": "..."}`` with a 4xx/5xx
status before the first token, and one ``data: {"error": "..."}`` event after it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field

from service.api.bodies import documented, parse_body
from service.api.sse import EventStream, event
from service.api.v2_infer import StrictBody
from service.dataplane import DataPlane, Generation
from service.errors import ServiceError
from service.generation import Delta, SamplingParams

IGNORED_PARAMETERS = ("stream",)


class GenerateRequest(StrictBody):
    id: str | None = Field(None, max_length=128)
    text_input: str
    parameters: dict[str, Any] | None = None
    """Sampling: max_tokens, temperature, top_p, top_k, seed, repetition_penalty, stop, ignore_eos."""

    def sampling(self) -> SamplingParams:
        values = {k: v for k, v in (self.parameters or {}).items() if k not in IGNORED_PARAMETERS}
        return SamplingParams.parse(values, prefix="parameters.")


def answer(name: str, version: int, delta: Delta, text: str, request_id: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"model_name": name, "model_version": str(version), "text_output": text}
    if request_id is not None:
        out["id"] = request_id
    if delta.finish_reason is not None:
        out["finish_reason"] = delta.finish_reason
    return out


async def stream_events(generation: Generation, request_id: str | None) -> AsyncGenerator[bytes, None]:
    try:
        async for delta in generation.deltas:
            if delta.text or delta.finish_reason is not None:
                yield event(answer(generation.model, generation.version, delta, delta.text, request_id))
    except ServiceError as exc:
        yield event({"error": exc.message})


def router(dataplane: DataPlane) -> APIRouter:
    api = APIRouter()

    async def start(name: str, version: str | None, request: Request, endpoint: str
                    ) -> tuple[GenerateRequest, Generation]:
        body = await parse_body(request, GenerateRequest)
        generation = await dataplane.generate(name, version, prompt=body.text_input, params=body.sampling(),
                                              endpoint=endpoint)
        return body, generation

    @api.post("/v2/models/{name}/generate", openapi_extra=documented(GenerateRequest))
    @api.post("/v2/models/{name}/versions/{version}/generate", openapi_extra=documented(GenerateRequest))
    async def generate(name: str, request: Request, version: str | None = None) -> Response:
        body, generation = await start(name, version, request, "generate")
        text, last = await generation.collect()
        reply = answer(name, generation.version, last, text, body.id)
        return Response(orjson.dumps(reply), media_type="application/json")

    @api.post("/v2/models/{name}/generate_stream", openapi_extra=documented(GenerateRequest))
    @api.post("/v2/models/{name}/versions/{version}/generate_stream", openapi_extra=documented(GenerateRequest))
    async def generate_stream(name: str, request: Request, version: str | None = None) -> Response:
        body, generation = await start(name, version, request, "generate_stream")
        return EventStream(stream_events(generation, body.id), generation.aclose)

    return api
