"""The Open Inference Protocol's BYTES wire format, shared by the REST binary extension and gRPC
raw contents: each element is a 4-byte little-endian length followed by that many bytes."""

from __future__ import annotations

from service.errors import InvalidInput


def decode_bytes_elements(blob: bytes, field: str) -> list[str]:
    """Raw BYTES contents -> texts; malformed lengths or non-UTF-8 text are the client's error."""
    out: list[str] = []
    offset = 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise InvalidInput(f"{field}: truncated BYTES element length")
        length = int.from_bytes(blob[offset : offset + 4], "little")
        offset += 4
        if offset + length > len(blob):
            raise InvalidInput(f"{field}: BYTES element runs past the data")
        out.append(utf8(blob[offset : offset + length], f"{field}: element {len(out)}"))
        offset += length
    return out


def utf8(value: bytes, where: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"{where} is not UTF-8 text") from None
