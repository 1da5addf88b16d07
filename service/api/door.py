"""A raw ASGI door in front of FastAPI for the two calls most clients make: v2 infer
(``answer_infer``) and OpenAI's embeddings (``answer_embeddings``). Everything else goes to the app.

Why a door: at 64 clients on 2 cores, FastAPI's routing, dependency and middleware layers took 43%
of the event loop's CPU per infer request (2.8 vs 1.6 s per 12 s run), and that CPU is taken from
the model: with the door the server answered 12% more requests/s (docs/benchmarks.md). The same
held for /v1/embeddings, which served 359 req/s to v2 infer's 496 through FastAPI. FastAPI's routes
for both call the same answer functions, so each call has one parser, one validation and one error
mapping; the door only skips the framework's layers. The gate in front (``service.api.gate``) has
already applied the API key, the body limits and the request id.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson

from service.api import embeddings
from service.api.v2_infer import Reply, answer_infer
from service.dataplane import DataPlane

log = logging.getLogger("sampserve")
_INFER_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")


class FastDoor:
    def __init__(self, app: Any, dataplane: DataPlane) -> None:
        self.app, self.dataplane = app, dataplane

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        match = None if path == embeddings.PATH else _INFER_PATH.match(path)
        if match is None and path != embeddings.PATH:
            await self.app(scope, receive, send)
            return
        try:
            raw = await _body(receive)
            if raw is None:
                reply = Reply(499, b"")  # the client has gone; nothing will read the answer
            elif match is None:
                reply = await embeddings.answer_embeddings(self.dataplane, raw)
            else:
                header_length = next((v.decode("latin-1") for k, v in scope["headers"]
                                      if k == b"inference-header-content-length"), None)
                reply = await answer_infer(self.dataplane, match["name"], match["version"], raw, header_length)
        except Exception:  # what the framework's error middleware would do: a 500, logged, never a crash
            log.exception("request to %s failed", path[:100])
            reply = Reply(500, orjson.dumps({"error": "internal error; see the server log"}))
        headers = [(b"content-type", reply.content_type.encode()), (b"content-length", str(len(reply.body)).encode()),
                   *((k.lower().encode(), v.encode()) for k, v in reply.headers.items())]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})


async def _body(receive: Any) -> bytes | None:
    """The whole body (already bounded by the gate), or None when the client went away."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
