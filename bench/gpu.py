"""The GPU path's one prepared device run: parity, SAMP's PyTorch plan, batch invariance, the server on the
GPU, and the device's facts, written as one section of docs/benchmarks.md.

Three steps (bench/gpu.sh runs the middle one on the lent machine):

    python bench/gpu.py prepare --out runs/gpu-bench     # here: all-MiniLM-L6-v2 in our format (FP16 weights,
                                                         # 45 MB, so a call's 64 MiB carries it) + records
    python3 bench/gpu.py run --input runs/gpu-bench --out "$OUT"          # there, under the image's torch
    python bench/gpu.py record --results <folder with gpu.json>           # here: the docs section

``run --device cpu --quick`` runs every step on this machine's CPU (the tests do): the script is checked
before GPU time is spent on it, and its CPU figures are never recorded as a GPU's.

In ``run``: (1) each GPU form (FP32 with TF32 off, FP16, BF16, all-INT8 W8A8 in an FP16 body) against CPU
FP32 eager on the same inputs; (2) SAMP's PyTorch plan (quantizer.samp_torch) with its timings against
PyTorch eager FP32 and FP16 interleaved in the same run, at batch 1, 8 and 32 x 128 tokens; (3) the plan's
batch invariance (in SAMP's report); (4) the plan published and served by ``python -m service`` with
runtime pytorch on the GPU, under 1, 16 and 64 closed-loop clients (bench/loadgen.py, REST v2 infer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MARKS = ("<!-- bench/gpu.py begin -->", "<!-- bench/gpu.py end -->")
CLIENTS = (1, 16, 64)


# -- prepare (here) ------------------------------------------------------------------------------


def prepare(out: Path, records: int) -> None:
    """The bundled all-MiniLM-L6-v2 imported into our format, its weights stored in FP16 (loaded back
    into FP32 there: parity compares against CPU FP32 of those same weights), and real sentences."""
    import torch
    from safetensors.torch import load_file, save_file

    from training.checkpoint import WEIGHTS_FILE
    from training.data.gettext_topics import load_gettext_topics
    from training.jobs import bundled_minilm_dir, import_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "minilm-l6"
    if not checkpoint.exists():
        import_checkpoint(bundled_minilm_dir(), checkpoint)
    weights = checkpoint / WEIGHTS_FILE
    tensors = load_file(str(weights))
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}, str(weights))
    texts = [r["text"] for r in load_gettext_topics(max_per_topic=None, seed=0) if 6 <= len(r["text"].split()) <= 60]
    random.Random(0).shuffle(texts)
    with open(out / "records.jsonl", "w") as f:
        for text in texts[:records]:
            f.write(json.dumps({"text": text}) + "\n")
    (out / "sentences.json").write_text(json.dumps(texts[records:records + 512]))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"prepared {out} ({size / 2**20:.1f} MiB)")


# -- run (there) ---------------------------------------------------------------------------------


def facts(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine()}
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        info.update({"gpu": torch.cuda.get_device_name(), "capability": f"{major}.{minor}",
                     "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)})
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            info["nvidia_smi"] = f"not run: {exc}"
    return info


def parity(checkpoint, records: list[dict], device: str) -> dict:
    """Each form on ``device`` against CPU FP32 eager, on 64 real sentences padded to one batch."""
    import copy

    import numpy as np
    import torch

    from quantizer.export import input_names_for
    from quantizer.measure import cosine_rows, tokenize
    from service.runtimes.pytorch import PlannedRunner
    from service.runtimes.torch_plan import DTYPES, apply_plan, int8_units

    names = input_names_for(checkpoint)
    feed = tokenize(checkpoint.tokenizer, [r["text"] for r in records[:64]], 128, checkpoint.config.pad_token_id,
                    names)
    reference = PlannedRunner(copy.deepcopy(checkpoint.model).float().eval(), list(names), 0, torch.float32, [1],
                              [1], graphs=False).run(feed)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    units = int8_units(checkpoint.model)
    forms = {"float32": ("float32", {}), "float16": ("float16", {}), "bfloat16": ("bfloat16", {}),
             "int8 in float16": ("float16", {u: "int8" for u in units})}
    out = {}
    for label, (dtype, plan) in forms.items():
        model = apply_plan(copy.deepcopy(checkpoint.model).float().to(device), dtype, plan)  # type: ignore[arg-type]
        got = PlannedRunner(model, list(names), 0, DTYPES[dtype], [1], [1], graphs=False).run(feed)
        cosine = cosine_rows(got, reference)
        out[label] = {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()),
                      "max_abs_diff": float(np.abs(got - reference).max())}
        print(f"parity {label}: {out[label]}", flush=True)
    return out


def serve(repo: Path, model: str, device: str, sentences: Path, seconds: float) -> dict:
    """``python -m service`` on the published plan with runtime pytorch, loaded at 1, 16 and 64 clients."""
    from bench.serve import free_port

    config = repo / model / "config.json"
    data = json.loads(config.read_text())
    data.update({"runtime": "pytorch", "pytorch": {"device": device}, "version_policy": {"latest": 1},
                 "batching": {**data.get("batching", {}), "max_batch_size": 64, "max_batch_tokens": 16384}})
    config.write_text(json.dumps(data, indent=2))
    port, grpc_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    with open(repo / "server.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--repo", str(repo), "--http-port", str(port), "--grpc-port",
             str(grpc_port), "--instances", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        return _load_points(process, url, model, sentences, seconds)


def _load_points(process: subprocess.Popen, url: str, model: str, sentences: Path, seconds: float) -> dict:
    from bench.serve import load, wait_ready

    try:
        started = time.perf_counter()
        wait_ready(url, timeout=300)
        ready_s = time.perf_counter() - started
        with urllib_open(f"{url}/v2/models/{model}") as response:
            metadata = json.loads(response.read())
        points = {}
        for clients in CLIENTS:
            points[clients] = load(url, model, clients, seconds, sentences, client="aiohttp")
            print(f"server, {clients} clients: {points[clients]}", flush=True)
        return {"ready_s": round(ready_s, 1), "platform": metadata["platform"],
                "parameters": {k: metadata["parameters"].get(k) for k in ("runtime", "device", "dtype", "int8_units",
                                                                           "cuda_graphs")},
                "points": points}
    finally:
        process.terminate()
        process.wait(timeout=60)


def urllib_open(url: str):
    import urllib.request

    return urllib.request.urlopen(url, timeout=10)


def run(input_dir: Path, out: Path, device: str, quick: bool) -> dict:
    import torch

    from quantizer.publish_torch import publish_torch_result
    from quantizer.samp_torch import TorchSamp, TorchSampSettings
    from quantizer.timing import TimingPolicy
    from training.checkpoint import load_checkpoint
    from training.data.tasks import read_records

    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"facts": facts(device), "device": device, "quick": quick}
    print(json.dumps(results["facts"]), flush=True)
    checkpoint = load_checkpoint(input_dir / "minilm-l6")
    checkpoint.model.float()
    records = read_records(input_dir / "records.jsonl")
    if quick:
        records = records[:96]
    def save() -> None:  # after every stage: a run stopped at its time limit still returns what it measured
        (out / "gpu.json").write_text(json.dumps(results, indent=2))

    started = time.perf_counter()
    results["parity"] = parity(checkpoint, records, device)
    save()
    settings = TorchSampSettings(
        device=device, max_drop=0.01, sequence_length=32 if quick else 128,
        latency_batches=(1, 8) if quick else (1, 8, 32), max_examples=32 if quick else 256,
        timing=TimingPolicy(rounds=2, max_rounds=2, per_round=1, retries=0, warmup_ms=20, min_sample_ms=10) if quick
        else TimingPolicy(rounds=5, max_rounds=12, min_sample_ms=50))  # sized to the device call's 8 minutes
    samp = TorchSamp(checkpoint, records, settings, workdir=Path(tempfile.mkdtemp(prefix="gpu-samp-")))
    result = samp.run()
    (out / "torch_samp_report.json").write_text(result.report.model_dump_json(indent=2))
    results["samp_s"] = round(time.perf_counter() - started, 1)
    save()
    print(result.report.verdict, flush=True)
    repo = Path(tempfile.mkdtemp(prefix="gpu-repo-"))
    publish_torch_result(samp, result, repo, "minilm-l6")
    del samp
    if device == "cuda":
        torch.cuda.empty_cache()
    results["server"] = serve(repo, "minilm-l6", device, input_dir / "sentences.json", 3 if quick else 10)
    save()
    print(f"wrote {out / 'gpu.json'}", flush=True)
    return results


# -- record (here) -------------------------------------------------------------------------------


def section(results: dict, report: dict) -> str:
    f = results["facts"]
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"])
    big = max(int(b) for b in chosen["latency_ms"])
    lines = [
        "## GPU: the PyTorch plan on one GPU (bench/gpu.py)",
        "",
        f"Device: {f.get('gpu', 'CPU')} (compute capability {f.get('capability')}, {f.get('gpu_memory_gib')} GiB; "
        f"nvidia-smi: {f.get('nvidia_smi')}); torch {f['torch']} (CUDA {f['cuda']}), Python {f['python']}. "
        "Reproduce: `bash bench/gpu.sh` through the device tool (it prepares with `python bench/gpu.py prepare`), "
        "then `python bench/gpu.py record --results <returned folder>`.",
        "",
        "**Parity** of each form against CPU FP32 eager (64 real sentences, one padded batch of 128 tokens):",
        "",
        "| form | lowest cosine | mean cosine | max abs diff |",
        "|---|---|---|---|",
        *(f"| {k} | {v['min_cosine']:.6f} | {v['mean_cosine']:.6f} | {v['max_abs_diff']:.2e} |"
          for k, v in results["parity"].items()),
        "",
        f"**SAMP's PyTorch plan** (all-MiniLM-L6-v2, budget {report['budget']['max_drop']}; timed interleaved with "
        f"PyTorch eager FP32 and FP16, x {report['sequence_length']} tokens; {report['timing']['rounds']} rounds, "
        f"{'quiet' if report['timing']['quiet'] else 'NOT quiet: ' + report['timing']['reason']}):",
        "",
        f"| candidate | body | INT8 units | dev {report['metric']} | batch cosine | "
        + " | ".join(f"batch {b} ms" for b in chosen["latency_ms"]) + " | x eager FP16 | x eager FP32 |",
        "|---|---|---|---|---|" + "---|" * len(chosen["latency_ms"]) + "---|---|",
    ]
    for c in report["candidates"]:
        ratio16 = f"{c['speedup_vs_eager_fp16']:.2f}" if c["speedup_vs_eager_fp16"] else "n/a"
        ratio32 = f"{c['speedup_vs_eager_fp32']:.2f}" if c["speedup_vs_eager_fp32"] else "n/a"
        lines.append(f"| {c['name']}{' (chosen)' if c['name'] == report['chosen'] else ''} | {c['dtype']} | "
                     f"{len(c['int8'])} | {c['dev_metric']:.4f} | {c['batch_cosine']:.6f} | "
                     + " | ".join(f"{v:.2f}" for v in c["latency_ms"].values()) + f" | {ratio16} | {ratio32} |")
    for label, medians in report["eager_ms"].items():
        lines.append(f"| {label} | | | | | " + " | ".join(f"{v:.2f}" for v in medians.values()) + " | | |")
    goal = chosen["speedup_vs_eager_fp16"]
    lines += ["", f"Verdict: {report['verdict']}",
              "Goal (>= 1.5x eager FP16 at batch 32 x 128, within the budget, batch-invariant): "
              + ("met" if goal and goal >= 1.5 and big == 32 and chosen["batch_invariant"] else "NOT met") + ".",
              "", "**The server on the GPU** (`python -m service`, runtime pytorch, one instance, REST v2 infer, one "
              f"sentence per request; ready {results['server']['ready_s']} s after start, CUDA graphs captured):", "",
              "| clients | req/s | p50 ms | p99 ms | answers |", "|---|---|---|---|---|"]
    for clients, point in results["server"]["points"].items():
        lines.append(f"| {clients} | {point['rps']:.0f} | {point['p50_ms']:.1f} | {point['p99_ms']:.1f} | "
                     f"{point['codes']} |")
    return "\n".join(lines)


def record(folder: Path) -> None:
    from bench.docs import write_section

    results = json.loads((folder / "gpu.json").read_text())
    if results["device"] != "cuda" or results["quick"]:
        raise SystemExit("not a GPU run (device cpu or --quick): nothing recorded")
    if "server" not in results:
        raise SystemExit("the run stopped before its last stage (see log.txt): nothing recorded")
    report = json.loads((folder / "torch_samp_report.json").read_text())
    write_section(section(results, report), ROOT / "docs" / "benchmarks.md", MARKS)
    print("wrote the GPU section of docs/benchmarks.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-bench")
    p.add_argument("--records", type=int, default=900)
    r = sub.add_parser("run")
    r.add_argument("--input", type=Path, default=ROOT / "runs" / "gpu-bench")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    r.add_argument("--quick", action="store_true", help="small settings: a check of the script, not a measurement")
    c = sub.add_parser("record")
    c.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.out, args.records)
    elif args.command == "run":
        run(args.input, args.out, args.device, args.quick)
    else:
        record(args.results)


if __name__ == "__main__":
    main()
