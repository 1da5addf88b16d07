"""gRPC: the v2 ``inference.GRPCInferenceService``, our ``sampserve.v1.Tasks``, the standard health
service and server reflection, on one ``grpc.aio`` server on the public port.

Thin, like the REST layer: servicers convert messages into data-plane calls; the one error type,
``ServiceError``, is mapped to a status by ``service.errors.GRPC_STATUS`` in the interceptor
(``service.api.grpc_edge``), which also carries the API key check, the request id and the access
log. The wire is grpcio's (C core): keepalive enforcement, connection age and idle limits, stream
and message caps, gzip, TLS and mTLS all come from its channel options (``server_options``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.grpc_edge import BadMessage, EdgeInterceptor
from service.api.grpc_gen import grpc_predict_v2_pb2 as pb
from service.api.grpc_gen import sampserve_pb2 as tasks_pb
from service.dataplane import EXTENSIONS, DataPlane, TensorInput
from service.errors import InvalidInput
from service.generation import SamplingParams
from service.metrics import Metrics
from service.net import PortInUse, bind_port, port_message
from service.settings import Settings
from service.tensors import decode_bytes_elements, utf8

SERVER_NAME = "sampserve"
SERVER_VERSION = "0.1.0"
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
TASKS_SERVICE = tasks_pb.DESCRIPTOR.services_by_name["Tasks"]
OPEN_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady", "ServerMetadata"})
"""Methods an API key does not guard: the probes' (as on the REST port)."""
MAX_SEND_BYTES = 64 * 1024 * 1024


def _tensors(request: pb.ModelInferRequest) -> list[TensorInput]:
    """The request's input tensors, each decoded only after the data plane has checked its shape."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput("raw_input_contents must have one entry per input")
    tensors = []
    for index, tensor in enumerate(request.inputs):
        where = f"inputs.{tensor.name[:64]}"
        decode = _raw(raw[index], where) if raw else _elements(tensor.contents.bytes_contents, where)
        numbers = NUMERIC_CONTENTS.get(tensor.datatype)
        tensors.append(TensorInput(tensor.name, tensor.datatype, list(tensor.shape), decode,
                                   raw=raw[index] if raw else None,
                                   values=getattr(tensor.contents, numbers) if numbers and not raw else None))
    return tensors


NUMERIC_CONTENTS = {"UINT8": "uint_contents", "FP32": "fp32_contents"}
"""Where typed (not raw) contents carry each numeric datatype a head takes."""


def _raw(blob: bytes, where: str) -> Callable[[int], list[Any]]:
    return lambda limit: decode_bytes_elements(blob, where, limit)


def _elements(elements: Any, where: str) -> Callable[[int], list[Any]]:
    """``bytes_contents``: its length is known without decoding, so a wrong count costs nothing."""

    def decode(limit: int) -> list[Any]:
        if len(elements) != limit:
            raise InvalidInput(f"{where}: the shape declares {limit} elements, the data holds {len(elements)}")
        return [utf8(v, f"{where}: element {i}") for i, v in enumerate(elements)]

    return decode


SAMPLING_SCALARS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty")


def sampling(message: tasks_pb.SamplingParameters) -> tuple[SamplingParams, bool]:
    """The request's sampling (unset fields: the defaults), and whether max_tokens was left unset."""
    values: dict[str, object] = {name: getattr(message, name) for name in SAMPLING_SCALARS if message.HasField(name)}
    values.update(stop=list(message.stop), ignore_eos=message.ignore_eos)
    return SamplingParams.parse(values, prefix="sampling."), not message.HasField("max_tokens")


class InferenceServicer:
    """The Open Inference Protocol's gRPC service over the data plane."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live()[0])

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version or None)[0])

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        meta = self.dataplane.model_metadata(request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name, versions=meta.versions, platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        truncate = request.parameters["truncate"].bool_param if "truncate" in request.parameters else False
        result = await self.dataplane.infer(request.model_name, request.model_version or None, _tensors(request),
                                            truncate)
        values = result.values.astype("<f4")
        return pb.ModelInferResponse(
            model_name=request.model_name, model_version=str(result.version), id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=result.output_name, datatype="FP32",
                                                             shape=list(values.shape))],
            raw_output_contents=[values.tobytes()])


    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        _one_repository(request.repository_name)
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            entry(name=e.name, version=e.version, state=e.state, reason=e.reason)
            for e in self.dataplane.repository_index(request.ready)])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: Any) -> pb.RepositoryModelLoadResponse:
        _one_repository(request.repository_name)
        await self.dataplane.load_model(request.model_name, _parameters(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: Any) -> pb.RepositoryModelUnloadResponse:
        _one_repository(request.repository_name)
        await self.dataplane.unload_model(request.model_name, _parameters(request.parameters))
        return pb.RepositoryModelUnloadResponse()


def _one_repository(name: str) -> None:
    """One repository per server: a named one (Triton serves several) is refused, not silently ignored."""
    if name:
        raise InvalidInput("repository_name: this server serves one repository; leave it empty")


def _parameters(parameters: Any) -> dict[str, Any]:
    return {key: getattr(value, value.WhichOneof("parameter_choice") or "string_param")
            for key, value in parameters.items()}


class TasksServicer:
    """Our task API (embeddings, classification, similarity, rerank, generation) over the data plane."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def Embed(self, request: tasks_pb.EmbedRequest, context: Any) -> tasks_pb.EmbedResponse:
        result = await self.dataplane.embed(request.model, list(request.texts), request.truncate, "texts")
        return tasks_pb.EmbedResponse(model=request.model, version=result.version, tokens=result.tokens,
                                      embeddings=[tasks_pb.Vector(values=row.tolist()) for row in result.values])

    async def Classify(self, request: tasks_pb.ClassifyRequest, context: Any) -> tasks_pb.ClassifyResponse:
        result, ranked = await self.dataplane.classify(request.model, list(request.texts),
                                                       list(request.text_pairs) or None, request.top_k or 1,
                                                       request.truncate)
        return tasks_pb.ClassifyResponse(model=request.model, version=result.version, results=[
            tasks_pb.Classification(top_k=[tasks_pb.LabelScore(label=lab, score=s) for lab, s in top])
            for top in ranked])

    async def Similarity(self, request: tasks_pb.SimilarityRequest, context: Any) -> tasks_pb.SimilarityResponse:
        pairs = [[p.a, p.b] for p in request.pairs]
        result, scores = await self.dataplane.similarity(request.model, pairs, request.truncate)
        return tasks_pb.SimilarityResponse(model=request.model, version=result.version, scores=scores)

    async def Rerank(self, request: tasks_pb.RerankRequest, context: Any) -> tasks_pb.RerankResponse:
        result, ranked = await self.dataplane.rerank(request.model, request.query, list(request.documents),
                                                     request.truncate)
        ranked = ranked[: request.top_n] if request.top_n else ranked
        return tasks_pb.RerankResponse(model=request.model, version=result.version,
                                       results=[tasks_pb.RankedDocument(index=i, score=s) for i, s in ranked])

    async def Generate(self, request: tasks_pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        """Written with ``context.write`` from a coroutine rather than yielded from a generator, so that
        a cancelled call (client gone, deadline) lands in this ``finally`` wherever it was suspended, and
        the engine's slot is freed at once."""
        params, unset = sampling(request.sampling)
        prompt = request.prompt if request.HasField("prompt") else None
        messages = [{"role": m.role, "content": m.content} for m in request.messages] or None
        generation = await self.dataplane.generate(request.model, request.version or None, prompt=prompt,
                                                   messages=messages, params=params, endpoint="generate",
                                                   fill_max_tokens=unset and messages is not None,
                                                   timeout_s=engine_deadline(context.time_remaining()))
        try:
            async for delta in generation.deltas:
                response = tasks_pb.GenerateResponse(model=request.model, version=generation.version,
                                                     text=delta.text, token_ids=delta.token_ids,
                                                     finish_reason=delta.finish_reason or "")
                if delta.finish_reason is not None:
                    response.usage.CopyFrom(tasks_pb.Usage(
                        prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens,
                        total_tokens=delta.prompt_tokens + delta.completion_tokens))
                await context.write(response)
        finally:
            await generation.aclose()


def engine_deadline(remaining: float | None) -> float | None:
    """The engine's deadline for a call with ``remaining`` seconds: a little before the client's, so
    that the server ends the stream itself (DEADLINE_EXCEEDED before the first token, finish_reason
    "length" after it) rather than the client cancelling mid-write. None: the server's default."""
    if remaining is None:
        return None
    return max(0.0, remaining - min(0.05, 0.1 * remaining))


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A deserializer that hands a malformed message (e.g. invalid UTF-8 in a string field) to the
    interceptor as ``BadMessage``, which answers INVALID_ARGUMENT; grpcio itself would say INTERNAL."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return BadMessage(str(exc))

    return deserialize


def _handlers(servicer: Any, service: Any, messages: Any) -> grpc.GenericRpcHandler:
    """The handlers of ``service`` (a descriptor: unary, or streaming responses), calling
    ``servicer``'s methods by name."""
    handlers = {}
    for method in service.methods:
        request_class = getattr(messages, method.input_type.name)
        response_class = getattr(messages, method.output_type.name)
        kind = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = kind(getattr(servicer, method.name),
                                     request_deserializer=_tolerant(request_class.FromString),
                                     response_serializer=response_class.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """grpcio's own defences, set from the settings (docs/design.md says why each value)."""
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    return [
        # grpcio opens a stream's window to the whole message its prefix announces: one connection can
        # make the server buffer streams x message bytes, so both are capped (docs/design.md)
        ("grpc.max_receive_message_length", settings.grpc_max_message_bytes),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.max_connection_idle_ms", ms(settings.grpc_max_connection_idle_s)),
        ("grpc.max_connection_age_ms", ms(settings.grpc_max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", ms(settings.grpc_max_connection_age_grace_s)),
        ("grpc.server_handshake_timeout_ms", ms(settings.grpc_handshake_timeout_s)),
        ("grpc.max_allowed_incoming_connections", settings.max_connections),
        # keepalive enforcement: clients may ping (also between calls), but not more often than this;
        # after max_ping_strikes pings too soon the connection gets GOAWAY(too_many_pings)
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", ms(settings.grpc_keepalive_min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", 2),
        # the server pings idle connections to find dead peers
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        # no BDP probing: windows are not grown beyond what a message needs
        ("grpc.http2.bdp_probe", 0),
        ("grpc.so_reuseport", 0),
    ]


class GrpcServer:
    """The aio server with every service registered, on ``settings.host``; ``port`` is the bound one."""

    def __init__(self, dataplane: DataPlane, metrics: Metrics, settings: Settings, api_key: bytes | None) -> None:
        protected = {INFERENCE_SERVICE.full_name, TASKS_SERVICE.full_name}
        edge = EdgeInterceptor(metrics, api_key, protected, OPEN_METHODS, settings.access_log)
        self.server = grpc.aio.server(interceptors=[edge], options=server_options(settings))
        self.inference = InferenceServicer(dataplane)
        self.tasks = TasksServicer(dataplane)
        self.server.add_generic_rpc_handlers((_handlers(self.inference, INFERENCE_SERVICE, pb),
                                              _handlers(self.tasks, TASKS_SERVICE, tasks_pb)))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (INFERENCE_SERVICE.full_name, TASKS_SERVICE.full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        address = f"{host}:{settings.grpc_port}"
        if settings.grpc_port:  # checked with a socket of our own first: grpc core logs its failure in lines
            bind_port(settings.host, settings.grpc_port, "gRPC", "grpc_port").close()
        try:
            if settings.tls:
                assert settings.tls_cert_file is not None and settings.tls_key_file is not None
                ca = settings.tls_client_ca_file.read_bytes() if settings.tls_client_ca_file else None
                credentials = grpc.ssl_server_credentials(
                    [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())],
                    root_certificates=ca, require_client_auth=ca is not None)
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # taken between the check and here
            self.port = 0
        if self.port == 0:
            raise PortInUse(port_message(settings.host, settings.grpc_port, "gRPC", "grpc_port", None))
        self.dataplane = dataplane

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(self.dataplane.ready())

    async def set_serving(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", INFERENCE_SERVICE.full_name, TASKS_SERVICE.full_name):
            await self.health.set(service, status)

    async def drain(self, grace_s: float) -> None:
        """Refuse new calls, send GOAWAY, give calls in flight ``grace_s`` to finish."""
        await self.set_serving(False)
        await self.server.stop(grace_s)
