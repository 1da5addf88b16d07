"""Multi-stage cross-lingual distillation: every stage and every ablation, side by side, and the served speed.

    python bench/crosslingual.py                        # the method at full budget, writes docs/benchmarks.md
    python bench/crosslingual.py --scale 0.34 --variants all --languages de fr es ru zh_CN ja
    python bench/crosslingual.py ear [--help]           # the other method, EAR zero-shot transfer (crosslingual_ear.py)

The data are `sampserve data gettext-parallel`'s splits (built on first use); the assistant is
multilingual-e5-small, the English teacher all-MiniLM-L6-v2 (track "minilm") or the assistant itself
(track "assistant"). Each variant is one `distill` run in OUT/<scale>/<variant> (resumed when stopped, skipped
when finished); all share one vector cache. ``--scale`` multiplies every stage's steps, so one table compares
variants at one budget. Then the full method's final student goes through SAMP (budget: 1 point of
retrieval acc@1 on held-out dev pairs) and its INT8 plan is timed against the FP32 assistant, both as
onnxruntime sessions, interleaved, at batch 1 and 32 on test sentences. Prints and writes: a table per stage
and per variant (parameters, weights file size, retrieval acc@1 per language and mean, STS proxy), a PNG of
mean acc@1 against parameters (docs/crosslingual.png), and its section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.docs import machine, write_section  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.crosslingual.distill import (  # noqa: E402
    STAGES,
    DistillSettings,
    Pairs,
    Vectors,
    ensure_checkpoint,
    evaluate_retrieval,
    distill,
    read_pairs,
)
from training.crosslingual.student import StudentShape  # noqa: E402

MARKS = ("<!-- bench/crosslingual.py begin -->", "<!-- bench/crosslingual.py end -->")
STUDENT_STAGES = ("bottleneck", "recurrence", "contrastive")

RECURRENT = StudentShape(embedding_size=128, unique_layers=3, cycles=4)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("the served recipe: stages 2, 3, 4; E=128, the 12 layers once", {}),
    "recurrent-3x4": ("the method's recurrence: stages 2, 3, 4; E=128, 3 layers x 4", {"shape": RECURRENT}),
    "e256-6x2": ("stages 2, 3, 4; E=256, 6 layers x 2",
                 {"shape": StudentShape(embedding_size=256, unique_layers=6, cycles=2)}),
    "recurrent-no-bottleneck": ("3 layers x 4 without the bottleneck (the full word table); stages 3, 4",
                                {"stages": ("recurrence", "contrastive"),
                                 "shape": StudentShape(embedding_size=None, unique_layers=3, cycles=4)}),
    "recurrent-3x1": ("3 layers once (no recurrence), E=128; stages 2, 3, 4",
                      {"shape": StudentShape(embedding_size=128, unique_layers=3, cycles=1)}),
    "one-shot": ("no stages: stage 4's loss alone from a random bottleneck, for stages 3+4's steps",
                 {"stages": ("contrastive",), "bottleneck_init": "random", "_one_shot": True}),
    "no-stage2": ("without stage 2: a random bottleneck, then stages 3 and 4",
                  {"stages": ("recurrence", "contrastive"), "bottleneck_init": "random"}),
    "random-bottleneck": ("stage 2 from a random table (the paper's start) instead of the SVD",
                          {"bottleneck_init": "random"}),
    "no-relation": ("stage 4 without the similarity-matrix term", {"relation": "none", "_reuse": "full"}),
    "infonce": ("stage 4 with InfoNCE (scale 20) instead of the similarity-matrix MSE",
                {"relation": "infonce", "_reuse": "full"}),
    "assistant-stage4": ("reference: the assistant itself (full table, 12 layers) trained with stage 4 only",
                         {"stages": ("contrastive",), "shape": StudentShape(embedding_size=None)}),
}


def ensure_data(folder: Path, languages: list[str]) -> Path:
    if not (folder / "train.jsonl").is_file():
        from training.data.gettext_parallel import load_pairs, split_by_program, write_splits

        write_splits(split_by_program(load_pairs(languages), seed=0), folder, languages)
    return folder


# Settings that only stage 4 reads: a variant differing from another in these alone shares its earlier stages.
STAGE4_ONLY = {"relation", "contrastive_stage", "progress"}


def share_earlier_stages(source: Path, target: Path, settings: DistillSettings) -> None:
    """Link ``source``'s finished stages before stage 4 into ``target`` (so a stage-4 ablation trains only
    stage 4), after checking that the two runs' settings differ only in what stage 4 reads: the shared
    stages are then exactly what ``target`` would have trained itself."""
    saved = source / "settings.json"
    if not saved.is_file():
        return  # the source has not run: the variant trains every stage itself
    theirs = {k: v for k, v in json.loads(saved.read_text()).items() if k not in STAGE4_ONLY}
    ours = {k: v for k, v in settings.model_dump(mode="json").items() if k not in STAGE4_ONLY}
    if theirs != ours:
        raise ValueError(f"{target.name}: settings differ from {source.name}'s beyond stage 4; cannot share")
    target.mkdir(parents=True, exist_ok=True)
    for stage in ("assistant_original", *STAGES[:STAGES.index("contrastive")]):
        done, link = source / stage, target / stage
        if (done / "metrics.json").is_file() and not link.exists():
            link.symlink_to(done.resolve(), target_is_directory=True)


def variant_settings(base: DistillSettings, overrides: dict[str, Any]) -> DistillSettings:
    overrides = {k: v for k, v in overrides.items() if k != "_reuse"}
    if overrides.pop("_one_shot", False):
        steps = base.recurrence_stage.steps + base.contrastive_stage.steps
        overrides["contrastive_stage"] = base.contrastive_stage.model_copy(update={"steps": steps})
    if "stages" in overrides and "assistant" in base.stages:
        overrides["stages"] = ("assistant", *overrides["stages"])
    return DistillSettings.model_validate({**base.model_dump(), **overrides})


def weights_mb(folder: Path) -> float:
    return (folder / "model.safetensors").stat().st_size / 1e6


def row(name: str, result: dict, languages: list[str], size_mb: float | None) -> list[str]:
    size = "-" if size_mb is None else f"{size_mb:.0f}"
    return [name, f"{result['parameters'] / 1e6:.1f}M", size,
            *(f"{result['languages'][lang]['acc@1']:.3f}" for lang in languages),
            f"**{result['mean']['acc@1']:.4f}**", f"{result['mean'].get('sts_proxy', float('nan')):.3f}"]


def table(rows: list[list[str]], languages: list[str]) -> str:
    head = ["model", "params", "MB", *languages, "mean acc@1", "STS proxy"]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def speed(assistant_dir: Path, student_onnx: Path, test: Pairs, repeats: int, threads: int) -> dict[str, dict]:
    """Median ms per batch of test sentences, FP32 assistant against the SAMP student, interleaved."""
    from quantizer.engines import ort_session
    from quantizer.export import export_onnx
    from quantizer.measure import session_runner, tokenize

    assistant = load_checkpoint(assistant_dir)
    work = student_onnx.parent
    info = export_onnx(assistant, work / "assistant-fp32.onnx")
    runners = {"assistant FP32": session_runner(ort_session(info.path, threads)),
               "student SAMP": session_runner(ort_session(student_onnx, threads))}
    prefix = assistant.head.text_prefix
    out: dict[str, dict] = {name: {} for name in runners}
    for batch in (1, 32):
        texts = [prefix + t for t in test.x[:batch]]
        feed = tokenize(assistant.tokenizer, texts, 64, assistant.config.pad_token_id, info.input_names)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for run in runners.values():
            run(feed)  # warm up
        for _ in range(repeats):
            for name, run in runners.items():
                start = time.perf_counter()
                run(feed)
                times[name].append((time.perf_counter() - start) * 1000)
        for name in runners:
            out[name][batch] = float(np.median(times[name]))
    return out


def plot(points: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, params, acc in points:
        ax.scatter(params, acc)
        ax.annotate(name, (params, acc), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("mean translation retrieval acc@1")
    ax.set_title("cross-lingual students: accuracy against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "xl-bench")
    parser.add_argument("--assistant", default="e5-small", help="Our checkpoint of multilingual-e5-small, or "
                                                                  "e5-small (imported into OUT/models once).")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "xl-data")
    parser.add_argument("--languages", nargs="+", default=["de", "fr", "es", "it", "nl", "tr", "ru", "zh_CN", "ja"])
    parser.add_argument("--teacher", choices=("minilm", "assistant"), default="assistant",
                        help="English teacher: the bundled MiniLM (adds stage 1) or the assistant itself.")
    parser.add_argument("--variants", nargs="+", default=["full"], help=f"Some of {list(VARIANTS)}, or all.")
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply every stage's steps.")
    parser.add_argument("--train-pairs", type=int, default=2000)
    parser.add_argument("--test-pairs", type=int, default=1000)
    parser.add_argument("--no-samp", action="store_true", help="Skip SAMP and the speed comparison (the last "
                        "measurement of the same full student, OUT/<track>/samp.md, is shown instead).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    variants = list(VARIANTS) if args.variants == ["all"] else args.variants
    started = time.perf_counter()

    models = args.out / "models"
    assistant = ensure_checkpoint(args.assistant, models / "e5-small")
    minilm = ensure_checkpoint("minilm", models / "minilm")
    data = ensure_data(args.data, args.languages)
    base = DistillSettings(
        assistant=assistant, teacher=minilm if args.teacher == "minilm" else None, data=data,
        languages=tuple(args.languages), train_pairs=args.train_pairs, test_pairs=args.test_pairs, progress=False,
        stages=STAGES if args.teacher == "minilm" else STUDENT_STAGES)
    base = base.model_copy(update={f"{s}_stage": base.stage(s).model_copy(
        update={"steps": max(1, round(base.stage(s).steps * args.scale))}) for s in STAGES})
    cache = args.out / "cache"
    folder = args.out / f"{args.teacher}-x{args.scale:g}"
    reports = {}
    for name in variants:
        print(f"== {name}: {VARIANTS[name][0]}", flush=True)
        settings = variant_settings(base, VARIANTS[name][1])
        if (source := VARIANTS[name][1].get("_reuse")) is not None:
            share_earlier_stages(folder / source, folder / name, settings)
        reports[name] = distill(settings, folder / name, cache)

    langs = list(args.languages)
    test = read_pairs(data / "test.jsonl", langs, args.test_pairs, sample_seed=None)
    english = load_checkpoint(minilm)
    teacher = Vectors(english if args.teacher == "minilm" else load_checkpoint(assistant), cache, 64, False)
    teacher_test = {lang: teacher(test.of(lang)[0], "served") for lang in langs}  # cached by the runs
    minilm_result = evaluate_retrieval(english, test, langs, 64, teacher_test, cache_dir=cache)
    minilm_result["parameters"] = english.model.num_parameters()
    first = next(iter(reports.values()))["stages"]
    rows = [row("multilingual-e5-small (assistant)", first["assistant_original"], langs, weights_mb(assistant)),
            row("all-MiniLM-L6-v2 (English only)", minilm_result, langs, weights_mb(minilm))]
    if "assistant" in first:
        rows.append(row("assistant after stage 1", first["assistant"], langs,
                        weights_mb(folder / variants[0] / "assistant")))
    original = first["assistant_original"]
    points = [("e5-small", original["parameters"] / 1e6, original["mean"]["acc@1"])]
    stage_rows = []
    if "full" in reports:
        for stage in STUDENT_STAGES:
            result = reports["full"]["stages"][stage]
            only = ", embedding layer only" if stage == "bottleneck" else ""
            label = f"full, after stage {STAGES.index(stage) + 1} ({stage}{only})"
            stage_rows.append(row(label, result, langs, weights_mb(folder / "full" / stage)))
    variant_rows = []
    for name, report in reports.items():
        final = Path(report["final"])
        result = report["stages"][final.name]
        variant_rows.append(row(f"{name}: {VARIANTS[name][0]}", result, langs, weights_mb(final)))
        points.append((name, result["parameters"] / 1e6, result["mean"]["acc@1"]))
    png = ROOT / "docs" / "crosslingual.png"
    plot(points, png)

    speed_text = ""
    saved_samp = folder / "samp.md"  # the last SAMP + speed measurement, kept for --no-samp invocations
    command = "python bench/crosslingual.py " + " ".join(sys.argv[1:])
    if args.no_samp and "full" in reports and saved_samp.is_file():
        final = Path(reports["full"]["final"]) / "model.safetensors"
        if saved_samp.stat().st_mtime > final.stat().st_mtime:  # measured on this very student
            speed_text = saved_samp.read_text()
    if not args.no_samp and "full" in reports:
        from rich.console import Console

        from quantizer.samp import Samp
        from quantizer.schemas import SampSettings

        dev = read_pairs(data / "dev.jsonl", langs, 100, sample_seed=0)
        records = [{"text_a": en, "text_b": x} for en, x in zip(dev.en, dev.x, strict=True)]
        student = load_checkpoint(Path(reports["full"]["final"]))
        samp = Samp(student, records, SampSettings(max_drop=0.01, matching_metric="retrieval",
                                                   max_examples=len(records) // 3, repeats=3, max_candidates=4,
                                                   threads=args.threads))
        result = samp.run()
        Console().print(result.report.verdict)
        chosen = next(c for c in result.report.candidates if c.name == result.report.chosen)
        fp32 = next(c for c in result.report.candidates if c.name == "fp32")
        timing = speed(assistant, result.model_path, test, args.repeats, args.threads)
        shutil.rmtree(result.workdir, ignore_errors=True)  # SAMP's ONNX plans: hundreds of MB each
        speed_text = (
            f"SAMP on the full student (budget: 1 point of retrieval acc@1 over {len(records) // 3} held-out dev pairs "
            f"of all languages): {result.report.verdict} Chosen plan `{chosen.name}`: {len(chosen.int8)} INT8 units, "
            f"dev acc@1 {chosen.dev_metric:.4f} against FP32's {fp32.dev_metric:.4f}"
            + (f", test {chosen.test_metric:.4f} against {fp32.test_metric:.4f}" if chosen.test_metric is not None
               and fp32.test_metric is not None else "")
            + f"; ONNX file {chosen.size_bytes / 1e6:.0f} MB against FP32's {fp32.size_bytes / 1e6:.0f} MB.\n\n"
            "| onnxruntime, " + f"{args.threads} threads | batch 1 ms | batch 32 ms |\n|---|---|---|\n"
            + "\n".join(f"| {name} | {t[1]:.1f} | {t[32]:.1f} |" for name, t in timing.items())
            + f"\n| student / assistant speed | {timing['assistant FP32'][1] / timing['student SAMP'][1]:.2f}x | "
            f"{timing['assistant FP32'][32] / timing['student SAMP'][32]:.2f}x |\n")
        speed_text = (f"Measured by `{command.strip()}` on {machine()}, "
                      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}:\n\n" + speed_text)
        saved_samp.write_text(speed_text)

    minutes = (time.perf_counter() - started) / 60
    text = (
        f"## Cross-lingual distillation\n\n`{command.strip()}` on {machine()}; this invocation took {minutes:.0f} min "
        f"(finished runs are reused). Translation retrieval accuracy@1 (both directions, mean) on the first "
        f"{args.test_pairs} test pairs of each language (held-out programs); STS proxy = Spearman of the model's "
        f"cos(en_a, x_b) with the teacher's cos(en_a, en_b). Teacher track: `{args.teacher}`; step scale "
        f"{args.scale:g}; {args.train_pairs} training pairs per language.\n\n"
        + table(rows, langs) + "\n\n**Stages of the full method**\n\n"
        + (table(stage_rows, langs) if stage_rows else "-")
        + "\n\n**Variants** (same data, same step budget)\n\n" + table(variant_rows, langs)
        + f"\n\n![accuracy against size]({png.relative_to(ROOT / 'docs')})\n\n" + speed_text)
    print(text)
    write_section(text, args.doc, MARKS)
    (folder / "bench.json").write_text(json.dumps({"variants": {k: v["stages"] for k, v in reports.items()},
                                                   "minilm": minilm_result}, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["ear"]:
        from bench.crosslingual_ear import main as ear_main

        ear_main(sys.argv[2:])
    else:
        main()
