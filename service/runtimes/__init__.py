"""Runtimes: a small interface (load, run, input/output metadata, health) and its engines by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np


class Runtime(Protocol):
    input_names: list[str]
    output_name: str

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """One batch in (int64 arrays of shape (batch, sequence)), the head's output out."""
        ...

    def healthy(self) -> bool: ...


def _onnxruntime(path: Path, threads: int | None, spinning: bool, disabled_optimizers: Sequence[str]) -> Runtime:
    from service.runtimes.onnxruntime import OnnxRuntime

    return OnnxRuntime(path, threads, spinning, disabled_optimizers)


RUNTIMES: dict[str, Callable[[Path, int | None, bool, Sequence[str]], Runtime]] = {"onnxruntime": _onnxruntime}
"""Each factory takes the model file, intra-op threads, whether idle threads may spin, and the graph
fusions the version runs without (head.json; an engine without such fusions ignores them)."""
