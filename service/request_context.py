"""What the access log and tracing know about the request in hand, whichever transport it came by.

The transport sets the id (taken from ``X-Request-Id`` / gRPC metadata, or made); the data plane
fills in the model and version as it resolves them. A context variable carries it, so no function
between the two needs a parameter for it.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

_ACCEPTED_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


@dataclass
class RequestInfo:
    id: str = ""
    model: str = ""
    version: str = ""


_current: ContextVar[RequestInfo | None] = ContextVar("sampserve_request", default=None)


def request_id(given: str | None) -> str:
    """The client's id when it is a short token (it is echoed and logged), else a new one."""
    if given and _ACCEPTED_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


def begin_request(given_id: str | None) -> RequestInfo:
    info = RequestInfo(id=request_id(given_id))
    _current.set(info)
    return info


def current_request() -> RequestInfo:
    """The request in hand; a throwaway record outside one (tests calling the data plane directly)."""
    return _current.get() or RequestInfo()
