"""OpenAI's embeddings call (``POST /v1/embeddings``): its body schema and one function that answers
it, whichever way the request came in (the fast door in ``service.api.door``, or FastAPI's route,
which documents it and serves apps built without the door)."""

from __future__ import annotations

import base64
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import Field, field_validator

from service.api.bodies import parse_json
from service.api.v2_infer import Reply, StrictBody, error_reply
from service.dataplane import DataPlane
from service.errors import ServiceError

PATH = "/v1/embeddings"


class EmbeddingsRequest(StrictBody):
    """OpenAI's embeddings body: ``input`` is a string, a list of strings, a list of token ids or a list
    of lists of token ids (ids of the model's own vocabulary, as POST /tokenize returns them)."""

    model: str
    input: str | list[str] | list[list[int]] = Field(
        description="A string, a list of strings, a list of token ids, or a list of lists of token ids.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="Keep the first this many components, normalized again.")
    user: str | None = Field(None, description="Accepted and ignored.")
    truncate: bool = Field(False, description="Cut inputs longer than the model's limit instead of a 400.")

    @field_validator("input", mode="before")
    @classmethod
    def _one_shape(cls, value: Any) -> Any:
        """One of the four shapes, token ids as rows; anything else is one clear message."""
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            if all(isinstance(v, str) for v in value):
                return value
            if all(_is_id(v) for v in value):
                return [value]  # one input given as its token ids
            if all(isinstance(v, list) and v and all(_is_id(t) for t in v) for v in value):
                return value
        raise ValueError("must be a string, a list of strings, a list of token ids (integers) or a list of "
                         "non-empty lists of token ids")

    def texts_or_ids(self) -> tuple[list[str], list[list[int]] | None]:
        if isinstance(self.input, str):
            return [self.input], None
        if self.input and isinstance(self.input[0], list):
            return [], self.input  # type: ignore[return-value]
        return self.input, None  # type: ignore[return-value]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


async def answer_embeddings(dataplane: DataPlane, raw: bytes) -> Reply:
    """One embeddings request, parsed, run through the data plane, answered (errors in OpenAI's shape)."""
    try:
        body = parse_json(raw, EmbeddingsRequest)
        texts, token_ids = body.texts_or_ids()
        result = await dataplane.embed(body.model, texts, body.truncate, token_ids=token_ids,
                                       dimensions=body.dimensions)
    except ServiceError as exc:
        return error_reply(exc, PATH)
    rows = result.values.astype(np.float32)
    if body.encoding_format == "base64":  # what the openai client asks for by default
        data: list[dict[str, Any]] = [{"object": "embedding", "index": i, "embedding": base64.b64encode(
            row.astype("<f4").tobytes()).decode()} for i, row in enumerate(rows)]
    else:
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    return Reply(200, orjson.dumps({"object": "list", "model": body.model, "data": data, "usage": {
        "prompt_tokens": result.tokens, "total_tokens": result.tokens}}, option=orjson.OPT_SERIALIZE_NUMPY))
