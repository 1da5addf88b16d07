"""gRPC: the v2 ``inference.GRPCInferenceService``, our ``sampserve.v1.Tasks``, the standard health
service and server reflection, on one ``grpc.aio`` server.

Thin, like the REST layer: convert messages, call the data plane, map ``ServiceError`` codes
through ``service.errors.GRPC_STATUS``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.grpc_gen import grpc_predict_v2_pb2 as pb
from service.api.grpc_gen import grpc_predict_v2_pb2_grpc as pb_grpc
from service.api.grpc_gen import sampserve_pb2 as tasks_pb
from service.api.grpc_gen import sampserve_pb2_grpc as tasks_grpc
from service.dataplane import DataPlane
from service.errors import GRPC_STATUS, InvalidInput, ServiceError
from service.metrics import Metrics
from service.models import ModelManager
from service.tensors import decode_bytes_elements, utf8

SERVER_NAME = "sampserve"
SERVER_VERSION = "0.1.0"
Response = TypeVar("Response")
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
TASKS_SERVICE = tasks_pb.DESCRIPTOR.services_by_name["Tasks"]


def _texts_of(request: pb.ModelInferRequest) -> tuple[list[str], list[str] | None]:
    if not request.inputs:
        raise InvalidInput("inputs: give a BYTES tensor named 'text'")
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput("raw_input_contents must have one entry per input")
    values: dict[str, list[str]] = {}
    for index, tensor in enumerate(request.inputs):
        if tensor.name not in ("text", "text_pair"):
            raise InvalidInput(f"inputs: unknown tensor {tensor.name!r}; this model takes 'text' (and 'text_pair')")
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"inputs.{tensor.name}: datatype must be BYTES, got {tensor.datatype}")
        if not tensor.shape or any(d < 0 for d in tensor.shape):
            raise InvalidInput(f"inputs.{tensor.name}: shape {list(tensor.shape)} must be non-negative")
        if request.raw_input_contents:
            texts = decode_bytes_elements(request.raw_input_contents[index], f"inputs.{tensor.name}")
        else:
            elements = tensor.contents.bytes_contents
            texts = [utf8(v, f"inputs.{tensor.name}: element {i}") for i, v in enumerate(elements)]
        count = int(np.prod(list(tensor.shape)))
        if count != len(texts):
            raise InvalidInput(f"inputs.{tensor.name}: shape {list(tensor.shape)} holds {count} elements, "
                               f"data has {len(texts)}")
        values[tensor.name] = texts
    if "text" not in values:
        raise InvalidInput("inputs: the BYTES tensor 'text' is missing")
    pairs = values.get("text_pair")
    if pairs is not None and len(pairs) != len(values["text"]):
        raise InvalidInput("inputs: 'text_pair' must have as many elements as 'text'")
    return values["text"], pairs


class _Base:
    def __init__(self, models: ModelManager, dataplane: DataPlane, metrics: Metrics) -> None:
        self.models, self.dataplane, self.metrics = models, dataplane, metrics

    async def _call(self, context: grpc.aio.ServicerContext, model: str, endpoint: str,
                    work: Callable[[], Awaitable[tuple[Any, Response]]]) -> Response:
        start = time.perf_counter()
        try:
            version, response = await work()
        except ServiceError as exc:
            self.metrics.observe_request(model, "", endpoint, exc.code.value, start)
            await context.abort(GRPC_STATUS[exc.code], exc.message)
            raise  # abort raises; this line is for the type checker
        self.metrics.observe_request(model, version, endpoint, "ok", start)
        return response


class InferenceServicer(_Base, pb_grpc.GRPCInferenceServiceServicer):
    draining = False

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.models.ready() and not self.draining)

    async def ModelReady(self, request, context):
        try:
            self.models.get(request.name, request.version or None)
        except ServiceError as exc:
            if request.name not in self.models.models:
                await context.abort(GRPC_STATUS[exc.code], exc.message)
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    async def ModelMetadata(self, request, context):
        try:
            loaded = self.models.get(request.name, request.version or None)
        except ServiceError as exc:
            await context.abort(GRPC_STATUS[exc.code], exc.message)
            raise
        output = "embeddings" if loaded.config.task == "matching" else "logits"
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=[str(v) for v in sorted(self.models.models[request.name].versions)],
            platform="onnxruntime_onnx",
            inputs=[tensor(name="text", datatype="BYTES", shape=[-1]),
                    tensor(name="text_pair", datatype="BYTES", shape=[-1])],
            outputs=[tensor(name=output, datatype="FP32", shape=[-1, -1])])

    async def ModelInfer(self, request, context):
        async def work():
            texts, pairs = _texts_of(request)
            truncate = request.parameters["truncate"].bool_param if "truncate" in request.parameters else False
            result = await self.dataplane.forward(request.model_name, request.model_version or None, texts, pairs,
                                                  truncate)
            values = result.values.astype("<f4")
            name = "embeddings" if result.head.task == "matching" else "logits"
            return result.version, pb.ModelInferResponse(
                model_name=request.model_name, model_version=str(result.version), id=request.id,
                outputs=[pb.ModelInferResponse.InferOutputTensor(name=name, datatype="FP32",
                                                                 shape=list(values.shape))],
                raw_output_contents=[values.tobytes()])

        return await self._call(context, request.model_name, "infer", work)


class TasksServicer(_Base, tasks_grpc.TasksServicer):
    async def Embed(self, request, context):
        async def work():
            result = await self.dataplane.embed(request.model, list(request.texts), request.truncate, "texts")
            return result.version, tasks_pb.EmbedResponse(
                model=request.model, version=result.version, tokens=result.tokens,
                embeddings=[tasks_pb.Vector(values=row.tolist()) for row in result.values])

        return await self._call(context, request.model, "embeddings", work)

    async def Classify(self, request, context):
        async def work():
            pairs = list(request.text_pairs) or None
            result, ranked = await self.dataplane.classify(request.model, list(request.texts), pairs,
                                                           request.top_k or 1, request.truncate)
            return result.version, tasks_pb.ClassifyResponse(
                model=request.model, version=result.version,
                results=[tasks_pb.Classification(top_k=[tasks_pb.LabelScore(label=lab, score=s) for lab, s in top])
                         for top in ranked])

        return await self._call(context, request.model, "classify", work)

    async def Similarity(self, request, context):
        async def work():
            pairs = [[p.a, p.b] for p in request.pairs]
            result, scores = await self.dataplane.similarity(request.model, pairs, request.truncate)
            return result.version, tasks_pb.SimilarityResponse(model=request.model, version=result.version,
                                                               scores=scores)

        return await self._call(context, request.model, "similarity", work)

    async def Rerank(self, request, context):
        async def work():
            result, ranked = await self.dataplane.rerank(request.model, request.query, list(request.documents),
                                                         request.truncate)
            ranked = ranked[: request.top_n] if request.top_n else ranked
            return result.version, tasks_pb.RerankResponse(
                model=request.model, version=result.version,
                results=[tasks_pb.RankedDocument(index=i, score=s) for i, s in ranked])

        return await self._call(context, request.model, "rerank", work)


class GrpcServer:
    """The aio server with every service registered; ``port`` is the bound one."""

    def __init__(self, models: ModelManager, dataplane: DataPlane, metrics: Metrics, host: str, port: int,
                 max_message_bytes: int) -> None:
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", 64 * 1024 * 1024)]
        self.server = grpc.aio.server(options=options)
        self.inference = InferenceServicer(models, dataplane, metrics)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.inference, self.server)
        self.tasks = TasksServicer(models, dataplane, metrics)
        tasks_grpc.add_TasksServicer_to_server(self.tasks, self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (INFERENCE_SERVICE.full_name, TASKS_SERVICE.full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.models = models

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(self.models.ready())

    async def set_serving(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", "inference.GRPCInferenceService", "sampserve.v1.Tasks"):
            result = self.health.set(service, status)
            if result is not None:
                await result

    async def drain(self, grace_s: float) -> None:
        self.inference.draining = True
        await self.set_serving(False)
        await self.server.stop(grace_s)
