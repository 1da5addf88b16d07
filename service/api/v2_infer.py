"""The Open Inference Protocol's HTTP infer call: its schemas, one function that answers it, and a
raw ASGI door in front of FastAPI that sends infer requests straight to that function.

Why a door: at 64 clients on 2 cores, FastAPI's routing, dependency and middleware layers took 43%
of the event loop's CPU per infer request (2.8 vs 1.6 s per 12 s run), and that CPU is taken from
the model: with the door the server answered 12% more requests/s (docs/benchmarks.md). Every other
route (health, metadata, /v1, /metrics, the OpenAPI document) stays in FastAPI, whose infer route
calls the same ``answer_infer``, so there is one implementation of the call.

Bodies are JSON, or the binary tensor extension (what tritonclient sends): a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw tensor bytes.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.dataplane import DataPlane
from service.errors import HTTP_STATUS, InvalidInput, PayloadTooLarge, ServiceError
from service.metrics import Metrics
from service.tensors import decode_bytes_elements

log = logging.getLogger("sampserve")

# ---------------------------------------------------------------- schemas


class StrictBody(BaseModel):
    """Request bodies refuse unknown fields: a misspelt field is a 400, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class RequestInput(StrictBody):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(None, description="Absent when the binary extension carries the tensor.")


class RequestOutput(StrictBody):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(StrictBody):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


# ---------------------------------------------------------------- parsing


def parse_infer_request(raw: bytes, header_length: str | None, max_bytes: int) -> tuple[InferRequest, bool]:
    """A v2 infer body, JSON or binary-extension -> the request and whether to answer in binary."""
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"request body of {len(raw)} bytes exceeds the {max_bytes}-byte limit "
                              "(SAMPSERVE_MAX_BODY_BYTES)")
    try:
        split = int(header_length) if header_length is not None else len(raw)
    except ValueError:
        raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
    if not 0 <= split <= len(raw):
        raise InvalidInput("Inference-Header-Content-Length is larger than the body")
    try:
        payload = orjson.loads(raw[:split])
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    try:
        body = InferRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    binary = raw[split:]
    offset = 0
    for tensor in body.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidInput(f"inputs.{tensor.name}: binary_data_size {size} does not fit the body")
        tensor.data = decode_bytes_elements(binary[offset : offset + size], f"inputs.{tensor.name}")
        offset += size
    wants_binary = bool((body.parameters or {}).get("binary_data_output")) or any(
        (o.parameters or {}).get("binary_data") for o in body.outputs or [])
    return body, wants_binary


def text_tensors(request: InferRequest) -> tuple[list[str], list[str] | None]:
    """The BYTES input ``text`` (and optional ``text_pair``) of a v2 request, validated."""
    tensors = {t.name: t for t in request.inputs}
    if not request.inputs:
        raise InvalidInput("inputs: give a BYTES tensor named 'text'")
    unknown = set(tensors) - {"text", "text_pair"}
    if unknown:
        raise InvalidInput(f"inputs: unknown tensor(s) {sorted(unknown)}; this model takes 'text' (and 'text_pair')")
    if "text" not in tensors:
        raise InvalidInput("inputs: the BYTES tensor 'text' is missing")
    values = {name: _bytes_values(tensor) for name, tensor in tensors.items()}
    pairs = values.get("text_pair")
    if pairs is not None and len(pairs) != len(values["text"]):
        raise InvalidInput("inputs: 'text_pair' must have as many elements as 'text'")
    return values["text"], pairs


def _bytes_values(tensor: RequestInput) -> list[str]:
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"inputs.{tensor.name}: datatype must be BYTES, got {tensor.datatype}")
    if any(d < 0 for d in tensor.shape) or not tensor.shape:
        raise InvalidInput(f"inputs.{tensor.name}: shape {tensor.shape} must be non-negative, e.g. [n] or [n, 1]")
    if tensor.data is None:
        raise InvalidInput(f"inputs.{tensor.name}: data is missing (give data, or binary_data_size with the binary "
                           "extension)")
    count = math.prod(tensor.shape)
    flat = _flatten(tensor.data)
    if count != len(flat):
        raise InvalidInput(f"inputs.{tensor.name}: shape {tensor.shape} holds {count} elements, data has {len(flat)}")
    if any(not isinstance(v, str) for v in flat):
        raise InvalidInput(f"inputs.{tensor.name}: BYTES data must be strings")
    return flat


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for value in data:
        out.extend(_flatten(value) if isinstance(value, list) else [value])
    return out


# ---------------------------------------------------------------- the call


@dataclass
class Reply:
    """An HTTP answer, whichever door the request came in by."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(exc: ServiceError) -> Reply:
    """The protocol's error shape: ``{"error": "..."}`` with the status of the error's code."""
    return Reply(HTTP_STATUS[exc.code], orjson.dumps({"error": exc.message}))


async def answer_infer(dataplane: DataPlane, metrics: Metrics, name: str, version: str | None, raw: bytes,
                       header_length: str | None) -> Reply:
    """One v2 infer request, parsed, run through the data plane, answered (errors included)."""
    start = time.perf_counter()
    try:
        body, binary_out = parse_infer_request(raw, header_length, dataplane.settings.max_body_bytes)
        texts, pairs = text_tensors(body)
        result = await dataplane.forward(name, version, texts, pairs,
                                         truncate=bool((body.parameters or {}).get("truncate", False)))
    except ServiceError as exc:
        metrics.observe_request(name, version or "", "infer", exc.code.value, start)
        return error_reply(exc)
    metrics.observe_request(name, result.version, "infer", "ok", start)
    values = result.values.astype(np.float32)
    output = "embeddings" if result.head.task == "matching" else "logits"
    header: dict[str, Any] = {"model_name": name, "model_version": str(result.version),
                              "outputs": [{"name": output, "shape": list(values.shape), "datatype": "FP32"}]}
    if body.id is not None:
        header["id"] = body.id
    if not binary_out:
        header["outputs"][0]["data"] = values.ravel()
        return Reply(200, orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY))
    blob = values.astype("<f4").tobytes()
    header["outputs"][0]["parameters"] = {"binary_data_size": len(blob)}
    encoded = orjson.dumps(header)
    return Reply(200, encoded + blob, "application/octet-stream",
                 {"Inference-Header-Content-Length": str(len(encoded))})


# ---------------------------------------------------------------- the door

_INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")


class InferDoor:
    """ASGI: POSTs to the v2 infer paths go to ``answer_infer``; everything else to ``app``."""

    def __init__(self, app: Any, dataplane: DataPlane, metrics: Metrics) -> None:
        self.app, self.dataplane, self.metrics = app, dataplane, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        match = _INFER_PATH.match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if match is None:
            await self.app(scope, receive, send)
            return
        try:
            reply = await self._answer(match["name"], match["version"], scope, receive)
        except Exception:  # what the framework's error middleware would do: a 500, logged, never a crash
            log.exception("infer request failed")
            reply = Reply(500, orjson.dumps({"error": "internal error; see the server log"}))
        headers = [(b"content-type", reply.content_type.encode()), (b"content-length", str(len(reply.body)).encode()),
                   *((k.lower().encode(), v.encode()) for k, v in reply.headers.items())]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def _answer(self, name: str, version: str | None, scope: dict, receive: Any) -> Reply:
        limit = self.dataplane.settings.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return Reply(499, b"")  # the client has gone; nothing will read the answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # refuse before reading the rest
                return error_reply(PayloadTooLarge(f"request body exceeds the {limit}-byte limit "
                                                   "(SAMPSERVE_MAX_BODY_BYTES)"))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        header_length = next((v.decode("latin-1") for k, v in scope["headers"]
                              if k == b"inference-header-content-length"), None)
        return await answer_infer(self.dataplane, self.metrics, name, version, b"".join(chunks), header_length)
