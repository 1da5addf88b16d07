"""The onnxruntime engine: the one place sessions are opened, for the server and the quantizer alike.

Graph optimization EXTENDED: INT8 kernels fuse only there (docs/design.md). A version may name fusions
to leave out (head.json ``disabled_optimizers``): SAMP times its plan with and without each fusion that
measured slower on some CPU (docs/design.md, "Fusions measured per machine") and records the faster.

Execution providers come in an order of preference (TensorRT, CUDA, CPU by default; a model's config may
name its own): those this onnxruntime build lacks are skipped, and the CPU provider always closes the list,
so one repository serves on a CPU node and a GPU node alike. TensorRT builds its engines from the version's
graph on the node that runs it (Q/DQ pairs as INT8, the rest FP16 where asked) and keeps them in an engine
cache folder per model version, so a restart does not rebuild them and a new version never reuses an old
version's engines. None of the GPU providers has run on this project's machines (README).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from service.repository import ORT_PROVIDER_NAMES, OrtRuntimeConfig

if TYPE_CHECKING:
    from service.runtimes import RuntimeInfo, RuntimeSpec

log = logging.getLogger("sampserve.runtimes")

ProviderList = list[str | tuple[str, dict[str, Any]]]
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def engine_cache_dir(root: Path, model_path: Path) -> Path:
    """One TensorRT engine folder per graph: named by the graph's model and version folders and the first
    bytes of its SHA-256, so a republished version (or a different graph) never picks up stale engines."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    version_dir = Path(model_path).resolve().parent
    return Path(root) / f"{version_dir.parent.name}-{version_dir.name}-{digest.hexdigest()[:12]}"


def _shapes(names: Sequence[str], batch: int, length: int) -> str:
    """A TensorRT profile's shapes in onnxruntime's option syntax: ``input_ids:32x128,attention_mask:32x128``."""
    return ",".join(f"{n}:{batch}x{length}" for n in names)


def choose_providers(wanted: Sequence[str], available: Sequence[str], config: OrtRuntimeConfig,
                     cache_dir: Path | None = None, input_names: Sequence[str] = (), max_batch_size: int = 32,
                     max_length: int = 512) -> tuple[ProviderList, list[str]]:
    """onnxruntime's ``providers`` argument for the short names in ``wanted`` (in that order), keeping those
    in ``available``, the CPU provider last; and one line per provider skipped. TensorRT gets FP16/INT8 as
    configured, an engine and timing cache under ``cache_dir``, and one optimization profile spanning a
    token model's batch x length range (its engines then fit every batch the batcher forms)."""
    chosen: ProviderList = []
    skipped: list[str] = []
    for short in wanted:
        name = ORT_PROVIDER_NAMES[short]
        if short == "cpu":
            continue
        if name not in available:
            skipped.append(f"{name} not in this onnxruntime build (it has {', '.join(available)})")
            continue
        if short == "tensorrt":
            options: dict[str, Any] = {"trt_fp16_enable": config.tensorrt_fp16, "trt_int8_enable": config.tensorrt_int8}
            if cache_dir is not None:
                options.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                                "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_dir)})
            tokens = [n for n in input_names if n in TOKEN_INPUTS]
            if tokens:
                options.update({"trt_profile_min_shapes": _shapes(tokens, 1, 1),
                                "trt_profile_opt_shapes": _shapes(tokens, max_batch_size, min(128, max_length)),
                                "trt_profile_max_shapes": _shapes(tokens, max_batch_size, max_length)})
            chosen.append((name, options))
        else:
            chosen.append(name)
    chosen.append("CPUExecutionProvider")
    return chosen, skipped


def open_session(path: Path, threads: int | None = None, spinning: bool = True,
                 disabled_optimizers: Sequence[str] = (), providers: ProviderList | None = None,
                 optimized_model_path: Path | None = None) -> ort.InferenceSession:
    """``spinning=False`` when several instances share the cores: an idle pool's threads then sleep
    instead of busy-waiting on cores another instance is computing on. ``optimized_model_path``: where
    onnxruntime writes the graph it runs (for inspection). ``providers``: default, CUDA where this build
    has it, then the CPU (the quantizer's measuring sessions); the server passes ``choose_providers``'."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    chosen = providers or choose_providers(("cuda", "cpu"), ort.get_available_providers(), OrtRuntimeConfig())[0]
    return ort.InferenceSession(str(path), options, providers=chosen,
                                disabled_optimizers=list(disabled_optimizers) or None)


def session_info(session: ort.InferenceSession) -> RuntimeInfo:
    """What runs a session: its providers in order, the device of the first."""
    from service.runtimes import RuntimeInfo

    running = session.get_providers()
    device = "cpu" if running[0] == "CPUExecutionProvider" else f"cuda ({running[0]})"
    return RuntimeInfo("onnxruntime", device, "onnxruntime_onnx", {"providers": " > ".join(running)})


class OnnxRuntime:
    def __init__(self, path: Path, threads: int | None = None, spinning: bool = True,
                 disabled_optimizers: Sequence[str] = (), providers: ProviderList | None = None) -> None:
        self.disabled_optimizers = tuple(disabled_optimizers)
        self.session = open_session(path, threads, spinning, self.disabled_optimizers, providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        self.info: RuntimeInfo = session_info(self.session)

    @classmethod
    def from_spec(cls, spec: RuntimeSpec) -> OnnxRuntime:
        """The server's instance of a version: providers in the model's (else the server's) order."""
        path = spec.onnx_path
        wanted: list[str] = list(spec.ort.providers or spec.ort_providers)
        available = ort.get_available_providers()
        cache = None
        if "tensorrt" in wanted and "TensorrtExecutionProvider" in available and spec.engine_cache is not None:
            cache = engine_cache_dir(spec.engine_cache, path)
            cache.mkdir(parents=True, exist_ok=True)
        providers, skipped = choose_providers(wanted, available, spec.ort, cache, spec.input_names, spec.max_batch_size,
                                              spec.max_length)
        for line in skipped:
            log.info("%s: %s: skipped", path.parent, line)
        return cls(path, spec.threads, spec.spinning, spec.disabled_optimizers, providers)

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run([self.output_name], {name: feed[name] for name in self.input_names})[0]

    def healthy(self) -> bool:
        return True
