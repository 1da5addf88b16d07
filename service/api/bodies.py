"""Request bodies of the FastAPI routes: parsed by orjson, then a pydantic schema, errors naming the field."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import Request
from pydantic import ValidationError

from service.api.v2_infer import StrictBody
from service.errors import InvalidInput

Body = TypeVar("Body", bound=StrictBody)


async def parse_body(request: Request, schema: type[Body]) -> Body:
    return parse_json(await request.body(), schema)


def parse_json(raw: bytes, schema: type[Body]) -> Body:
    """The JSON body through orjson (lone surrogates and nesting past 1024 levels are a 400, where
    the standard library would accept the first and overflow the stack on the second), then the schema."""
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    try:
        return schema.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"{where}: {first['msg']}" if where else str(first["msg"])) from None


def documented(schema: type[StrictBody]) -> dict[str, Any]:
    """The OpenAPI request body of a route that parses its body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}
