"""Sockets for the servers (kept apart from the gRPC stubs so tools can import it alone)."""

from __future__ import annotations

import errno
import socket


class PortInUse(OSError):
    """A port the server was told to use cannot be bound; the message names the setting to change."""


def bind(host: str, port: int) -> socket.socket:
    """The listening socket. IPPROTO_TCP explicitly: asyncio only turns Nagle off (TCP_NODELAY) on
    sockets that say so, and with Nagle on, a keep-alive response written as headers + body waits
    for the client's delayed ACK (~40 ms per request, measured)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def bind_port(host: str, port: int, what: str, setting: str) -> socket.socket:
    """``bind``, with a failure that says which port, why, and which setting moves it (one line)."""
    try:
        return bind(host, port)
    except OSError as exc:
        raise PortInUse(port_message(host, port, what, setting, exc)) from None


def port_message(host: str, port: int, what: str, setting: str, exc: BaseException | None) -> str:
    flag = "--" + setting.replace("_", "-")
    why = "is in use (another server?)" if exc is None or getattr(exc, "errno", None) == errno.EADDRINUSE \
        else f"cannot be bound ({exc})"
    return (f"{what} port {port} on {host} {why}; choose another with {flag} or SAMPSERVE_{setting.upper()} "
            "(0: any free)")
