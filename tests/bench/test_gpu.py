"""bench/gpu.py checked on this machine's CPU before any GPU time is spent on it: prepare, then the whole
device run in its quick CPU form (parity, SAMP's PyTorch plan, publish, the server under load), and the
guard that keeps CPU figures out of docs/benchmarks.md's GPU section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_device_run_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    script = ROOT / "bench" / "gpu.py"
    subprocess.run([sys.executable, str(script), "prepare", "--out", str(tmp_path / "in"), "--records", "120"],
                   check=True, cwd=ROOT)
    weights = tmp_path / "in" / "minilm-l6" / "model.safetensors"
    assert weights.stat().st_size < 48 * 2**20  # FP16: fits a device call's 64 MiB with the wheels
    done = subprocess.run([sys.executable, str(script), "run", "--input", str(tmp_path / "in"), "--out",
                           str(tmp_path / "out"), "--device", "cpu", "--quick"], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert results["parity"]["float32"]["max_abs_diff"] < 1e-4
    assert results["parity"]["int8 in float16"]["min_cosine"] > 0.98
    server = results["server"]
    assert server["platform"] == "pytorch_libtorch" and server["parameters"]["runtime"] == "pytorch"
    for point in server["points"].values():
        assert set(point["codes"]) == {"200"} and point["rps"] > 0
    sys.path.insert(0, str(ROOT))
    from bench.gpu import section

    report = json.loads((tmp_path / "out" / "torch_samp_report.json").read_text())
    text = section(results, report)
    assert "| samp (chosen) |" in text and "PyTorch eager FP16" in text
    refused = subprocess.run([sys.executable, str(script), "record", "--results", str(tmp_path / "out")],
                             capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode != 0 and "not a GPU run" in refused.stderr
