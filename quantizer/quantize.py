"""Apply a plan: the chosen units' weight MatMuls to INT8, everything else left in FP32.

Three forms, all from onnxruntime's quantization primitives:
- ``dynamic``: INT8 weights (symmetric, per channel), activations quantized at run time with one
  scale for the whole batch tensor: no calibration and usually the fastest, but a row's rounding
  depends on its batch-mates (a long or unusual input changes everyone's scale).
- ``static``: calibrated activation ranges (min-max, percentile or entropy) and symmetric
  per-channel weights; fixed scales, so rows do not depend on each other. onnxruntime writes a QDQ
  graph (MatMul outputs stay unquantized: quantizing them cost 0.08 Spearman here), which
  ``quantizer.fold`` turns into integer MatMuls that take the bias, with the residual connections
  left in FP32: faster and closer to FP32 on CPU. ``fold=False`` keeps the portable QDQ graph
  (TensorRT's explicit quantization reads it).
- ``blockwise``: MatMulNBits with 8-bit weights in blocks of 32 and accuracy level 4, which quantizes
  activations per row in blocks: no calibration, and rows do not depend on each other. The word
  embedding table (a Gather unit) is stored INT8 with per-row scales (weight only).
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

from quantizer.fold import fold_static
from quantizer.units import Unit

Mode = Literal["dynamic", "static", "blockwise"]
BLOCK = 32
"""Block length of the blockwise form's weights and activations."""
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
    fold: bool = True,
    calibration_cache: Path | None = None,
) -> Path:
    """Write ``out_path``: ``fp32_path`` with the units named in ``int8`` quantized. ``calibration_cache``: a
    JSON file onnxruntime fills with the activation ranges on first use and reads after (the ranges do not
    depend on the plan, and calibrating is most of the time of building a static plan)."""
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
    if mode == "blockwise":
        return _blockwise(Path(fp32_path), out_path, set(nodes))
    if mode == "dynamic":
        quantize_dynamic(
            str(fp32_path), str(out_path), op_types_to_quantize=["MatMul", "Gather"], per_channel=True,
            weight_type=QuantType.QInt8, nodes_to_quantize=nodes, extra_options={"MatMulConstBOnly": True},
        )
    else:
        if not calibration:
            raise ValueError("static quantization needs calibration batches")
        matmuls = [n for n in nodes if not n.endswith("Gather")]
        qdq_path = out_path.with_suffix(".qdq.onnx") if fold else out_path
        quantize_static(
            str(fp32_path), str(qdq_path), BatchReader(calibration), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], per_channel=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_quantize=matmuls,
            calibrate_method=CALIBRATION_METHODS[method], calibration_cache_path=calibration_cache,
            extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"], "MatMulConstBOnly": True},
        )
        if fold:
            fold_static(qdq_path, out_path)
            qdq_path.unlink()
    return out_path


def _blockwise(fp32_path: Path, out_path: Path, nodes: set[str]) -> Path:
    """The chosen MatMuls as MatMulNBits (8-bit, blocks of BLOCK, accuracy level 4); a chosen Gather (the
    word table) as a weight-only INT8 lookup."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(fp32_path))
    # nodes_to_include is not honoured by every onnxruntime version: exclude the others instead.
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in nodes]
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=BLOCK, is_symmetric=True, accuracy_level=4,
                                     nodes_to_exclude=exclude)
    quantizer.process()
    onnx.save(quantizer.model.model, str(out_path))
    gathers = [n.name for n in model.graph.node if n.op_type == "Gather" and n.name in nodes]
    if gathers:
        staged = out_path.with_suffix(".gather.onnx")
        quantize_dynamic(str(out_path), str(staged), op_types_to_quantize=["Gather"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_quantize=gathers)
        staged.replace(out_path)
    return out_path
