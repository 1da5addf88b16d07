"""The onnxruntime engine. Graph optimization EXTENDED: INT8 kernels fuse only there (docs/design.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


class OnnxRuntime:
    def __init__(self, path: Path, threads: int | None = None, spinning: bool = True) -> None:
        """``spinning=False`` when several instances share the cores: an idle pool's threads then
        sleep instead of busy-waiting on cores another instance is computing on."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], {name: feed[name] for name in self.input_names})[0]

    def healthy(self) -> bool:
        return True
