"""How much INT8 can buy on this CPU: the bound behind bench/quantize.py's ratios.

    python bench/int8_bound.py           # writes its section of docs/benchmarks.md

SAMP's speed comes from onnxruntime's INT8 matrix multiplies. Their gain over FP32 depends on the
CPU: with AVX-512 VNNI (or AVX-VNNI) a u8 x s8 dot product is one instruction; with plain AVX2 it
takes two and the gain roughly halves. This measures, side by side in one run:

1. the rate of one FP32 MatMul and of its dynamic INT8 form (u8 activations x s8 weights, per
   channel, what SAMP emits) at MiniLM's FFN shape (4096 tokens x 384 x 1536);
2. PyTorch eager FP32 on all-MiniLM-L6-v2 at batch 32, sequence 128 (the denominator of SAMP's
   speed bars: 2.5x in issue 4, 3x in issue 17 on INT8 dot-product CPUs), onnxruntime FP32, and every
   weight MatMul in INT8 in the two forms SAMP builds for encoders (dynamic, and static folded, the
   batch-invariant default), timed in the same interleaved rounds (``quantizer.timing``; ratios are
   medians of round-by-round ratios); the static graph profiled by operator;
3. the best ratio to PyTorch INT8 could give if every linear layer ran at the measured INT8 rate and
   the rest of the graph cost nothing (GEMM-only bound), and with the rest as measured.

Each instruction set keeps its own section of docs/benchmarks.md, so an AVX2 run and a VNNI run
stand side by side.
"""

from __future__ import annotations

import argparse
import functools
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

from bench.docs import int8_isa, machine, write_section  # noqa: E402
from quantizer.engines import ort_session  # noqa: E402
from quantizer.export import export_onnx  # noqa: E402
from quantizer.measure import fixed_shape_feed, session_runner, torch_runner  # noqa: E402
from quantizer.quantize import apply_plan  # noqa: E402
from quantizer.timing import TimingPolicy, measure, paired_ratio  # noqa: E402
from quantizer.units import find_units  # noqa: E402
from training.data.gettext_topics import load_gettext_topics  # noqa: E402
from training.jobs import bundled_minilm_dir, console, import_checkpoint  # noqa: E402

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
    parser.add_argument("--repeats", type=int, default=7, help="runs per GEMM-rate median")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds over the MiniLM engines")
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
    texts = [r["text"] for r in load_gettext_topics(max_per_topic=40, seed=0)]
    pad = checkpoint.config.pad_token_id
    batch, length = 32, 128
    calibration = [fixed_shape_feed(checkpoint.tokenizer, texts[i * 16:], 16, length, pad, info.input_names)
                   for i in range(4)]
    everything = {u.name for u in units}
    plans = {"dynamic": apply_plan(info.path, work / "dynamic.onnx", units, everything),
             "static": apply_plan(info.path, work / "static.onnx", units, everything, "static", calibration)}
    feed = fixed_shape_feed(checkpoint.tokenizer, texts[64:], batch, length, pad, info.input_names)
    model = checkpoint.model.eval()
    sessions = {name: ort_session(path, args.threads) for name, path in (("fp32", info.path), *plans.items())}
    # the same runners SAMP times, so the two benches measure alike
    runners = {"eager": functools.partial(torch_runner(model, info.input_names), feed),
               **{name: functools.partial(session_runner(s), feed) for name, s in sessions.items()}}
    timings, quiet = measure(runners, TimingPolicy(rounds=args.rounds, max_rounds=max(args.rounds, 20)))
    ms = {name: t.median_ms for name, t in timings.items()}
    vs = {name: paired_ratio(timings["eager"], timings[name]) for name in sessions}
    profile = op_profile(plans["static"], feed, args.threads)
    gemm_ms = sum(v for k, v in profile.items() if k in GEMM_KERNELS)
    rest_ms = sum(v for k, v in profile.items() if k not in GEMM_KERNELS)
    hidden, ffn, layers = 384, 1536, 6
    macs = layers * batch * length * (4 * hidden * hidden + 2 * hidden * ffn)
    gemm_only_ms = macs / rates["int8"] / 1e6
    bound = ms["eager"] / gemm_only_ms
    console.print(f"PyTorch eager {ms['eager']:.0f} ms; onnxruntime FP32 {ms['fp32']:.0f} ms, all-INT8 dynamic "
                  f"{ms['dynamic']:.0f} ms ({vs['dynamic']:.2f}x eager), static folded {ms['static']:.0f} ms "
                  f"({vs['static']:.2f}x); static profile: weight GEMMs {gemm_ms:.0f} ms, the rest {rest_ms:.0f} ms; "
                  f"GEMM-only bound {bound:.2f}x; timing {'quiet' if quiet.quiet else 'BUSY: ' + quiet.reason}")

    top = ", ".join(f"{k} {v:.0f}" for k, v in profile.most_common() if k not in GEMM_KERNELS and v >= 5)
    bar = 3.0 if int8_isa() in ("AVX-512 VNNI", "AVX-VNNI") else 1.8
    timing = ("quiet" if quiet.quiet else f"BUSY ({quiet.reason}): the ratios are not evidence") + (
        f", worst median ratio within +-{quiet.worst_uncertainty or 0:.1%} after {quiet.rounds} rounds, "
        f"{quiet.attempts} attempt(s)")
    text = "\n".join([
        f"## What INT8 can buy on this CPU ({int8_isa()})", "",
        f"`python bench/int8_bound.py` ({machine()}, {args.threads} threads, onnxruntime {ort.__version__}, "
        f"torch {torch.__version__}; MiniLM rows timed in at least {args.rounds} interleaved rounds, ratios the "
        f"median of round-by-round ratios; timing {timing}). Explains the SAMP ratios above: the INT8 gain is "
        "set by the CPU's INT8 dot-product instructions.", "",
        "| measurement | value |", "|---|---|",
        f"| MatMul 4096x384x1536, FP32 | {rates['fp32']:.1f} GMAC/s |",
        f"| same, dynamic INT8 (u8 x s8, as SAMP emits) | {rates['int8']:.1f} GMAC/s "
        f"(**{rates['int8'] / rates['fp32']:.2f}x** FP32) |",
        f"| all-MiniLM-L6-v2, batch 32 x 128, PyTorch eager FP32 | {ms['eager']:.0f} ms |",
        f"| same, onnxruntime FP32 | {ms['fp32']:.0f} ms ({vs['fp32']:.2f}x eager) |",
        f"| same, every weight MatMul INT8, dynamic | {ms['dynamic']:.0f} ms (**{vs['dynamic']:.2f}x** eager) |",
        f"| same, static folded (batch-invariant; SAMP's default form) | {ms['static']:.0f} ms "
        f"(**{vs['static']:.2f}x** eager) |",
        f"| its profile: INT8 weight GEMMs / everything else | {gemm_ms:.0f} ms / {rest_ms:.0f} ms ({top}) |",
        f"| {macs / 1e9:.1f} GMAC of linear layers at the INT8 rate, nothing else | {gemm_only_ms:.0f} ms "
        f"(bound: {bound:.2f}x eager) |",
        f"| {bar}x eager (the bar for {int8_isa()}): time allowed / left for everything but the INT8 GEMMs | "
        f"{ms['eager'] / bar:.0f} ms / {ms['eager'] / bar - gemm_only_ms:.0f} ms (now {rest_ms:.0f} ms) |",
        "", "Reading: INT8 cannot beat PyTorch eager by more than the GEMM-only bound, and only approaches it "
        "if attention, softmax, normalization and GELU cost nothing; the all-INT8 rows are what the "
        "mixed plans of bench/quantize.py can at most reach (they keep some units FP32). The profile is "
        "onnxruntime's default fusions (SAMP may run without one it measured slower on the machine).",
    ])
    marks = (f"<!-- bench/int8_bound.py {int8_isa()} begin -->", f"<!-- bench/int8_bound.py {int8_isa()} end -->")
    write_section(text + "\n", args.out, marks)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
