"""A server plugin for tests (``--plugins tests.service.hanging_runtime``): the runtime ``hanging``,
the real onnxruntime engine except that ``run()`` blocks while the file named by
``$SAMPSERVE_TEST_HANG_FLAG`` exists (checked every 50 ms, so removing the file releases every
stuck call). It stands for a runtime that wedges: a deadlocked GPU driver, a kernel that never returns.
A model uses it with ``"runtime": "hanging"`` in its config.json."""

from __future__ import annotations

import os
import time

import numpy as np

from service.runtimes import RUNTIMES, RuntimeSpec
from service.runtimes.onnxruntime import OnnxRuntime

FLAG_ENV = "SAMPSERVE_TEST_HANG_FLAG"
MAX_HANG_S = 120.0  # a test that forgets its flag leaves no call stuck for good


class HangingRuntime(OnnxRuntime):
    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        flag = os.environ.get(FLAG_ENV)
        deadline = time.monotonic() + MAX_HANG_S
        while flag and os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().run(feed)


def _hanging(spec: RuntimeSpec) -> HangingRuntime:
    return HangingRuntime(spec.onnx_path, spec.threads, spec.spinning, spec.disabled_optimizers)


RUNTIMES["hanging"] = _hanging
