"""Inference sessions for exported graphs, opened as the server opens them.

onnxruntime runs at graph optimization level EXTENDED: INT8 kernel fusions only happen there
(147 vs 220 ms), while the transformer-specific fusions of the offline optimizer were slower than
the unfused graph on the 2-core AVX-512 VNNI Xeon it was measured on and are not applied
(docs/design.md, "Quantization"). Sessions are opened by the server's own function, so that SAMP
measures what the server runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from service.runtimes.onnxruntime import ProviderList, open_session


def available_providers() -> list[str]:
    return ort.get_available_providers()


def ort_session(path: Path, threads: int | None = None, providers: ProviderList | None = None,
                disabled_optimizers: Sequence[str] = ()) -> ort.InferenceSession:
    """A session opened exactly as the server opens it (service.runtimes.onnxruntime)."""
    return open_session(path, threads, disabled_optimizers=disabled_optimizers, providers=providers)
