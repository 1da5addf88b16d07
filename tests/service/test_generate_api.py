"""Triton's generate extension (``/v2/models/{m}/generate`` and ``/generate_stream``) with plain httpx
(tritonclient has no client for it) against the real server generating with a tiny random Llama
(tests/service/generation_repo.py), in a subprocess, and in process where a test reaches the loaded
engine (an error after the first event) or a setting (the request timeout). A client leaving a stream
is tested on the OpenAI routes (tests/service/test_openai.py): both send events through one class."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.generation import SamplingParams

from .generation_repo import GENERATION_MODEL, LONG, NARROW_MODEL, UNPUBLISHED_MODEL, serve_in_process, wait_for_metric

ASK = {"text_input": "The quick brown fox", "parameters": {"max_tokens": 10, "ignore_eos": True}}


def _events(raw: str) -> list[dict]:
    assert raw.endswith("\n\n")
    blocks = raw[:-2].split("\n\n")
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks), raw
    return [json.loads(block.removeprefix("data: ")) for block in blocks]


def test_generate_and_generate_stream_agree(generation_server, generation_model):
    http = generation_server.http
    whole = http.post(f"/v2/models/{generation_model}/generate", json={**ASK, "id": "r-1"})
    assert whole.status_code == 200, whole.text
    body = whole.json()
    assert body["model_name"] == generation_model and body["model_version"] == "1" and body["id"] == "r-1"
    assert body["finish_reason"] == "length" and isinstance(body["text_output"], str)
    again = http.post(f"/v2/models/{generation_model}/versions/1/generate", json=ASK).json()
    assert again["text_output"] == body["text_output"]  # greedy by default: the same text

    stream = http.post(f"/v2/models/{generation_model}/generate_stream", json=ASK)
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    events = _events(stream.text)  # no [DONE]: every event is JSON
    assert "".join(e["text_output"] for e in events) == body["text_output"]
    assert events[-1]["finish_reason"] == "length" and all("finish_reason" not in e for e in events[:-1])
    assert all(e["model_name"] == generation_model and e["model_version"] == "1" for e in events)


def test_sampling_parameters_reach_the_engine(generation_server, generation_model):
    http = generation_server.http
    seeded = {"text_input": "Paris is", "parameters": {"max_tokens": 12, "temperature": 1.0, "top_k": 40,
                                                        "top_p": 0.9, "seed": 3, "ignore_eos": True, "stream": False}}
    first = http.post(f"/v2/models/{generation_model}/generate", json=seeded).json()["text_output"]
    assert http.post(f"/v2/models/{generation_model}/generate", json=seeded).json()["text_output"] == first
    short = http.post(f"/v2/models/{generation_model}/generate",
                      json={"text_input": "Paris is", "parameters": {"max_tokens": 1, "ignore_eos": True}}).json()
    assert short["finish_reason"] == "length"


def test_generation_metadata_and_infer_refused(generation_server, generation_model):
    http = generation_server.http
    meta = http.get(f"/v2/models/{generation_model}").json()
    assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
    assert meta["outputs"][0]["name"] == "text_output"
    assert meta["parameters"]["task"] == "generation" and meta["parameters"]["max_model_len"] == 2048
    assert meta["platform"] == "onnxruntime_onnx"  # what runs the decoder graph, as encoders say it too
    assert (meta["parameters"]["runtime"], meta["parameters"]["device"]) == ("onnxruntime", "cpu")
    assert meta["parameters"]["providers"] == "CPUExecutionProvider"
    infer = http.post(f"/v2/models/{generation_model}/infer",
                      json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]})
    assert infer.status_code == 400 and "generate" in infer.json()["error"]


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v2/models/{m}/generate", {"text_input": "x", "parameters": {"temperature": -1}}, 400, "parameters.temperature"),
    ("/v2/models/{m}/generate", {"text_input": "x", "parameters": {"top_p": 2}}, 400, "parameters.top_p"),
    ("/v2/models/{m}/generate", {"text_input": "x", "parameters": {"max_tokens": "many"}}, 400,
     "parameters.max_tokens"),
    ("/v2/models/{m}/generate_stream", {"text_input": "x", "parameters": {"beam_width": 4}}, 400,
     "parameters.beam_width"),
    ("/v2/models/{m}/generate", {"parameters": {}}, 400, "text_input"),
    ("/v2/models/{m}/generate", {"text_input": "x", "parameters": {"max_tokens": 100_000}}, 400, "max_model_len"),
    ("/v2/models/nope/generate", {"text_input": "x"}, 404, "nope"),
    ("/v2/models/{m}/versions/7/generate_stream", {"text_input": "x"}, 404, "version 7"),
    (f"/v2/models/{UNPUBLISHED_MODEL}/generate_stream", {"text_input": "x"}, 503, "no version published yet"),
])
def test_errors_are_the_protocols(generation_server, generation_model, path, body, status, needle):
    response = generation_server.http.post(path.format(m=generation_model), json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]  # {"error": "..."}, as the protocol says


def test_a_full_queue_is_429_on_generate_stream(generation_server, narrow_model):
    """With the narrow model's slot and queue taken, a stream is refused with a status, not an event."""
    server, labels = generation_server, {"model": narrow_model, "version": "1"}
    # sampled: greedy decoding of this random model holds its text back as partial UTF-8 to the end
    long = {"text_input": "The", "parameters": {"max_tokens": LONG, "ignore_eos": True, "temperature": 1, "seed": 1}}
    with httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(1) as pool:
        with http.stream("POST", f"/v2/models/{narrow_model}/generate_stream", json=long) as running:
            lines = running.iter_lines()
            next(lines)
            queued = pool.submit(httpx.post, f"{server.url}/v2/models/{narrow_model}/generate",
                                 json={"text_input": "The", "parameters": {"max_tokens": 2}}, timeout=60)
            wait_for_metric(server, "sampserve_sequences_waiting", 1, **labels)
            refused = server.http.post(f"/v2/models/{narrow_model}/generate_stream", json=long)
            assert refused.status_code == 429 and "max_waiting" in refused.json()["error"]
        assert queued.result().status_code == 200


# ---------------------------------------------------------------- the real server, in process


async def test_an_error_after_the_first_event_is_one_error_event(generation_repo):
    """The model's engine closes without draining while a stream runs: after the events already sent,
    one ``{"error": ...}`` event names the reason and ends the stream."""
    # sampled: the greedy text of this random model is mostly partial UTF-8, held back to the end
    ask = {"text_input": "The", "parameters": {"max_tokens": LONG, "ignore_eos": True, "temperature": 1, "seed": 1}}
    async with serve_in_process(generation_repo) as server, httpx.AsyncClient(base_url=server.url) as http:
        async with http.stream("POST", f"/v2/models/{GENERATION_MODEL}/generate_stream", json=ask) as response:
            assert response.status_code == 200
            chunks, raw = response.aiter_bytes(), b""
            while b"\n\n" not in raw:
                raw += await anext(chunks)
            await server.models.generator(GENERATION_MODEL).engine.close(drain=False)
            async for chunk in chunks:
                raw += chunk
        events = _events(raw.decode())
        assert events[0]["model_name"] == GENERATION_MODEL and events[0]["text_output"]
        assert events[-1] == {"error": f"{GENERATION_MODEL}/1 is shutting down"}
        assert not any("finish_reason" in e for e in events) and len(events) < LONG
        assert server.count(GENERATION_MODEL, "generate_stream", "unavailable") == 1


async def test_a_deadline_passing_in_the_queue_is_504_before_the_stream(generation_repo):
    """The narrow model's one slot is held by a long generation; a stream queued behind it gets no token
    within the request timeout: 504 with the protocol's error body, not an event."""
    async with serve_in_process(generation_repo, request_timeout_s=0.05) as server:
        holder = await server.dataplane.generate(NARROW_MODEL, None, prompt="The", timeout_s=60,
                                                 params=SamplingParams(max_tokens=LONG, ignore_eos=True))
        try:
            async with httpx.AsyncClient(base_url=server.url) as http:
                response = await http.post(f"/v2/models/{NARROW_MODEL}/generate_stream", json={"text_input": "hi"})
            assert response.status_code == 504 and "deadline" in response.json()["error"], response.text
            assert server.models.generator(NARROW_MODEL).engine.stats().waiting == 0
        finally:
            await holder.aclose()
