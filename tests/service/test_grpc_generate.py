"""gRPC ``sampserve.v1.Tasks/Generate``, server streaming, with grpcio's client against the real server
generating with a tiny random Llama (tests/service/generation_repo.py), in a subprocess (the server's
gRPC protocol modules and tritonclient's register the same protobuf names, so they never share the
test process)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from service.api.grpc_gen import sampserve_pb2 as pb
from service.api.grpc_gen import sampserve_pb2_grpc as pb_grpc

from .generation_repo import (
    GENERATION_MODEL,
    LONG,
    UNPUBLISHED_MODEL,
    metric,
    wait_for_metric,
)


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


def test_unset_sampling_fields_are_the_defaults(tasks, generation_model):
    """No sampling message: greedy, 16 new tokens at most."""
    unset = list(tasks.Generate(pb.GenerateRequest(model=generation_model, prompt="Paris is",
                                                   sampling=pb.SamplingParameters(ignore_eos=True)), timeout=30))
    greedy = list(tasks.Generate(pb.GenerateRequest(model=generation_model, prompt="Paris is", sampling=(
        pb.SamplingParameters(ignore_eos=True, temperature=0, max_tokens=16))), timeout=30))
    assert unset[-1].usage.completion_tokens == 16 and unset[-1].finish_reason == "length"
    assert [t for r in unset for t in r.token_ids] == [t for r in greedy for t in r.token_ids]


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
    (pb.GenerateRequest(model=UNPUBLISHED_MODEL, prompt="x"), grpc.StatusCode.UNAVAILABLE, "no version published yet"),
])
def test_errors_have_the_right_status(tasks, request_, code, needle):
    with pytest.raises(grpc.RpcError) as error:
        list(tasks.Generate(request_, timeout=30))
    assert error.value.code() == code and needle in error.value.details(), error.value.details()


def test_overload_is_resource_exhausted_and_a_cancelled_call_frees_its_slot(tasks, generation_server, narrow_model):
    server, labels = generation_server, {"model": narrow_model, "version": "1"}
    tokens_before = metric(server, "sampserve_generation_tokens_total", **labels)
    gone_before = metric(server, "sampserve_requests_total", endpoint="generate", outcome="client_gone", **labels)
    long = pb.GenerateRequest(model=narrow_model, prompt="The", sampling=pb.SamplingParameters(
        max_tokens=LONG, ignore_eos=True, temperature=1, seed=1))
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
    wait_for_metric(server, "sampserve_requests_total", gone_before + 1, endpoint="generate", outcome="client_gone",
                    **labels)


# ---------------------------------------------------------------- the real server, in process


def test_an_error_after_the_first_response_is_the_calls_status(generation_repo):
    """SIGTERM while a call streams a generation that cannot finish within the drain grace: after the
    responses already sent, the call ends with UNAVAILABLE naming the shutdown (and the request id in
    its trailers), and the server exits 0."""
    from tests.servers import start_server

    server = start_server(generation_repo, "--drain-grace-s", "0.4")
    request = pb.GenerateRequest(model=GENERATION_MODEL, prompt="The", sampling=pb.SamplingParameters(
        max_tokens=LONG, ignore_eos=True))
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = pb_grpc.TasksStub(channel).Generate(request, timeout=60)
        first = next(call)
        assert first.model == GENERATION_MODEL and first.version == 1 and len(first.token_ids) == 1
        assert server.stop() == 0
        responses = 1
        with pytest.raises(grpc.RpcError) as error:
            for response in call:
                assert not response.finish_reason
                responses += 1
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value
    assert "shutting down" in error.value.details() and responses < LONG
    assert dict(error.value.trailing_metadata())["x-request-id"]


def test_a_deadline_passing_in_the_queue_frees_its_place(narrow_model, generation_server):
    """The narrow model's one slot is held by a long generation; a call queued behind it with a
    deadline gets DEADLINE_EXCEEDED before any response, and the server drops it from the queue
    instead of generating for nobody (the engine has the call's deadline, so the server usually
    answers first; when the client's deadline fires first it is counted as a client gone)."""

    def ended() -> float:
        return (metric(generation_server, "sampserve_client_gone_total", transport="grpc", reason="deadline")
                + metric(generation_server, "sampserve_requests_total", model=narrow_model, endpoint="generate",
                         outcome="deadline_exceeded"))

    before = ended()
    holder_request = pb.GenerateRequest(model=narrow_model, prompt="The", sampling=pb.SamplingParameters(
        max_tokens=LONG, ignore_eos=True))
    with grpc.insecure_channel(generation_server.grpc_target) as channel:
        stub = pb_grpc.TasksStub(channel)
        holder = stub.Generate(holder_request, timeout=60)
        next(holder)  # the slot is taken
        with pytest.raises(grpc.RpcError) as error:
            next(stub.Generate(pb.GenerateRequest(model=narrow_model, prompt="hi"), timeout=0.3))
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for_metric(generation_server, "sampserve_sequences_waiting", 0, model=narrow_model, version="1")
        holder.cancel()
    deadline = time.monotonic() + 10
    while ended() != before + 1:
        assert time.monotonic() < deadline, "the queued call was never counted as ended by its deadline"
        time.sleep(0.01)
    wait_for_metric(generation_server, "sampserve_sequences_running", 0, model=narrow_model, version="1")
