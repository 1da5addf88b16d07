"""Apply a plan: the chosen units' weight MatMuls to INT8, everything else left in FP32.

Two forms, both from onnxruntime's quantization primitives:
- ``dynamic``: INT8 weights (symmetric, per channel), activations quantized at run time. No
  calibration; the fastest on the CPUs measured (docs/design.md, "Quantization").
- ``static``: QDQ graph with calibrated activation ranges (min-max, percentile or entropy) and
  symmetric per-channel weights; the one file serves onnxruntime on CPU and TensorRT's explicit
  quantization on GPU. MatMul outputs stay unquantized (quantizing them cost 0.08 Spearman here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from quantizer.units import Unit

Mode = Literal["dynamic", "static"]
CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


class BatchReader(CalibrationDataReader):
    """Feeds calibration batches to onnxruntime's calibrator. Batches must share one sequence
    length: the percentile and entropy calibrators fail on ragged lengths (docs/design.md)."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]]) -> None:
        self._batches = list(batches)
        self._iter = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def apply_plan(
    fp32_path: Path,
    out_path: Path,
    units: list[Unit],
    int8: set[str],
    mode: Mode = "dynamic",
    calibration: list[dict[str, np.ndarray]] | None = None,
    method: str = "minmax",
) -> Path:
    """Write ``out_path``: ``fp32_path`` with the units named in ``int8`` quantized."""
    unknown = int8 - {u.name for u in units}
    if unknown:
        raise ValueError(f"plan names units the graph does not have: {sorted(unknown)}")
    nodes = [n for u in units if u.name in int8 for n in u.nodes]
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not nodes:
        out_path.write_bytes(Path(fp32_path).read_bytes())
        return out_path
    logging.getLogger("root").setLevel(logging.ERROR)  # the quantizer logs every skipped node
    if mode == "dynamic":
        quantize_dynamic(
            str(fp32_path), str(out_path), op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
            weight_type=QuantType.QInt8, nodes_to_quantize=nodes, extra_options={"MatMulConstBOnly": True},
        )
    else:
        if not calibration:
            raise ValueError("static quantization needs calibration batches")
        matmuls = [n for n in nodes if not n.endswith("Gather")]
        quantize_static(
            str(fp32_path), str(out_path), BatchReader(calibration), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_quantize=matmuls,
            calibrate_method=CALIBRATION_METHODS[method],
            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"], "MatMulConstBOnly": True},
        )
    return out_path
