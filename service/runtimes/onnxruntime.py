"""The onnxruntime engine: the one place sessions are opened, for the server and the quantizer alike.

Graph optimization EXTENDED: INT8 kernels fuse only there (docs/design.md). A version may name fusions
to leave out (head.json ``disabled_optimizers``): SAMP times its plan with and without each fusion that
measured slower on some CPU (docs/design.md, "Fusions measured per machine") and records the faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort


def open_session(path: Path, threads: int | None = None, spinning: bool = True,
                 disabled_optimizers: Sequence[str] = (), providers: list[str] | None = None,
                 optimized_model_path: Path | None = None) -> ort.InferenceSession:
    """``spinning=False`` when several instances share the cores: an idle pool's threads then sleep
    instead of busy-waiting on cores another instance is computing on. ``optimized_model_path``: where
    onnxruntime writes the graph it runs (for inspection)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    chosen = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                           if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), options, providers=chosen,
                                disabled_optimizers=list(disabled_optimizers) or None)


class OnnxRuntime:
    def __init__(self, path: Path, threads: int | None = None, spinning: bool = True,
                 disabled_optimizers: Sequence[str] = ()) -> None:
        self.disabled_optimizers = tuple(disabled_optimizers)
        self.session = open_session(path, threads, spinning, self.disabled_optimizers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], {name: feed[name] for name in self.input_names})[0]

    def healthy(self) -> bool:
        return True
