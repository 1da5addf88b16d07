"""OpenAI-compatible completions and chat completions: the official ``openai`` client against the real
server generating with a tiny random Llama (tests/service/generation_repo.py), in a subprocess, and in
process where a test reaches the loaded engine (an error after the first token) or a setting (the
request timeout)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from service.generation import SamplingParams

from .generation_repo import (
    GENERATION_MODEL,
    LONG,
    NARROW_MODEL,
    SHORT_CONTEXT,
    SHORT_MODEL,
    UNPUBLISHED_MODEL,
    metric,
    serve_in_process,
    wait_for_metric,
)

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
    """Completions default to 16 new tokens (OpenAI's default); chat to what the context leaves after the
    prompt, the context being the engine's max_model_len: config.json's (64 for the short model), not
    head.json's max_length (2048)."""
    out = client.completions.create(model=generation_model, prompt="Paris", temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16 and out.choices[0].finish_reason == "length"
    chat = client.chat.completions.create(model=SHORT_MODEL, messages=[{"role": "user", "content": "Paris?"}],
                                          temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length" and 10 < chat.usage.prompt_tokens < SHORT_CONTEXT
    assert chat.usage.completion_tokens == SHORT_CONTEXT - chat.usage.prompt_tokens


def test_default_temperature_is_openais(client, generation_model):
    """No temperature: 1, as OpenAI's (the v2 extension and gRPC default to greedy)."""
    ask = {"model": generation_model, "messages": [{"role": "user", "content": "Name a colour."}], "seed": 11,
           "max_tokens": 24, "extra_body": {"ignore_eos": True}}
    unset = client.chat.completions.create(**ask).choices[0].message.content
    assert client.chat.completions.create(**ask, temperature=1.0).choices[0].message.content == unset
    assert client.chat.completions.create(**ask, temperature=0).choices[0].message.content != unset


def test_concurrent_greedy_streams_get_the_tokens_each_gets_alone(client, generation_server, generation_model):
    """Continuous batching through the server: overlapping requests of different prompt and output
    lengths, joining and leaving the running batch at different steps, each return exactly the text
    they return when served alone."""
    prompts = [("The quick brown fox", 40), ("Paris", 7), ("def add(a, b):", 25), ("Serving models fast", 3),
               ("Le renard brun saute par-dessus le chien paresseux.", 18), ("emoji", 31)]

    def complete(prompt: str, tokens: int) -> str:
        out = client.completions.create(model=generation_model, prompt=prompt, max_tokens=tokens, temperature=0,
                                        extra_body={"ignore_eos": True})
        return out.choices[0].text

    alone = [complete(p, n) for p, n in prompts]
    labels = {"model": generation_model, "version": "1"}
    prompted_before = metric(generation_server, "sampserve_prompt_tokens_total", **labels)
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda pn: complete(*pn), prompts))
    assert together == alone
    assert metric(generation_server, "sampserve_prompt_tokens_total", **labels) > prompted_before


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


def test_unknown_model_is_404_and_a_model_not_ready_503(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", stream=True)
    with pytest.raises(openai.InternalServerError) as error:  # a status before the stream, not an event
        client.chat.completions.create(model=UNPUBLISHED_MODEL, messages=[{"role": "user", "content": "hi"}],
                                       stream=True)
    assert error.value.status_code == 503 and error.value.body["type"] == "unavailable"
    assert "no version published yet" in error.value.body["message"]


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
            chat = {"model": narrow_model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
            refused = server.http.post("/v1/chat/completions", json=chat)  # a status, not an event stream
            assert refused.status_code == 429 and "max_waiting" in refused.json()["error"]["message"]
        # the client of the long stream has gone: the queued request gets the slot and finishes
        assert queued.result().status_code == 200 and queued.result().json()["usage"]["completion_tokens"] == 4
    wait_for_metric(server, "sampserve_sequences_running", 0, **labels)
    generated = metric(server, "sampserve_generation_tokens_total", **labels) - tokens_before
    assert generated < 1000, f"{generated} tokens: the abandoned stream kept generating"
    assert metric(server, "sampserve_requests_total", endpoint="completions", outcome="client_gone",
                  **labels) == gone_before + 1


# ---------------------------------------------------------------- the real server, in process

CHAT = {"model": GENERATION_MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "stream": True,
        "max_tokens": LONG, "ignore_eos": True}


async def test_an_error_after_the_first_token_is_one_event(generation_repo):
    """The model's engine closes without draining while a stream runs (as when a version is dropped
    without waiting): the stream ends with one error event naming the reason, and no [DONE]."""
    async with serve_in_process(generation_repo) as server, httpx.AsyncClient(base_url=server.url) as http:
        async with http.stream("POST", "/v1/chat/completions", json=CHAT) as response:
            assert response.status_code == 200
            chunks, raw = response.aiter_bytes(), b""
            while b"\n\n" not in raw:  # the first event: the first token is computed
                raw += await anext(chunks)
            await server.models.generator(GENERATION_MODEL).engine.close(drain=False)
            async for chunk in chunks:
                raw += chunk
        events = _events(raw.decode())
        assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert json.loads(events[-1]) == {"error": {"message": f"{GENERATION_MODEL}/1 is shutting down",
                                                    "type": "unavailable", "code": 503}}
        assert "[DONE]" not in events and len(events) < LONG
        assert server.count(GENERATION_MODEL, "chat_completions", "unavailable") == 1


async def test_a_deadline_passing_in_the_queue_is_504_before_the_stream(generation_repo):
    """The narrow model's one slot is held by a long generation; a stream queued behind it gets no token
    within the request timeout: 504 with a JSON body, and it has left the queue."""
    async with serve_in_process(generation_repo, request_timeout_s=0.05) as server:
        holder = await server.dataplane.generate(NARROW_MODEL, None, prompt="The", timeout_s=60,
                                                 params=SamplingParams(max_tokens=LONG, ignore_eos=True))
        try:
            async with httpx.AsyncClient(base_url=server.url) as http:
                response = await http.post("/v1/chat/completions", json={**CHAT, "model": NARROW_MODEL})
            assert response.status_code == 504, response.text
            error = response.json()["error"]
            assert error["type"] == "deadline_exceeded" and "deadline" in error["message"]
            assert server.models.generator(NARROW_MODEL).engine.stats().waiting == 0
            assert server.count(NARROW_MODEL, "chat_completions", "deadline_exceeded") == 1
        finally:
            await holder.aclose()


# ---------------------------------------------------------------- shutdown


def test_sigterm_ends_streams_that_cannot_finish_with_an_error_event(generation_repo):
    """Streams still generating when the drain grace runs out end with one error event naming the
    shutdown (not a cut connection), and the server exits 0."""
    from tests.servers import start_server

    server = start_server(generation_repo, "--drain-grace-s", "0.4")
    bodies: list[str] = []
    started = 0

    def stream() -> None:
        nonlocal started
        body = {"model": GENERATION_MODEL, "prompt": "hello", "max_tokens": LONG, "stream": True,
                "temperature": 0, "ignore_eos": True}
        with httpx.Client(base_url=server.url, timeout=60) as http, \
                http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            chunks = []
            for chunk in response.iter_text():
                chunks.append(chunk)
                started += 1
            bodies.append("".join(chunks))

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream) for _ in range(4)]
        deadline = time.monotonic() + 30
        while started < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.stop() == 0
        for future in futures:
            future.result(timeout=30)
    assert len(bodies) == 4
    for body in bodies:  # 4 x 2000 tokens do not fit in 0.4 s: every stream ends with the error event
        last = json.loads(_events(body)[-1])
        assert "shutting down" in last["error"]["message"], body[-300:]
