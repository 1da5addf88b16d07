"""The Open Inference Protocol's model repository extension over REST, in Triton's and MLServer's shape
(what tritonclient's ``get_model_repository_index``, ``load_model`` and ``unload_model`` send):

- ``POST /v2/repository/index`` (body empty or ``{"ready": bool}``) answers
  ``[{"name", "version", "state", "reason"}]``, READY or UNAVAILABLE per version;
- ``POST /v2/repository/models/{m}/load`` and ``/unload`` (body empty or ``{"parameters": {...}}``)
  answer 200 with an empty body, or the protocol's ``{"error": "..."}``.

The index is read-only and always served; load and unload need model control mode explicit, which
needs an API key (``service.settings``). The policy lives in ``ModelManager``; this module only
converts bodies.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field

from service.api.bodies import documented, parse_json
from service.api.v2_infer import StrictBody
from service.dataplane import DataPlane


class IndexRequest(StrictBody):
    ready: bool = False
    """Only the versions ready for inference."""


class ControlRequest(StrictBody):
    parameters: dict[str, Any] = Field(default_factory=dict)


Body = TypeVar("Body", bound=StrictBody)


async def _optional_body(request: Request, schema: type[Body]) -> Body:
    """tritonclient sends the index request with an empty body: empty means the defaults."""
    raw = await request.body()
    return parse_json(raw if raw.strip() else b"{}", schema)


def router(dataplane: DataPlane) -> APIRouter:
    routes = APIRouter()

    @routes.post("/v2/repository/index", openapi_extra=documented(IndexRequest))
    async def index(request: Request) -> list[dict[str, str]]:
        body = await _optional_body(request, IndexRequest)
        return [{"name": e.name, **({"version": e.version} if e.version else {}), "state": e.state,
                 "reason": e.reason} for e in dataplane.repository_index(body.ready)]

    @routes.post("/v2/repository/models/{name}/load", openapi_extra=documented(ControlRequest))
    async def load(name: str, request: Request) -> Response:
        body = await _optional_body(request, ControlRequest)
        await dataplane.load_model(name, body.parameters)
        return Response(status_code=200)

    @routes.post("/v2/repository/models/{name}/unload", openapi_extra=documented(ControlRequest))
    async def unload(name: str, request: Request) -> Response:
        body = await _optional_body(request, ControlRequest)
        await dataplane.unload_model(name, body.parameters)
        return Response(status_code=200)

    return routes
