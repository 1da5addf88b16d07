"""The SAMP report: JSON for machines, a PNG plot of metric against latency, a terminal table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantizer.schemas import SampReport

REPORT_JSON = "samp_report.json"
REPORT_PNG = "samp_report.png"


def write_json(report: SampReport, path: Path) -> Path:
    path.write_text(report.model_dump_json(indent=2))
    return path


def write_plot(report: SampReport, path: Path) -> Path:
    """Dev metric against batch-32 latency for every candidate; the chosen plan is marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = max(int(b) for b in report.torch_eager_ms)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for c in sorted(report.candidates, key=lambda c: c.latency_ms[batch]):
        chosen = c.name == report.chosen
        ax.scatter(c.latency_ms[batch], c.dev_metric, s=90 if chosen else 40, marker="*" if chosen else "o",
                   color="tab:red" if chosen else "tab:blue", zorder=3)
        ax.annotate(c.name, (c.latency_ms[batch], c.dev_metric), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    torch_ms = report.torch_eager_ms[batch]
    ax.axvline(torch_ms, color="gray", linestyle=":", label=f"PyTorch eager FP32 ({torch_ms:.0f} ms)")
    fp32 = next(c for c in report.candidates if c.name == "fp32").dev_metric
    budget = report.budget.get("max_drop")
    if budget is None:  # generators: a floor on next-token agreement
        budget = round(1.0 - (report.budget.get("min_agreement") or 1.0), 6)
    ax.axhline(fp32 - budget, color="tab:orange", linestyle="--", label=f"budget (drop {budget})")
    ax.set_xlabel(f"latency, batch {batch} (ms)")
    ax.set_ylabel(f"dev {report.metric}")
    ax.set_title("SAMP candidate plans")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def print_table(report: SampReport, console: Console) -> None:
    """Print the table at least 120 columns wide (rich would squeeze it into 80 when piped)."""
    wide = Console(file=console.file, width=max(console.width, 120), force_terminal=console.is_terminal)
    wide.print(table(report))


def table(report: SampReport) -> Table:
    batches = sorted(int(b) for b in report.torch_eager_ms)
    out = Table(title=f"SAMP plans ({report.metric}, {report.mode} INT8)")
    for column in ("plan", "INT8 units", "rate", "dev", "test", *[f"b{b} ms" for b in batches], "vs torch", "MB"):
        out.add_column(column, justify="left" if column == "plan" else "right")
    out.add_row("torch eager", "-", "-", "-", "-", *[f"{report.torch_eager_ms[b]:.1f}" for b in batches],
                "1.00x", "-")
    for c in report.candidates:
        out.add_row(
            f"[bold red]{c.name}[/]" if c.name == report.chosen else c.name,
            str(len(c.int8)), f"{c.quantization_rate:.0%}", f"{c.dev_metric:.4f}",
            "-" if c.test_metric is None else f"{c.test_metric:.4f}",
            *[f"{c.latency_ms[b]:.1f}" for b in batches],
            "busy" if c.speedup_vs_torch is None else f"{c.speedup_vs_torch:.2f}x", f"{c.size_bytes / 1e6:.1f}",
        )
    return out
