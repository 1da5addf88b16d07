"""OpenAI-compatible text generation: ``POST /v1/completions`` and ``POST /v1/chat/completions``,
whole or streamed as server-sent events (one module per endpoint family, as vLLM's entrypoints/openai).

Thin: a route validates its body (pydantic; sampling through ``SamplingParams``, so a bad value is
a 400 naming the field), starts a generation on the data plane and renders its deltas in OpenAI's
shapes. The data plane returns a generation with its first delta computed, so an error before the
first token (404, 429, 503, 504, a prompt too long) is a plain JSON error with its status; after it,
one ``data: {"error": {...}}`` event ends the stream (without ``[DONE]``: the answer is incomplete).
Fields OpenAI defines that this server cannot honour (n > 1, logprobs, penalties other than 0) are a
400 naming the field rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field, field_validator

from service.api.bodies import documented, parse_body
from service.api.http_errors import error_body
from service.api.sse import EventStream, event
from service.api.v2_infer import StrictBody
from service.dataplane import DataPlane, Generation
from service.errors import InvalidInput, ServiceError
from service.generation import Delta, SamplingParams

DONE = b"data: [DONE]\n\n"
COMPLETIONS_MAX_TOKENS = 16
"""OpenAI's default for /v1/completions; chat's default is what the context leaves after the prompt."""
OPENAI_TEMPERATURE = 1.0

# ---------------------------------------------------------------- schemas


class StreamOptions(StrictBody):
    include_usage: bool = False
    """One more chunk before ``[DONE]`` with the usage and no choices; the other chunks carry ``usage: null``."""


class SamplingFields(StrictBody):
    """What both endpoints share: OpenAI's sampling fields, and vLLM's extensions top_k,
    repetition_penalty and ignore_eos."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None

    def unsupported(self) -> None:
        """Fields whose non-default values this server cannot honour: a 400 naming them."""
        if self.n not in (None, 1):
            raise InvalidInput(f"n: {self.n} choices asked; this server returns one choice per request (n=1)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise InvalidInput(f"{name}: not supported (only 0); use repetition_penalty")
        if self.stream_options is not None and not self.stream:
            raise InvalidInput("stream_options: only allowed with stream=true")

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        self.unsupported()
        return SamplingParams.parse({
            "max_tokens": max_tokens,
            "temperature": OPENAI_TEMPERATURE if self.temperature is None else self.temperature,
            "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed, "stop": self.stop,
            "repetition_penalty": self.repetition_penalty, "ignore_eos": self.ignore_eos})

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    """One prompt (a list of one string is accepted, as clients batch by default)."""
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise InvalidInput(f"prompt: {len(self.prompt)} prompts; this server takes one prompt per request")
        return self.prompt[0]

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs:
            raise InvalidInput("logprobs: not supported")
        if self.echo:
            raise InvalidInput("echo: not supported")
        if self.best_of not in (None, 1):
            raise InvalidInput("best_of: only 1 is supported")
        if self.suffix:
            raise InvalidInput("suffix: not supported")


class ChatMessage(StrictBody):
    role: str
    content: str | None = None
    """A string, or OpenAI's text parts (joined by newlines, as vLLM does); None is an empty message."""
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError('only text parts are supported ({"type": "text", "text": "..."})')
            texts.append(part["text"])
        return "\n".join(texts)

    def as_dict(self) -> dict[str, str]:
        message = {"role": self.role, "content": self.content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs or self.top_logprobs:
            raise InvalidInput("logprobs: not supported")


# ---------------------------------------------------------------- rendering


def usage(delta: Delta) -> dict[str, int]:
    return {"prompt_tokens": delta.prompt_tokens, "completion_tokens": delta.completion_tokens,
            "total_tokens": delta.prompt_tokens + delta.completion_tokens}


def json_response(payload: Any) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


async def events(generation: Generation, chunk: Callable[[Delta], list[dict[str, Any]]], envelope: dict[str, Any],
                 include_usage: bool, opening: list[dict[str, Any]] | None = None) -> AsyncGenerator[bytes, None]:
    """SSE chunks: ``opening`` choices (chat's role), ``chunk(delta)``'s choices per delta, the usage
    chunk if asked, ``[DONE]``; an error mid-stream is one error event and the end."""
    nulls = {"usage": None} if include_usage else {}
    last: Delta | None = None
    try:
        if opening:
            yield event({**envelope, "choices": opening, **nulls})
        async for delta in generation.deltas:
            for choice in chunk(delta):
                yield event({**envelope, "choices": [choice], **nulls})
            last = delta
    except ServiceError as exc:
        yield b"data: " + error_body(exc, "/v1")[1] + b"\n\n"
        return
    if include_usage and last is not None:
        yield event({**envelope, "choices": [], "usage": usage(last)})
    yield DONE


def completion_choices(delta: Delta) -> list[dict[str, Any]]:
    if not delta.text and delta.finish_reason is None:
        return []  # text held back (a partial character or a possible stop string): nothing to send yet
    return [{"index": 0, "text": delta.text, "logprobs": None, "finish_reason": delta.finish_reason}]


def chat_choices(delta: Delta) -> list[dict[str, Any]]:
    choices: list[dict[str, Any]] = []
    if delta.text:
        choices.append({"index": 0, "delta": {"content": delta.text}, "logprobs": None, "finish_reason": None})
    if delta.finish_reason is not None:
        choices.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": delta.finish_reason})
    return choices


# ---------------------------------------------------------------- routes


def router(dataplane: DataPlane) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/completions", openapi_extra=documented(CompletionRequest))
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest)
        params = body.sampling(COMPLETIONS_MAX_TOKENS if body.max_tokens is None else body.max_tokens)
        generation = await dataplane.generate(body.model, None, prompt=body.text(), params=params,
                                              endpoint="completions")
        envelope = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                    "model": body.model}
        if body.stream:
            return EventStream(events(generation, completion_choices, envelope, body.include_usage),
                               generation.aclose)
        text, last = await generation.collect()
        return json_response({**envelope, "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": last.finish_reason}], "usage": usage(last)})

    @api.post("/v1/chat/completions", openapi_extra=documented(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        given = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = body.sampling(given)
        generation = await dataplane.generate(body.model, None, messages=[m.as_dict() for m in body.messages],
                                              params=params, endpoint="chat_completions",
                                              fill_max_tokens=given is None)
        envelope = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
        if body.stream:
            opening = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}]
            return EventStream(events(generation, chat_choices, {**envelope, "object": "chat.completion.chunk"},
                                      body.include_usage, opening), generation.aclose)
        text, last = await generation.collect()
        return json_response({**envelope, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": last.finish_reason}], "usage": usage(last)})

    return api
