"""Benchmark SAMP plans against PyTorch eager FP32, side by side in one run.

    python bench/quantize.py            # writes its section of docs/benchmarks.md

Two models: all-MiniLM-L6-v2 (matching: Spearman of pair scores against FP32) and a MiniLM
classifier this script fine-tunes on the gettext topic data (accuracy). For each candidate plan:
latency at batch 1, 8, 32 and sequence length 128, its speed ratio to PyTorch eager FP32 measured in
the same run, and the metric change on dev (used by the search) and test (never seen by it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.docs import machine, write_section  # noqa: E402
from bench.peer_score import save_eval, save_feeds  # noqa: E402
from quantizer.report import print_table  # noqa: E402
from quantizer.samp import Samp  # noqa: E402
from quantizer.schemas import SampReport, SampResult, SampSettings  # noqa: E402
from quantizer.timing import TORCH, TimingPolicy  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.data.gettext_topics import load_gettext_topics, split, write_jsonl  # noqa: E402
from training.data.tasks import read_records  # noqa: E402
from training.jobs import TrainJob, bundled_minilm_dir, console, import_checkpoint, run_training  # noqa: E402
from training.trainer import TrainSettings  # noqa: E402

MARKS = ("<!-- bench/quantize.py begin -->", "<!-- bench/quantize.py end -->")


def markdown(title: str, report: SampReport) -> str:
    batches = sorted(int(b) for b in report.torch_eager_ms)
    head = ["plan", "INT8 units", "quant. rate", "dev " + report.metric, "test", *[f"b{b} ms" for b in batches],
            *[f"b{b} vs torch" for b in batches]]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    eager = report.torch_eager_ms
    quiet = report.timing is None or report.timing.quiet  # never print a ratio the timing could not support
    rows.append("| PyTorch eager FP32 | - | - | - | - | " + " | ".join(f"{eager[b]:.1f}" for b in batches)
                + " | " + " | ".join("1.00x" for _ in batches) + " |")
    fp32 = next(c for c in report.candidates if c.name == "fp32")
    for c in report.candidates:
        name = f"**{c.name}**" if c.name == report.chosen else c.name
        test = "-" if c.test_metric is None else f"{c.test_metric:.4f} ({c.test_metric - (fp32.test_metric or 0):+.4f})"
        rows.append(
            f"| {name} | {len(c.int8)} | {c.quantization_rate:.0%} | {c.dev_metric:.4f} "
            f"({c.dev_metric - fp32.dev_metric:+.4f}) | {test} | "
            + " | ".join(f"{c.latency_ms[b]:.1f}" for b in batches) + " | "
            + " | ".join(f"{eager[b] / c.latency_ms[b]:.2f}x" if quiet else "busy" for b in batches) + " |"
        )
    conditions = []
    if report.timing is not None:
        t = report.timing
        load = "" if t.other_cores is None else f", other processes {t.other_cores:.2f} cores"
        interval = "" if t.worst_uncertainty is None else f"worst median ratio within +-{t.worst_uncertainty:.1%}, "
        conditions.append(f"timing: {'quiet' if t.quiet else 'BUSY: ' + t.reason} ({interval}worst round-by-round "
                          f"spread {t.worst_spread:.0%}{load}, {t.attempts} attempts)")
    if report.provenance is not None:
        h = report.provenance
        conditions.append(f"measured on {h.cpu} ({h.int8_class}; flags {' '.join(h.int8_flags)}), onnxruntime "
                          f"{h.onnxruntime}, {h.threads} threads")
    notes = "\n".join(f"- {n}" for n in [report.verdict, *conditions, *report.notes])
    return f"### {title}\n\n" + "\n".join(rows) + "\n\n" + notes + "\n"


def stock_dynamic(samp: Samp, out: Path) -> Path:
    """The peer a user reaches for first: onnxruntime's quantize_dynamic with its defaults on the same export."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(samp.info.path), str(out))
    return out


PEERS_PYTHON = ROOT / ".peers" / "bin" / "python"


def peer_plans(samp: Samp, max_drop: float, python: Path) -> tuple[dict[str, Path], list[str]]:
    """The same export quantized by Optimum's preset and by Neural Compressor's accuracy-aware tuning, run in
    the peers' own environment (bench/peers/requirements.txt); the tuner scores trials with SAMP's dev metric."""
    if not python.exists():
        return {}, [f"Optimum and Neural Compressor not run: no peers environment at {python} "
                    "(`python3 -m venv .peers && .peers/bin/pip install -r bench/peers/requirements.txt`)."]
    out = samp.workdir / "peers"
    out.mkdir(exist_ok=True)
    calibration = save_feeds(samp.data.calibration, out / "calibration.npz")
    evaluation = save_eval(samp.data.dev, samp.reference["dev"], out / "eval.npz")
    score_cmd = f"{sys.executable} {ROOT / 'bench' / 'peer_score.py'} {{model}} {evaluation}"
    subprocess.run([str(python), str(ROOT / "bench" / "peers" / "quantize.py"), "--fp32", str(samp.info.path),
                    "--out", str(out), "--calibration", str(calibration), "--score-cmd", score_cmd,
                    "--max-drop", str(max_drop)], check=True)
    report = json.loads((out / "peers.json").read_text())
    versions = report["versions"]
    labels = {"optimum": (f"Optimum {versions['optimum-onnx']} (optimum-onnx) preset", "optimum.onnx"),
              "neural-compressor": (f"Neural Compressor (onnx-neural-compressor {versions['onnx-neural-compressor']}) "
                                    "accuracy-aware static", "neural-compressor.onnx")}
    plans, notes = {}, []
    for key, (label, file) in labels.items():
        entry = report[key]
        if not entry["ok"]:
            notes.append(f"{label}: failed after {entry['seconds']} s: {entry['error']}")
            continue
        plans[label] = out / file
        if key == "optimum":
            notes.append(f"{label}: `{entry['preset']}`, per channel {entry['per_channel']}, operators "
                         f"{', '.join(entry['operators'])}.")
        else:
            outcome = ("met the tolerance" if entry["met_tolerance"] else
                       "no trial met the tolerance; the tuner returns its last trial, which the row shows")
            notes.append(f"{label}: `{entry['tuning']}`, tolerable relative loss "
                         f"{entry['tolerable_relative_loss']:.4f}, "
                         f"{len(entry['trial_scores'])} trials (dev scores "
                         f"{', '.join(f'{s:.4f}' for s in entry['trial_scores'])}): {outcome}; {entry['seconds']} s.")
    return plans, notes


def peers(title: str, samp: Samp, result: SampResult, max_drop: float, python: Path) -> str:
    """The chosen SAMP plan beside the peers on the same FP32 export, dev/test data and batch check, all
    timed in one interleaved measurement with PyTorch eager at the largest batch."""
    others, notes = peer_plans(samp, max_drop, python)
    plans = {"SAMP (chosen)": result.model_path, "onnxruntime quantize_dynamic (defaults)":
             stock_dynamic(samp, samp.workdir / "stock-dynamic.onnx"), **others, "FP32 onnxruntime": samp.info.path}
    batch = max(samp.settings.latency_batches)
    timings, quiet = samp.time_plans({TORCH: None, **plans}, batch)
    fp32 = samp.fp32_metric
    rows = [f"#### {title}: SAMP and the peers (batch {batch}, one interleaved measurement)", "",
            f"| plan | dev {result.report.metric} | test | batch cosine (alone vs batched) | b{batch} ms | vs torch |",
            "|---|---|---|---|---|---|"]
    for name, path in plans.items():
        (dev, _), (test, _) = samp.metric(path), samp.metric(path, "test")
        cosine, _ = samp.batch_check(path)
        ratio = f"{timings[TORCH].median_ms / timings[name].median_ms:.2f}x" if quiet.quiet else "busy"
        rows.append(f"| {name} | {dev:.4f} ({dev - fp32['dev']:+.4f}) | {test:.4f} ({test - fp32['test']:+.4f}) | "
                    f"{cosine:.6f} | {timings[name].median_ms:.1f} | {ratio} |")
    rows.append(f"| PyTorch eager FP32 | - | - | - | {timings[TORCH].median_ms:.1f} | 1.00x |")
    if not quiet.quiet:
        notes.append(f"Timing: BUSY ({quiet.reason}); no ratios.")
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved timing rounds per batch size.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--peers-python", type=Path, default=PEERS_PYTHON,
                        help="Python of the peers' environment (Optimum, Neural Compressor).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    settings = SampSettings(max_drop=args.max_drop, threads=args.threads, timing=TimingPolicy(rounds=args.rounds))

    records = load_gettext_topics(max_per_topic=400, seed=0)
    train, dev, test = split(records, seed=0)
    for name, part in (("train", train), ("dev", dev), ("test", test)):
        write_jsonl(part, work / f"{name}.jsonl")
    minilm = import_checkpoint(bundled_minilm_dir(), work / "minilm")

    sections = []
    console.rule("all-MiniLM-L6-v2 (matching)")
    samp = Samp(minilm, train, settings, workdir=work / "samp-minilm")
    result = samp.run()
    print_table(result.report, console)
    sections.append(markdown("all-MiniLM-L6-v2, matching (Spearman of pair cosine scores vs FP32)", result.report))
    sections.append(peers("all-MiniLM-L6-v2", samp, result, args.max_drop, args.peers_python))

    console.rule("MiniLM classifier (gettext topics)")
    run_training(TrainJob(data=work / "train.jsonl", dev=work / "dev.jsonl", out_dir=work / "cls",
                          init_from=work / "minilm", target="cls"),
                 TrainSettings(batch_size=16, max_steps=150, lr=3e-4, max_length=128))
    classifier = load_checkpoint(work / "cls")
    samp = Samp(classifier, read_records(work / "dev.jsonl") + read_records(work / "test.jsonl"), settings,
                 workdir=work / "samp-cls")
    result = samp.run()
    print_table(result.report, console)
    sections.append(markdown("MiniLM fine-tuned on the gettext topics, classification (accuracy, 7 topics)",
                             result.report))
    sections.append(peers("MiniLM classifier", samp, result, args.max_drop, args.peers_python))

    header = (f"## SAMP quantizer vs PyTorch eager FP32\n\n`python bench/quantize.py` "
              f"(max drop {args.max_drop}, {args.threads} threads, sequence length 128, median of "
              f"{args.rounds} interleaved rounds of 2 runs; {machine()}, torch {torch.__version__}, CPU only). "
              "Ratios are measured side by side in one run; absolute times move between runs (by about 10% "
              "on the Intel VNNI machine, up to 30% for single plans on the AMD AVX2 one), so compare within a run.\n")
    write_section(header + "\n" + "\n".join(sections), args.out, MARKS)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
