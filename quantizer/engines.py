"""Inference engines for exported graphs: onnxruntime always, TensorRT where it imports.

onnxruntime runs at graph optimization level EXTENDED: INT8 kernel fusions only happen there
(147 vs 220 ms), while the transformer-specific fusions of the offline optimizer were slower than
the unfused graph on the 2-core AVX-512 VNNI Xeon it was measured on and are not applied
(docs/design.md, "Quantization"). Sessions are opened by the server's own function, so that SAMP
measures what the server runs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from service.runtimes.onnxruntime import open_session


def available_providers() -> list[str]:
    return ort.get_available_providers()


def ort_session(path: Path, threads: int | None = None, providers: list[str] | None = None,
                disabled_optimizers: Sequence[str] = ()) -> ort.InferenceSession:
    """A session opened exactly as the server opens it (service.runtimes.onnxruntime)."""
    return open_session(path, threads, disabled_optimizers=disabled_optimizers, providers=providers)


def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT can build engines here, and a one-line reason when it cannot."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "TensorRT engine skipped: the tensorrt package is not installed (pip install '.[gpu]')"
    try:
        import torch  # only to ask for a GPU: tensorrt needs CUDA

        if not torch.cuda.is_available():
            return False, "TensorRT engine skipped: no CUDA device"
    except ImportError:
        pass
    return True, ""


def build_tensorrt_engine(onnx_path: Path, plan_path: Path, int8: bool = True, fp16: bool = True) -> Path:
    """Build ``model.plan`` from a QDQ graph (explicit quantization): INT8 where Q/DQ nodes say so,
    FP16 elsewhere. Call only when ``tensorrt_available()`` is true."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        profile.set_shape(name, (1, 1), (8, 128), (32, 512))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError("TensorRT engine build failed")
    Path(plan_path).write_bytes(bytes(serialized))
    return Path(plan_path)
