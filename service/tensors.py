"""Input tensors as the transports receive them, and the Open Inference Protocol's wire formats:
BYTES elements (a 4-byte little-endian length, then that many bytes) and fixed-size numbers, shared by
the REST binary extension, JSON data and gRPC's raw or typed contents."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import InvalidInput

NUMPY_TYPES: dict[str, np.dtype] = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}
"""The numeric datatypes a head takes, as little-endian numpy types (the protocol's byte order)."""


@dataclass
class TensorInput:
    """A v2 input tensor as a transport received it. Its elements are decoded only once its declared
    shape has passed the limits, so a message of a million elements costs nothing to refuse."""

    name: str
    datatype: str
    shape: Sequence[int]
    decode: Callable[[int], list[Any]]
    """BYTES elements, given how many the shape declares: InvalidInput if the data holds another number
    (found without decoding past that number) or a malformed element."""
    raw: bytes | memoryview | None = None
    """The binary extension's (or gRPC's raw) bytes of this tensor, for numeric datatypes."""
    values: Sequence[Any] | None = None
    """The elements given as numbers (JSON data, gRPC typed contents), flattened row-major."""

    def array(self, where: str) -> np.ndarray:
        """A numeric tensor's elements as a flat numpy array of its datatype, after its shape (checked by
        the caller) and its byte or element count agree; JSON numbers must fit the type exactly."""
        dtype = NUMPY_TYPES[self.datatype]
        count = math.prod(self.shape)
        if self.raw is not None:
            if len(self.raw) != count * dtype.itemsize:
                raise InvalidInput(f"{where}: shape {list(self.shape)} of {self.datatype} is {count * dtype.itemsize} "
                                   f"bytes; the data holds {len(self.raw)}")
            return np.frombuffer(self.raw, dtype=dtype, count=count)
        if self.values is None:
            raise InvalidInput(f"{where}: no data (give data, or binary_data_size with the binary extension)")
        if len(self.values) != count:
            raise InvalidInput(f"{where}: shape {list(self.shape)} holds {count} elements, data has {len(self.values)}")
        if self.datatype == "UINT8":
            if any(type(v) is not int or not 0 <= v <= 255 for v in self.values):
                raise InvalidInput(f"{where}: UINT8 data must be integers 0..255")
        elif any(type(v) not in (int, float) for v in self.values):
            raise InvalidInput(f"{where}: {self.datatype} data must be numbers")
        return np.asarray(self.values, dtype=dtype)


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
