"""gRPC with real clients: tritonclient.grpc, the standard health service, reflection, our tasks."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.grpc_gen import sampserve_pb2 as tasks_pb
from service.api.grpc_gen import sampserve_pb2_grpc as tasks_grpc

from .conftest import _direct, assert_same_rows


def test_tritonclient_grpc_infer(server, repo):
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(server.grpc_target)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("emb")
    assert client.get_server_metadata().name == "sampserve"
    assert client.get_model_metadata("emb").inputs[0].datatype == "BYTES"
    texts = ["Could not open the file.", "commit your changes before merging", "ok"]
    tensor = triton.InferInput("text", [3], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    result = client.infer("emb", [tensor])
    assert_same_rows(result.as_numpy("embeddings"), _direct(repo, "emb", texts))


def test_grpc_errors_have_the_right_status(server):
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(server.grpc_target)
    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"x"], dtype=object))
    with pytest.raises(InferenceServerException, match="NOT_FOUND"):
        client.infer("nope", [tensor])
    wrong = triton.InferInput("text", [1], "FP32")
    wrong.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
        client.infer("emb", [wrong])


def test_health_reflection_and_tasks(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"inference.GRPCInferenceService", "sampserve.v1.Tasks", "grpc.health.v1.Health"} <= names

        tasks = tasks_grpc.TasksStub(channel)
        embedded = tasks.Embed(tasks_pb.EmbedRequest(model="emb", texts=["hello", "world"]))
        assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0].values) == 64
        ranked = tasks.Rerank(tasks_pb.RerankRequest(model="emb", query="cannot lock ref",
                                                     documents=["disk full", "cannot lock ref"]))
        assert ranked.results[0].index == 1
        similar = tasks.Similarity(tasks_pb.SimilarityRequest(model="emb", pairs=[tasks_pb.TextPair(a="x", b="x")]))
        assert similar.scores[0] == pytest.approx(1.0, abs=1e-5)
        classified = tasks.Classify(tasks_pb.ClassifyRequest(model="topics", texts=["merge conflict"], top_k=2))
        assert len(classified.results[0].top_k) == 2
        with pytest.raises(grpc.RpcError) as error:
            tasks.Embed(tasks_pb.EmbedRequest(model="emb", texts=[" ".join(["w"] * 400)]))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 128" in error.value.details()
