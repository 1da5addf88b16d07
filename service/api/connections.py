"""Connection limits uvicorn does not have: a cap on open connections and a deadline for headers.

uvicorn closes a keep-alive connection after ``timeout_keep_alive`` only once a response has been
sent; a connection that never sends a request, or sends its headers a byte at a time (slowloris),
stays open for good, and enough of them exhaust the process's file descriptors. This protocol,
uvicorn's own httptools protocol (chosen with ``--http``, its documented extension point) plus two
timers, closes a connection that has not sent complete request headers within ``header_timeout_s``
of connecting or of starting a request, refuses connections beyond ``max_connections``, and at
shutdown drops idle connections at once (TLS ones included).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def guarded_protocol(header_timeout_s: float, max_connections: int, on_refused: Any = None) -> type[HttpToolsProtocol]:
    """An httptools protocol class with the two limits bound in (uvicorn instantiates the class)."""

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                if on_refused is not None:
                    on_refused("max_connections")
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if on_refused is not None:
                on_refused("header_timeout")
            if not self.transport.is_closing():
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def shutdown(self) -> None:
            """At SIGTERM an idle connection goes at once. uvicorn closes it, which over TLS waits for
            the client's close_notify: an idle keep-alive client held the drain for its whole grace."""
            if self.cycle is None or self.cycle.response_complete:
                self._disarm()
                self.transport.abort()  # nothing is in flight on it: nothing to lose
            else:
                super().shutdown()

    return GuardedHttpToolsProtocol
