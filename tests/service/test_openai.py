"""OpenAI-compatible completions and chat completions: the official ``openai`` client against the real
server generating with a tiny random Llama, and a scripted engine in process for what the real one
cannot make deterministic (a client leaving mid-stream, an error after the first token)."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .fake_generation import MODEL, scripted_server
from .generation_repo import metric, wait_for_metric

GREEDY = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


def _events(raw: str) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking its framing (one line each, blank-line separated)."""
    assert raw.endswith("\n\n")
    blocks = raw[:-2].split("\n\n")
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks), raw
    return [block.removeprefix("data: ") for block in blocks]


# ---------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def client(generation_server):
    with openai.OpenAI(base_url=generation_server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_chat_completion_whole_and_streamed_agree(client, generation_model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=generation_model, messages=messages, **GREEDY)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-") and whole.model == generation_model
    choice = whole.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 10
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    chunks = list(client.chat.completions.create(model=generation_model, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert chunks[-2].choices[0].delta.content is None  # the finish chunk's delta is {}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == choice.message.content  # greedy: the same tokens, streamed or not


def test_completions_whole_and_streamed_agree(client, generation_model):
    whole = client.completions.create(model=generation_model, prompt="The quick brown fox", **GREEDY)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].finish_reason == "length" and whole.choices[0].logprobs is None
    assert whole.usage.completion_tokens == 12

    stream = client.completions.create(model=generation_model, prompt=["The quick brown fox"], stream=True, **GREEDY)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_sampling_with_a_seed_is_reproducible(client, generation_model):
    ask = {"model": generation_model, "prompt": "Paris is", "temperature": 1.0, "top_p": 0.9, "seed": 7,
           "max_tokens": 16, "extra_body": {"ignore_eos": True, "top_k": 50}}
    first, second = client.completions.create(**ask), client.completions.create(**ask)
    assert first.choices[0].text == second.choices[0].text


def test_default_max_tokens(client, generation_model):
    """Completions default to 16 new tokens (OpenAI's default); chat to what the context leaves."""
    out = client.completions.create(model=generation_model, prompt="Paris", temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"


def test_raw_event_stream(generation_server, generation_model):
    body = {"model": generation_model, "prompt": "Serving", "max_tokens": 5, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    response = generation_server.http.post("/v1/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 5
    assert all(p["usage"] is None for p in payloads[:-1])


@pytest.mark.parametrize("change, field", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"top_k": -1}}, "top_k"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"stop": ["x"] * 9}, "stop"),
    ({"n": 2}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
])
def test_bad_parameters_are_400_naming_the_field(client, generation_model, change, field):
    ask = {"model": generation_model, "messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**ask)
    assert error.value.status_code == 400
    assert error.value.body["message"].startswith(field), error.value.body
    assert error.value.body["type"] == "invalid_argument"


def test_prompt_and_message_errors(client, generation_server, generation_model):
    with pytest.raises(openai.BadRequestError, match="prompt: 2 prompts"):
        client.completions.create(model=generation_model, prompt=["a", "b"])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=generation_model, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match=r"max_model_len|tokens"):
        client.completions.create(model=generation_model, prompt="hello", max_tokens=100_000)
    response = generation_server.http.post("/v1/chat/completions", json={"model": generation_model, "messages": []})
    assert response.status_code == 400 and "messages" in response.json()["error"]["message"]
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
    with pytest.raises(openai.BadRequestError, match=r"messages\.0\.content: .*only text parts"):
        client.chat.completions.create(model=generation_model, messages=[image])
    texts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "you"}]
    parts = client.chat.completions.create(model=generation_model, max_tokens=2,
                                           messages=[{"role": "user", "name": "ann", "content": texts}])
    assert parts.usage.completion_tokens <= 2


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", stream=True)


def test_a_full_queue_is_429_at_once_and_a_disconnect_frees_the_slot(generation_server, narrow_model):
    """The narrow model runs one sequence and queues one. With both taken, a third request is refused
    before any work; when the running stream's client leaves, its slot goes to the queued one."""
    server, labels = generation_server, {"model": narrow_model, "version": "1"}
    tokens_before = metric(server, "sampserve_generation_tokens_total", **labels)
    gone_before = metric(server, "sampserve_requests_total", endpoint="completions", outcome="client_gone", **labels)
    long = {"model": narrow_model, "prompt": "The", "max_tokens": 2000, "stream": True, "ignore_eos": True}
    short = {"model": narrow_model, "prompt": "The", "max_tokens": 4, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
        with http.stream("POST", "/v1/completions", json=long) as running:
            assert running.status_code == 200
            lines = running.iter_lines()  # kept: a discarded line iterator would close the response
            next(lines)  # its first token: the sequence runs
            queued = pool.submit(httpx.post, server.url + "/v1/completions", json=short, timeout=60)
            wait_for_metric(server, "sampserve_sequences_waiting", 1, **labels)
            start = time.perf_counter()
            refused = server.http.post("/v1/completions", json=short)
            assert refused.status_code == 429 and time.perf_counter() - start < 1, refused.text
            assert refused.json()["error"]["type"] == "resource_exhausted"
        # the client of the long stream has gone: the queued request gets the slot and finishes
        assert queued.result().status_code == 200 and queued.result().json()["usage"]["completion_tokens"] == 4
    wait_for_metric(server, "sampserve_sequences_running", 0, **labels)
    generated = metric(server, "sampserve_generation_tokens_total", **labels) - tokens_before
    assert generated < 1000, f"{generated} tokens: the abandoned stream kept generating"
    assert metric(server, "sampserve_requests_total", endpoint="completions", outcome="client_gone",
                  **labels) == gone_before + 1


# ---------------------------------------------------------------- a scripted engine, in process


async def test_a_client_leaving_mid_stream_frees_the_sequence(tmp_path):
    async with scripted_server(tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.aiter_lines()
                first = json.loads((await anext(lines)).removeprefix("data: "))
                assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            # the engine would wait forever for ``release``: only the disconnect can close it
            await asyncio.wait_for(server.engine.closed.wait(), 5)
        for _ in range(100):
            if server.count("chat_completions", "client_gone"):
                break
            await asyncio.sleep(0.01)
        assert server.count("chat_completions", "client_gone") == 1
        prompt, params = server.engine.calls[0]
        assert params.temperature == 1.0 and params.max_tokens == 64 - len(prompt)  # OpenAI's defaults


async def test_an_error_after_the_first_token_is_one_event(tmp_path):
    from service.errors import NotReady

    async with scripted_server(tmp_path) as server:
        server.engine.fail = NotReady("the engine is shutting down")
        async with httpx.AsyncClient(base_url=server.url) as http:
            body = {"model": MODEL, "prompt": "hi", "stream": True}
            response = await http.post("/v1/completions", json=body)
        assert response.status_code == 200
        events = _events(response.text)
        assert json.loads(events[0])["choices"][0]["text"] == "Hello"
        assert json.loads(events[-1]) == {"error": {"message": "the engine is shutting down",
                                                    "type": "unavailable", "code": 503}}
        assert "[DONE]" not in events
        assert server.count("completions", "unavailable") == 1 and server.engine.closed.is_set()


async def test_an_error_before_the_first_token_is_a_status(tmp_path):
    from service.errors import DeadlinePassed, Overloaded

    async with scripted_server(tmp_path) as server:
        async with httpx.AsyncClient(base_url=server.url) as http:
            for error, status in ((Overloaded("queue full"), 429), (DeadlinePassed("no token in time"), 504)):
                server.engine.refuse = error
                response = await http.post("/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
                assert response.status_code == status
                assert response.json()["error"]["message"] == error.message
        assert server.count("chat_completions", "resource_exhausted") == 1
