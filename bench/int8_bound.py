"""How much INT8 can buy on this CPU: the bound behind bench/quantize.py's ratios.

    python bench/int8_bound.py           # writes its section of docs/benchmarks.md

SAMP's speed comes from onnxruntime's INT8 matrix multiplies. Their gain over FP32 depends on the
CPU: with AVX-512 VNNI (or AVX-VNNI) a u8 x s8 dot product is one instruction; with plain AVX2 it
takes two and the gain roughly halves. This measures, side by side in one run:

1. the rate of one FP32 MatMul and of its dynamic INT8 form (u8 activations x s8 weights, per
   channel, what SAMP emits) at MiniLM's FFN shape (4096 tokens x 384 x 1536);
2. PyTorch eager FP32 on all-MiniLM-L6-v2 at batch 32, sequence 128 (the denominator of the 2.5x
   bar in issue 4), and onnxruntime with every weight MatMul in INT8, profiled by operator;
3. the best ratio to PyTorch INT8 could give if every linear layer ran at the measured INT8 rate and
   the rest of the graph cost nothing (GEMM-only bound), and with the rest as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.docs import machine, write_section  # noqa: E402
from quantizer.engines import ort_session  # noqa: E402
from quantizer.export import export_onnx  # noqa: E402
from quantizer.quantize import apply_plan  # noqa: E402
from quantizer.units import find_units  # noqa: E402
from training.jobs import bundled_minilm_dir, console, import_checkpoint  # noqa: E402

MARKS = ("<!-- bench/int8_bound.py begin -->", "<!-- bench/int8_bound.py end -->")
GEMM_KERNELS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def gemm_models(m: int, k: int, n: int, work: Path) -> dict[str, Path]:
    """One FP32 MatMul and its dynamic INT8 form, quantized by the same call SAMP makes (onnxruntime
    fuses it to DynamicQuantizeMatMul at graph optimization level EXTENDED, as in the served model)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    weight = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="ffn")], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(weight, "w")])
    fp32 = work / "gemm-fp32.onnx"
    fp32.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    int8 = work / "gemm-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
    return {"fp32": fp32, "int8": int8}


def gemm_rates(threads: int, repeats: int, work: Path, shape: tuple[int, int, int] = (4096, 384, 1536)
               ) -> dict[str, float]:
    """GMAC/s of the FP32 and the dynamic INT8 MatMul at ``shape`` (m, k, n)."""
    m, k, n = shape
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    rates = {}
    for name, path in gemm_models(m, k, n, work).items():
        session = ort_session(path, threads)
        rates[name] = m * k * n / median_ms(lambda s=session: s.run(None, {"x": x}), repeats) / 1e6
    return rates


def op_profile(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int = 3) -> Counter:
    """Milliseconds per operator type, averaged over ``runs`` profiled runs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Counter = Counter()
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    for event in kernels[len(kernels) // (runs + 1):]:  # skip the warm-up run
        per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return per_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-int8-"))

    rates = gemm_rates(args.threads, args.repeats, work)
    console.print(f"MatMul 4096x384x1536: FP32 {rates['fp32']:.1f} GMAC/s, INT8 {rates['int8']:.1f} GMAC/s "
                  f"({rates['int8'] / rates['fp32']:.2f}x)")

    checkpoint = import_checkpoint(bundled_minilm_dir(), work / "minilm")
    info = export_onnx(checkpoint, work / "fp32.onnx")
    units = find_units(info.path)
    int8_path = apply_plan(info.path, work / "int8.onnx", units, {u.name for u in units})
    batch, length = 32, 128
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, (batch, length))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    model = checkpoint.model.eval()
    tensors = [torch.from_numpy(feed[name]) for name in info.input_names]
    with torch.no_grad():
        eager = median_ms(lambda: model(*tensors), args.repeats)
    sessions = {name: ort_session(path, args.threads) for name, path in (("fp32", info.path), ("int8", int8_path))}
    ort_ms = {name: median_ms(lambda s=s: s.run(None, {i.name: feed[i.name] for i in s.get_inputs()}), args.repeats)
              for name, s in sessions.items()}
    profile = op_profile(int8_path, feed, args.threads)
    gemm_ms = sum(v for k, v in profile.items() if k in GEMM_KERNELS)
    rest_ms = sum(v for k, v in profile.items() if k not in GEMM_KERNELS)
    hidden, ffn, layers = 384, 1536, 6
    macs = layers * batch * length * (4 * hidden * hidden + 2 * hidden * ffn)
    gemm_only_ms = macs / rates["int8"] / 1e6
    console.print(f"PyTorch eager {eager:.0f} ms; onnxruntime FP32 {ort_ms['fp32']:.0f} ms, all-INT8 "
                  f"{ort_ms['int8']:.0f} ms ({eager / ort_ms['int8']:.2f}x eager); INT8 profile: weight GEMMs "
                  f"{gemm_ms:.0f} ms, the rest {rest_ms:.0f} ms; GEMM-only bound {eager / gemm_only_ms:.2f}x")

    top = ", ".join(f"{k} {v:.0f}" for k, v in profile.most_common() if k not in GEMM_KERNELS and v >= 5)
    text = "\n".join([
        "## What INT8 can buy on this CPU", "",
        f"`python bench/int8_bound.py` ({machine()}, {args.threads} threads, onnxruntime {ort.__version__}, "
        f"torch {torch.__version__}, median of {args.repeats}). Explains the SAMP ratios above: the INT8 "
        "gain is set by the CPU's INT8 dot-product instructions.", "",
        "| measurement | value |", "|---|---|",
        f"| MatMul 4096x384x1536, FP32 | {rates['fp32']:.1f} GMAC/s |",
        f"| same, dynamic INT8 (u8 x s8, as SAMP emits) | {rates['int8']:.1f} GMAC/s "
        f"(**{rates['int8'] / rates['fp32']:.2f}x** FP32) |",
        f"| all-MiniLM-L6-v2, batch 32 x 128, PyTorch eager FP32 | {eager:.0f} ms |",
        f"| same, onnxruntime FP32 | {ort_ms['fp32']:.0f} ms ({eager / ort_ms['fp32']:.2f}x eager) |",
        f"| same, onnxruntime all weight MatMuls INT8 | {ort_ms['int8']:.0f} ms "
        f"(**{eager / ort_ms['int8']:.2f}x** eager) |",
        f"| its profile: INT8 weight GEMMs / everything else | {gemm_ms:.0f} ms / {rest_ms:.0f} ms ({top}) |",
        f"| {macs / 1e9:.1f} GMAC of linear layers at the INT8 rate, nothing else | {gemm_only_ms:.0f} ms "
        f"(bound: {eager / gemm_only_ms:.2f}x eager) |",
        f"| 2.5x eager (issue 4's bar): time allowed / left for everything but the INT8 GEMMs | "
        f"{eager / 2.5:.0f} ms / {eager / 2.5 - gemm_only_ms:.0f} ms (now {rest_ms:.0f} ms) |",
        "", "Reading: INT8 cannot beat PyTorch eager by more than the GEMM-only bound, and only approaches it "
        "if attention, softmax, normalization and GELU cost nothing; the all-INT8 row is what the "
        "mixed plans of bench/quantize.py can at most reach (they keep some units FP32).",
    ])
    write_section(text + "\n", args.out, MARKS)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
