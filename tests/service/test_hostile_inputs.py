"""Malformed input on both ports gets a clear client error, never a 500 or INTERNAL: lone surrogates,
JSON nested past any sane depth, invalid UTF-8 inside protobuf strings, unknown versions."""

from __future__ import annotations

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

LONE_SURROGATE = b'{"model": "emb", "input": "hello \\ud800 world"}'


@pytest.mark.parametrize("path, body", [
    ("/v1/embeddings", LONE_SURROGATE),
    ("/v2/models/emb/infer", b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\\udfff"]}]}'),
    ("/v1/embeddings", b'{"model": "emb", "input": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    ("/v2/models/emb/infer", b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": '
     + b"[" * 900 + b'"x"' + b"]" * 900 + b"}]}"),
    ("/v1/classify", b'{"model": "topics", "texts": ["ok"], "top_k": ' + b"[" * 2000 + b"]" * 2000 + b"}"),
])
def test_malformed_json_is_a_400_with_a_json_error(server, path, body):
    response = server.http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["message"] if isinstance(error, dict) else error)


def _field(number: int, value: bytes) -> bytes:
    """A length-delimited protobuf field, written by hand: protobuf itself refuses invalid UTF-8."""
    return bytes([number << 3 | 2, len(value)]) + value


@pytest.mark.parametrize("message", [
    _field(1, b"\xff\xfe"),  # model_name: not UTF-8
    _field(1, b"emb") + _field(2, b"\xed\xa0\x80"),  # model_version: a UTF-8-encoded surrogate
    b"\x0a\xff\xff\xff\xff\x0f",  # a length running past the message
])
def test_malformed_protobuf_is_invalid_argument(server, message):
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=lambda raw: raw,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        with pytest.raises(grpc.RpcError) as caught:
            call(message, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "malformed request message" in caught.value.details()


def test_readiness_of_an_unknown_version_is_404_and_of_a_known_model_200(server):
    assert server.http.get("/v2/models/emb/versions/1/ready").status_code == 200
    assert server.http.get("/v2/models/emb/versions/77/ready").status_code == 404
    assert server.http.get("/v2/models/emb/versions/x/ready").status_code == 404
    assert server.http.get("/v2/models/nope/ready").status_code == 404
