"""The Open Inference Protocol's BYTES wire format, shared by the REST binary extension and gRPC
raw contents: each element is a 4-byte little-endian length followed by that many bytes."""

from __future__ import annotations

from service.errors import InvalidInput


def decode_bytes_elements(blob: bytes | memoryview, field: str, expected: int) -> list[str]:
    """Raw BYTES contents -> exactly ``expected`` texts. Malformed lengths, non-UTF-8 text or another
    number of elements are the client's error, found without reading past element ``expected``."""
    out: list[str] = []
    offset = 0
    view = memoryview(blob)
    while offset < len(view):
        if len(out) == expected:
            raise InvalidInput(f"{field}: the shape declares {expected} elements, the data holds more")
        if offset + 4 > len(view):
            raise InvalidInput(f"{field}: truncated BYTES element length")
        length = int.from_bytes(view[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(f"{field}: BYTES element runs past the data")
        out.append(utf8(view[offset : offset + length], f"{field}: element {len(out)}"))
        offset += length
    if len(out) != expected:
        raise InvalidInput(f"{field}: the shape declares {expected} elements, the data holds {len(out)}")
    return out


def utf8(value: bytes | memoryview, where: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{where} is not UTF-8 text") from None
