"""Server-sent events for the generation routes, closing their source however the response ends.

Why a subclass: when the client disconnects, the gate (service.api.gate) cancels the route while it
may be suspended in ``send``, with the event generator parked at a ``yield``; such a generator is
only finalized when the garbage collector gets to it, and until then the engine keeps the sequence's
slot. Closing the generator and the generation explicitly here frees it at once.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def event(payload: Any) -> bytes:
    """One ``data:`` event (orjson escapes newlines inside strings, so the JSON is one line)."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class EventStream(StreamingResponse):
    """``text/event-stream`` from ``events``; ``close`` (the generation's) runs when the response ends,
    normally, by an error or by a disconnect, even if ``events`` never started."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.events, self.close = events, close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.events.aclose()
            finally:
                await self.close()
