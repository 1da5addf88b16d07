"""gRPC ``sampserve.v1.Tasks/Generate``, server streaming, with grpcio's client: against the real
server generating with a tiny random Llama, and against a scripted engine in process for a cancelled
call, an error after the first response and refusals before it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from service.api.grpc_gen import sampserve_pb2 as pb
from service.api.grpc_gen import sampserve_pb2_grpc as pb_grpc

from .fake_generation import MODEL, scripted_server
from .generation_repo import metric, wait_for_metric


@pytest.fixture(scope="module")
def tasks(generation_server):
    with grpc.insecure_channel(generation_server.grpc_target) as channel:
        yield pb_grpc.TasksStub(channel)


def test_generate_streams_deltas_then_finish_and_usage(tasks, generation_server, generation_model):
    request = pb.GenerateRequest(model=generation_model, prompt="The quick brown fox",
                                 sampling=pb.SamplingParameters(max_tokens=10, ignore_eos=True))
    responses = list(tasks.Generate(request, timeout=30))
    assert all(r.model == generation_model and r.version == 1 for r in responses)
    assert [r.finish_reason for r in responses][-1] == "length" and not any(r.finish_reason for r in responses[:-1])
    assert sum(len(r.token_ids) for r in responses) == 10
    last = responses[-1].usage
    assert last.completion_tokens == 10 and last.total_tokens == last.prompt_tokens + 10
    assert not any(r.HasField("usage") for r in responses[:-1])
    # the same greedy text as the REST generate extension: one data plane behind both
    rest = generation_server.http.post(f"/v2/models/{generation_model}/generate", json={
        "text_input": "The quick brown fox", "parameters": {"max_tokens": 10, "ignore_eos": True}}).json()
    assert "".join(r.text for r in responses) == rest["text_output"]


def test_generate_from_chat_messages(tasks, generation_model):
    request = pb.GenerateRequest(model=generation_model, messages=[
        pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user", content="Hello!")],
        sampling=pb.SamplingParameters(max_tokens=3, ignore_eos=True, temperature=0.7, seed=5))
    responses = list(tasks.Generate(request, timeout=30))
    assert responses[-1].usage.completion_tokens == 3 and responses[-1].usage.prompt_tokens > 10


@pytest.mark.parametrize("request_, code, needle", [
    (pb.GenerateRequest(model="tiny-llm", prompt="x", sampling=pb.SamplingParameters(top_p=0)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p"),
    (pb.GenerateRequest(model="tiny-llm", prompt="x", sampling=pb.SamplingParameters(temperature=3)),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (pb.GenerateRequest(model="tiny-llm", prompt="x", sampling=pb.SamplingParameters(stop=[""])),
     grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop"),
    (pb.GenerateRequest(model="tiny-llm", prompt="x", messages=[pb.ChatMessage(role="user", content="y")]),
     grpc.StatusCode.INVALID_ARGUMENT, "either a prompt or messages"),
    (pb.GenerateRequest(model="tiny-llm", messages=[pb.ChatMessage(role="oracle", content="y")]),
     grpc.StatusCode.INVALID_ARGUMENT, "role"),
    (pb.GenerateRequest(model="tiny-llm", prompt="x", sampling=pb.SamplingParameters(max_tokens=99_999)),
     grpc.StatusCode.INVALID_ARGUMENT, "max_model_len"),
    (pb.GenerateRequest(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, "nope"),
    (pb.GenerateRequest(model="tiny-llm", version="4", prompt="x"), grpc.StatusCode.NOT_FOUND, "version 4"),
])
def test_errors_have_the_right_status(tasks, request_, code, needle):
    with pytest.raises(grpc.RpcError) as error:
        list(tasks.Generate(request_, timeout=30))
    assert error.value.code() == code and needle in error.value.details(), error.value.details()


def test_overload_is_resource_exhausted_and_a_cancelled_call_frees_its_slot(tasks, generation_server, narrow_model):
    server, labels = generation_server, {"model": narrow_model, "version": "1"}
    tokens_before = metric(server, "sampserve_generation_tokens_total", **labels)
    long = pb.GenerateRequest(model=narrow_model, prompt="The", sampling=pb.SamplingParameters(
        max_tokens=2000, ignore_eos=True, temperature=1, seed=1))
    short = pb.GenerateRequest(model=narrow_model, prompt="The", sampling=pb.SamplingParameters(max_tokens=2))
    running = tasks.Generate(long, timeout=60)
    next(running)  # the sequence runs
    with ThreadPoolExecutor(1) as pool:
        queued = pool.submit(lambda: list(tasks.Generate(short, timeout=60)))
        wait_for_metric(server, "sampserve_sequences_waiting", 1, **labels)
        with pytest.raises(grpc.RpcError) as error:
            list(tasks.Generate(short, timeout=5))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_waiting" in error.value.details()
        running.cancel()
        assert queued.result()[-1].finish_reason  # the cancelled call's slot went to the queued one
    wait_for_metric(server, "sampserve_sequences_running", 0, **labels)
    assert metric(server, "sampserve_generation_tokens_total", **labels) - tokens_before < 1000


# ---------------------------------------------------------------- a scripted engine, in process


async def test_a_cancelled_call_closes_the_engines_stream(tmp_path):
    async with scripted_server(tmp_path) as server, grpc.aio.insecure_channel(server.grpc_target) as channel:
        call = pb_grpc.TasksStub(channel).Generate(pb.GenerateRequest(model=MODEL, prompt="hi"))
        first = await call.read()
        assert first.text == "Hello" and first.token_ids == [7] and first.version == 3
        call.cancel()
        await asyncio.wait_for(server.engine.closed.wait(), 5)  # it would otherwise wait forever
        for _ in range(100):
            if server.count("generate", "client_gone"):
                break
            await asyncio.sleep(0.01)
        assert server.count("generate", "client_gone") == 1
        _, params = server.engine.calls[0]
        assert params.temperature == 0 and params.max_tokens == 16  # unset fields: the defaults


async def test_an_error_after_the_first_response_is_the_calls_status(tmp_path):
    from service.errors import NotReady

    async with scripted_server(tmp_path) as server, grpc.aio.insecure_channel(server.grpc_target) as channel:
        server.engine.fail = NotReady("shutting down")
        call = pb_grpc.TasksStub(channel).Generate(pb.GenerateRequest(model=MODEL, prompt="hi"))
        assert (await call.read()).text == "Hello"
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call.read()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and error.value.details() == "shutting down"
        assert dict(error.value.trailing_metadata())["x-request-id"]


async def test_refusals_before_the_first_response(tmp_path):
    from service.errors import DeadlinePassed, Overloaded

    async with scripted_server(tmp_path) as server, grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.TasksStub(channel)
        for error, code in ((Overloaded("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
                            (DeadlinePassed("no token in time"), grpc.StatusCode.DEADLINE_EXCEEDED)):
            server.engine.refuse = error
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in stub.Generate(pb.GenerateRequest(model=MODEL, prompt="hi")):
                    pass
            assert raised.value.code() == code and raised.value.details() == error.message
