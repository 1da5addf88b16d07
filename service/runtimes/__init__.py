"""Runtimes: a small interface (load, run, input/output metadata, health) and its engines by name.

An engine's module is imported only when a model's config names it: the CPU image never imports torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from service.repository import ONNX_FILE, OrtRuntimeConfig, TorchRuntimeConfig


@dataclass(frozen=True)
class RuntimeInfo:
    """What actually runs a version: shown in its model metadata, its metrics and the log."""

    runtime: str
    """The engine's name in RUNTIMES."""
    device: str
    """Where it computes: ``cpu``, ``cuda:0 (NVIDIA H200)``; for onnxruntime, its first provider's device."""
    platform: str
    """Triton's platform name for the model metadata (``onnxruntime_onnx``, ``pytorch_libtorch``)."""
    detail: dict[str, str] = field(default_factory=dict)
    """Engine specifics (onnxruntime's providers in order, the PyTorch plan's dtype and INT8 units)."""

    def describe(self) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in self.detail.items())
        return f"{self.runtime} on {self.device}" + (f" ({extra})" if extra else "")


@dataclass(frozen=True)
class RuntimeSpec:
    """Everything a runtime factory may need to load one version."""

    version_dir: Path
    input_names: tuple[str, ...] = ()
    """The version's inputs (head.json), in order."""
    threads: int | None = None
    """onnxruntime intra-op threads (None: all cores)."""
    spinning: bool = True
    """Whether idle onnxruntime threads may spin (False when several instances share the cores)."""
    disabled_optimizers: tuple[str, ...] = ()
    """Graph fusions the version runs without (head.json; an engine without such fusions ignores them)."""
    ort: OrtRuntimeConfig = field(default_factory=OrtRuntimeConfig)
    ort_providers: tuple[str, ...] = ("tensorrt", "cuda", "cpu")
    """The server's provider order, used where the model's config names none."""
    engine_cache: Path | None = None
    """Where TensorRT engines built on this node are kept (one folder per model version)."""
    torch: TorchRuntimeConfig = field(default_factory=TorchRuntimeConfig)
    max_batch_size: int = 32
    max_length: int = 512

    @property
    def onnx_path(self) -> Path:
        return self.version_dir / ONNX_FILE


class Runtime(Protocol):
    input_names: list[str]
    output_name: str
    info: RuntimeInfo

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """One batch in (int64 token arrays of shape (batch, sequence), or a tensor model's float input), the
        head's output (float32) out."""
        ...

    def healthy(self) -> bool: ...


def _onnxruntime(spec: RuntimeSpec) -> Runtime:
    from service.runtimes.onnxruntime import OnnxRuntime

    return OnnxRuntime.from_spec(spec)


def _pytorch(spec: RuntimeSpec) -> Runtime:
    from service.runtimes.pytorch import TorchRuntime

    return TorchRuntime(spec)


RUNTIMES: dict[str, Callable[[RuntimeSpec], Runtime]] = {"onnxruntime": _onnxruntime, "pytorch": _pytorch}
"""Each factory builds one instance of a version's runtime from its RuntimeSpec."""
