"""EAR zero-shot transfer: baseline against Embedding-Push + Attention-Pull + Robust targets, seeds, ablations.

    python bench/crosslingual.py ear                     # the default plan below; writes docs/benchmarks.md
    python bench/crosslingual.py ear --report-only       # the tables from the runs already finished

Every run is one `train_ear` in OUT/<start>/<variant>-s<seed> (skipped when its metrics.json exists), so a
stopped bench resumes. Starts: multilingual-e5-small as it is ("e5") and with encoder layers 6-11 drawn
fresh ("e5-reinit6", a less aligned start). Per start: the baseline (English fine-tuning, CE(x) only) and
EAR with the released settings (alpha 0.1, beta 1, layer 5) for each seed; then, on the first start,
ablations (each part alone, EAR without robust targets) and a sweep of alpha and the pulled layer, one
seed each. Prints and writes: English and zero-shot accuracy per language (mean +- sd over seeds), the
paired bootstrap of EAR minus baseline, the alignment measure before and after, the ablation/sweep table,
and a per-language plot (docs/crosslingual-ear.png).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.docs import machine, write_section  # noqa: E402
from training.crosslingual.distill import ensure_checkpoint  # noqa: E402
from training.crosslingual.ear import EarSettings, start_alignment, test_languages, train_ear  # noqa: E402
from training.crosslingual.metrics import paired_bootstrap  # noqa: E402
from training.crosslingual.transfer_data import ensure_transfer_data, load_manifest  # noqa: E402

MARKS = ("<!-- bench/crosslingual.py ear begin -->", "<!-- bench/crosslingual.py ear end -->")
STARTS: dict[str, dict[str, Any]] = {"e5": {}, "e5-reinit6": {"reinit_from": 6}}
OFF = {"robust_targets": False, "embedding_push": False, "attention_pull": False}
MAIN: dict[str, dict[str, Any]] = {"baseline": OFF, "EAR": {}}
ABLATIONS: dict[str, dict[str, Any]] = {
    "RT": {"embedding_push": False, "attention_pull": False},
    "RT+EP": {"attention_pull": False},
    "RT+AP": {"embedding_push": False},
    "EP+AP": {"robust_targets": False},
    "alpha0.01": {"alpha": 0.01},
    "alpha1": {"alpha": 1.0},
    "beta0.1": {"beta": 0.1},
    "beta10": {"beta": 10.0},
    "layer2": {"layer": 2},
    "layer11": {"layer": 11},
}


def run_dir(out: Path, start: str, variant: str, seed: int) -> Path:
    return out / start / f"{variant}-s{seed}"


def settings_for(args: argparse.Namespace, start_dir: Path, start: str, variant: str, seed: int) -> EarSettings:
    changes = {**STARTS[start], **(MAIN.get(variant, ABLATIONS.get(variant)) or {})}
    kept = (start, variant, seed) == (args.starts[0], "EAR", args.seeds[0])  # the one quantized and served
    return EarSettings(start=start_dir, data=args.data, steps=args.steps, lr=args.lr, seed=seed,
                       languages=args.languages, keep_checkpoint=kept, **changes)


def plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(start, variant, seed) in the order they run: the main comparison first, most informative first."""
    runs = []
    for seed in args.seeds:
        for start in args.starts:
            runs += [(start, variant, seed) for variant in MAIN]
    runs += [(args.starts[0], variant, args.seeds[0]) for variant in args.ablations]
    return runs


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return f"{np.mean(values):.3f} ± {sd:.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def hits(metrics: list[dict], lang: str) -> np.ndarray:
    return np.array([[int(c) for c in m["hits"][lang]] for m in metrics])


def report(args: argparse.Namespace, finished: dict[tuple[str, str, int], dict], before: dict[str, dict]) -> str:
    langs = args.languages
    shown = " ".join(a for a in args.argv if a != "--report-only")  # the command that trains what is shown
    lines = [f"Command: `python bench/crosslingual.py ear {shown}`".rstrip() + "  ",
             f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}. Training under bf16 autocast; "
             f"{args.steps} steps of batch 32 (x and its perturbed copy), lr {args.lr}, max length 64.", ""]
    manifest = load_manifest(args.data)
    if manifest:
        counts = manifest.counts
        lines += [f"Data: {counts['train']} English training messages x {manifest.copies} WordNet-perturbed copies, "
                  f"{counts['dev']} English dev, {counts['en']} English test; target test sets (human translations of "
                  "the English test messages): " + ", ".join(f"{lang} {counts[lang]}" for lang in langs) + ".", ""]
    for start in args.starts:
        runs = {v: [finished[(start, v, s)] for s in args.seeds if (start, v, s) in finished] for v in MAIN}
        if not runs["baseline"]:
            continue
        lines += [f"### Start: {start} ({len(runs['baseline'])} / {len(runs['EAR'])} seeds)", "",
                  "| | English | " + " | ".join(langs) + " | zero-shot mean |",
                  "|---|---|" + "---|" * len(langs) + "---|"]
        for variant, rows in runs.items():
            if rows:
                cells = [mean_sd([r["accuracy"][k] for r in rows]) for k in ("en", *langs, "zero_shot_mean")]
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        paired_seeds = [s for s in args.seeds
                        if (start, "baseline", s) in finished and (start, "EAR", s) in finished]
        if paired_seeds:
            ear = [finished[(start, "EAR", s)] for s in paired_seeds]
            base = [finished[(start, "baseline", s)] for s in paired_seeds]
            a, b = ({lang: hits(rows, lang) for lang in langs} for rows in (ear, base))
            diff, low, high = paired_bootstrap(a, b)
            _, seeds_low, seeds_high = paired_bootstrap(a, b, resample_runs=True)
            per_seed = [e["accuracy"]["zero_shot_mean"] - r["accuracy"]["zero_shot_mean"] for e, r in zip(ear, base)]
            english = np.mean([r["accuracy"]["en"] for r in ear]) - np.mean([r["accuracy"]["en"] for r in base])
            verdict = "excludes" if seeds_low > 0 or seeds_high < 0 else "includes"
            lines += ["", f"EAR minus baseline, mean zero-shot accuracy over {len(langs)} languages and "
                          f"{len(paired_seeds)} paired seeds: **{diff:+.4f}**; per seed "
                          + ", ".join(f"{d:+.4f}" for d in per_seed)
                          + (f" (sd {np.std(per_seed, ddof=1):.4f})" if len(per_seed) > 1 else "")
                          + f". 95% paired bootstrap over the test messages with the seeds fixed: {low:+.4f} to "
                          f"{high:+.4f}; over seeds and messages: **{seeds_low:+.4f} to {seeds_high:+.4f}** "
                          f"({verdict} 0). English: {english:+.4f}."]
        lines += ["", "Alignment (first 1,000 test pairs per language, mean over languages): translation retrieval "
                      "acc@1 / mean cosine of mean-pooled final states.", "",
                  "| | retrieval | cosine |", "|---|---|---|"]
        b = before[start]
        lines.append(f"| before training | {np.mean([b[lang]['retrieval'] for lang in langs]):.3f} | "
                     f"{np.mean([b[lang]['cosine'] for lang in langs]):.3f} |")
        for variant, rows in runs.items():
            if rows:
                retrieval = mean_sd([np.mean([r["alignment"][lang]["retrieval"] for lang in langs]) for r in rows])
                cosine = mean_sd([np.mean([r["alignment"][lang]["cosine"] for lang in langs]) for r in rows])
                lines.append(f"| {variant} | {retrieval} | {cosine} |")
        lines.append("")
    first, seed = args.starts[0], args.seeds[0]
    rows = [(v, finished[(first, v, seed)]) for v in (*MAIN, *ABLATIONS) if (first, v, seed) in finished]
    if len(rows) > 2:
        lines += [f"### Ablations and sweep ({first}, seed {seed})", "",
                  "| variant | English | zero-shot mean | lowest language | retrieval | final train loss |",
                  "|---|---|---|---|---|---|"]
        for variant, m in rows:
            low = min(langs, key=lambda lang: m["accuracy"][lang])
            retrieval = np.mean([m["alignment"][lang]["retrieval"] for lang in langs])
            lines.append(f"| {variant} | {m['accuracy']['en']:.3f} | {m['accuracy']['zero_shot_mean']:.3f} | "
                         f"{low} {m['accuracy'][low]:.3f} | {retrieval:.3f} | {m['train_loss']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(args: argparse.Namespace, finished: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = ["en", *args.languages]
    fig, axes = plt.subplots(1, len(args.starts), figsize=(6 * len(args.starts), 4), squeeze=False)
    for ax, start in zip(axes[0], args.starts):
        for k, variant in enumerate(MAIN):
            rows = [finished[(start, variant, s)] for s in args.seeds if (start, variant, s) in finished]
            if not rows:
                continue
            values = np.array([[r["accuracy"][lang] for lang in langs] for r in rows])
            ax.bar(np.arange(len(langs)) + (k - 0.5) * 0.4, values.mean(0), 0.4,
                   yerr=values.std(0, ddof=1) if len(rows) > 1 else None, label=f"{variant} ({len(rows)} seeds)")
        ax.set_xticks(np.arange(len(langs)), langs, rotation=45)
        ax.set_ylim(0, 1)
        ax.set_title(f"start: {start}")
        ax.set_ylabel("accuracy (7 topics)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def smooth(values: list[float], window: int = 15) -> np.ndarray:
    """Trailing moving average: a batch-32 loss is too noisy to read step by step."""
    series = np.asarray(values, dtype=float)
    kernel = np.ones(min(window, len(series))) / min(window, len(series))
    return np.convolve(series, kernel, mode="valid")


def plot_curves(args: argparse.Namespace, finished: dict, path: Path) -> bool:
    """Training curves from the runs that recorded a history: the task loss of baseline and EAR on the
    original and perturbed copies, the Embedding-Push distance and the Attention-Pull distance per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = args.starts[0]
    runs = {(v, s): m for (start, v, s), m in finished.items() if start == first and m.get("history")}
    if not runs:
        return False
    panels = [("ce", "task loss on x (CE)"), ("ce_perturbed", "task loss on x' (CE)"),
              ("push", "Embedding-Push: MSE(E0(x), E0(x'))"), ("pull", "Attention-Pull: MSE(Attn(x'), Attn(x))")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
    for ax, (key, title) in zip(axes, panels):
        for (variant, seed), m in sorted(runs.items()):
            values = [row[key] for row in m["history"] if key in row]
            if values:
                line = smooth(values)
                ax.plot(np.arange(len(line)) + len(values) - len(line) + 1, line, label=f"{variant} s{seed}",
                        linestyle="-" if variant in MAIN else ":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if key == "push":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"start {first}: training curves (moving average of 15 steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench/crosslingual.py ear", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ear-bench")
    parser.add_argument("--data", type=Path, default=ROOT / "runs" / "ear-data")
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=list(ABLATIONS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--languages", nargs="+", default=None)
    parser.add_argument("--report-only", action="store_true", help="Only tabulate the runs already finished.")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    args.argv = argv
    ensure_transfer_data(args.data)
    args.languages = test_languages(args.data, args.languages)
    start_dir = ensure_checkpoint("e5-small", args.out / "models" / "e5-small")
    finished: dict[tuple[str, str, int], dict] = {}
    for start, variant, seed in plan(args):
        folder = run_dir(args.out, start, variant, seed)
        if args.report_only and not (folder / "metrics.json").is_file():
            continue
        print(f"== {start} {variant} seed {seed}", flush=True)
        metrics = train_ear(settings_for(args, start_dir, start, variant, seed), folder, progress=False)
        finished[(start, variant, seed)] = metrics
        print(f"   English {metrics['accuracy']['en']:.3f}  zero-shot {metrics['accuracy']['zero_shot_mean']:.3f}  "
              f"({metrics['seconds']:.0f} s)", flush=True)
    before = {}
    for start in args.starts:
        cache = args.out / start / "alignment-before.json"
        if not cache.is_file():
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(start_alignment(start_dir, args.data, args.languages,
                                                        STARTS[start].get("reinit_from"), bf16=True)))
        before[start] = json.loads(cache.read_text())
    text = report(args, finished, before)
    picture = args.docs.parent / "crosslingual-ear.png"
    plot(args, finished, picture)
    text += f"\n![per-language accuracy, baseline and EAR]({picture.name})\n"
    curves = args.docs.parent / "crosslingual-ear-curves.png"
    if plot_curves(args, finished, curves):
        text += f"\n![training curves of the runs that recorded them]({curves.name})\n"
    print(text)
    write_section("## Zero-shot cross-lingual transfer (EAR)\n\n" + text, args.docs, MARKS)


if __name__ == "__main__":
    main(sys.argv[1:])
