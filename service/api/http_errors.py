"""The JSON error bodies of the REST port: the Open Inference Protocol's ``{"error": "..."}`` on the
v2 routes, OpenAI's ``{"error": {"message", "type", "code"}}`` on the /v1 routes."""

from __future__ import annotations

import orjson

from service.errors import HTTP_STATUS, ServiceError


def error_body(exc: ServiceError, path: str) -> tuple[int, bytes]:
    """(status, JSON body) for an error answered on ``path``."""
    status = HTTP_STATUS[exc.code]
    if path.startswith("/v1"):
        return status, orjson.dumps({"error": {"message": exc.message, "type": exc.code.value, "code": status}})
    return status, orjson.dumps({"error": exc.message})
