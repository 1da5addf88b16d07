"""The Open Inference Protocol's HTTP infer call: its schemas and one function that answers it
(``answer_infer``), called by the fast door (``service.api.door``) and by FastAPI's route alike.

Bodies are JSON, or the binary tensor extension (what tritonclient sends): a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw tensor bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.http_errors import error_body
from service.dataplane import MAX_DIMS, DataPlane, TensorInput
from service.errors import InvalidInput, ServiceError
from service.tensors import decode_bytes_elements


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


def parse_infer_request(raw: bytes, header_length: str | None) -> tuple[InferRequest, list[TensorInput], bool]:
    """A v2 infer body, JSON or binary-extension -> the request, its input tensors (decoded only
    once the data plane has checked their size) and whether to answer in binary."""
    try:
        split = int(header_length) if header_length is not None else len(raw)
    except ValueError:
        raise InvalidInput("Inference-Header-Content-Length must be an integer") from None
    if not 0 <= split <= len(raw):
        raise InvalidInput("Inference-Header-Content-Length is larger than the body")
    try:
        payload = orjson.loads(raw[:split])  # rejects lone surrogates and nesting past 1024 levels
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    try:
        body = InferRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    binary = memoryview(raw)[split:]
    offset = 0
    tensors = []
    for tensor in body.inputs:
        size = (tensor.parameters or {}).get("binary_data_size")
        if size is None:
            tensors.append(_json_tensor(tensor))
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise InvalidInput(f"inputs.{tensor.name[:64]}: binary_data_size {size} does not fit the body")
        tensors.append(_binary_tensor(tensor, binary[offset : offset + size]))
        offset += size
    wants_binary = bool((body.parameters or {}).get("binary_data_output")) or any(
        (o.parameters or {}).get("binary_data") for o in body.outputs or [])
    return body, tensors, wants_binary


def _json_tensor(tensor: RequestInput) -> TensorInput:
    where = f"inputs.{tensor.name[:64]}"
    if tensor.data is None:
        raise InvalidInput(f"{where}: data is missing (give data, or binary_data_size with the binary extension)")
    flat = _flatten(tensor.data, where)

    def decode(limit: int) -> list[Any]:
        if len(flat) != limit:
            raise InvalidInput(f"{where}: shape {tensor.shape} holds {limit} elements, data has {len(flat)}")
        if any(not isinstance(v, str) for v in flat):
            raise InvalidInput(f"{where}: BYTES data must be strings")
        return flat

    return TensorInput(tensor.name, tensor.datatype, tensor.shape, decode, values=flat)


def _binary_tensor(tensor: RequestInput, blob: memoryview) -> TensorInput:
    where = f"inputs.{tensor.name[:64]}"
    return TensorInput(tensor.name, tensor.datatype, tensor.shape,
                       lambda limit: decode_bytes_elements(blob, where, limit), raw=blob)


def _flatten(data: list[Any], where: str) -> list[Any]:
    """Nested lists (row-major, as the protocol allows) to one list; at most MAX_DIMS levels deep."""
    out: list[Any] = []
    stack: list[tuple[Any, int]] = [(value, 1) for value in reversed(data)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, list):
            if depth >= MAX_DIMS:
                raise InvalidInput(f"{where}: data is nested deeper than {MAX_DIMS} levels")
            stack.extend((inner, depth + 1) for inner in reversed(value))
        else:
            out.append(value)
    return out


# ---------------------------------------------------------------- the call


@dataclass
class Reply:
    """An HTTP answer, whichever door the request came in by."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(exc: ServiceError, path: str = "/v2") -> Reply:
    """The protocol's error shape: ``{"error": "..."}`` with the status of the error's code."""
    status, body = error_body(exc, path)
    return Reply(status, body)


async def answer_infer(dataplane: DataPlane, name: str, version: str | None, raw: bytes,
                       header_length: str | None) -> Reply:
    """One v2 infer request, parsed, run through the data plane, answered (errors included)."""
    try:
        body, tensors, binary_out = parse_infer_request(raw, header_length)
        truncate = bool((body.parameters or {}).get("truncate", False))
        result = await dataplane.infer(name, version, tensors, truncate)
    except ServiceError as exc:
        return error_reply(exc)
    values = result.values.astype(np.float32)
    header: dict[str, Any] = {"model_name": name, "model_version": str(result.version),
                              "outputs": [{"name": result.output_name, "shape": list(values.shape),
                                           "datatype": "FP32"}]}
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
