"""Quantize one FP32 ONNX export with the peers' own tools (runs in the peers' environment).

    .peers/bin/python bench/peers/quantize.py --fp32 fp32.onnx --out DIR --calibration calib.npz \
        --score-cmd "python bench/peer_score.py {model} eval.npz" --max-drop 0.01

Writes DIR/optimum.onnx (Optimum's preset for this CPU, as `optimum-cli onnxruntime quantize` applies
it: dynamic), DIR/neural-compressor.onnx (Neural Compressor's accuracy-aware tuning of static INT8,
its default tuning space, scored by SAMP's own dev metric through --score-cmd) and DIR/peers.json
(versions, the preset, the tuning trials). A peer that fails is recorded with its error, not skipped
silently.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import time
import traceback
from importlib.metadata import version
from pathlib import Path

import numpy as np


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def optimum_preset(flags: set[str]) -> str:
    """The AutoQuantizationConfig preset for the instruction set at hand."""
    if "avx512_vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def run_optimum(fp32: Path, out: Path, preset: str) -> dict:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    config = getattr(AutoQuantizationConfig, preset)(is_static=False)
    quantizer = ORTQuantizer.from_pretrained(fp32.parent, file_name=fp32.name)
    written = quantizer.quantize(save_dir=out / "optimum", quantization_config=config)
    produced = next(Path(written).glob("*.onnx"))
    produced.replace(out / "optimum.onnx")
    return {"preset": f"AutoQuantizationConfig.{preset}(is_static=False)", "per_channel": config.per_channel,
            "operators": list(config.operators_to_quantize)}


class NpzReader:
    """Calibration feeds saved by the bench: keys 'i/input_name'."""

    def __init__(self, path: Path) -> None:
        data = np.load(path)
        batches: dict[int, dict[str, np.ndarray]] = {}
        for key in data.files:
            index, name = key.split("/", 1)
            batches.setdefault(int(index), {})[name] = data[key]
        self.batches = [batches[i] for i in sorted(batches)]
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self) -> None:
        self.position = 0

    def __len__(self) -> int:
        return len(self.batches)


def run_neural_compressor(fp32: Path, out: Path, calibration: Path, score_cmd: str, max_drop: float,
                          max_trials: int) -> dict:
    import onnx
    from onnx_neural_compressor import data_reader
    from onnx_neural_compressor.quantization import config, tuning

    class Reader(NpzReader, data_reader.CalibrationDataReader):
        pass

    trials: list[dict] = []

    def score(model_path: str) -> float:
        command = shlex.split(score_cmd.format(model=shlex.quote(model_path)))
        value = float(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().split()[-1])
        trials.append({"score": value})
        return value

    baseline = score(str(fp32))
    tune = tuning.TuningConfig(config_set=config.StaticQuantConfig.get_config_set_for_tuning(),
                               tolerable_loss=max_drop / baseline, max_trials=max_trials)
    try:
        model = tuning.autotune(str(fp32), tune, eval_fn=score, calibration_data_reader=Reader(calibration))
    except SystemExit:  # what the tuner does when its space runs out before a trial meets the goal
        scores = ", ".join(f"{t['score']:.4f}" for t in trials[2:])
        raise RuntimeError(f"no trial met the tolerance; the tuner exited without a model (dev scores {scores})"
                           ) from None
    if model is None:  # the tuner exits the process instead when no trial met the goal before max_trials
        raise RuntimeError(f"the tuner returned no model after {max_trials} trials")
    onnx.save(model, str(out / "neural-compressor.onnx"))
    scores = [t["score"] for t in trials[2:]]  # after our baseline and the tuner's own
    return {"tuning": "StaticQuantConfig.get_config_set_for_tuning()", "tolerable_relative_loss": max_drop / baseline,
            "max_trials": max_trials, "fp32_score": baseline, "trial_scores": scores,
            "met_tolerance": scores[-1] >= baseline * (1 - max_drop / baseline) - 1e-12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calibration", type=Path, required=True)
    parser.add_argument("--score-cmd", required=True, help="Prints the dev score of {model}.")
    parser.add_argument("--max-drop", type=float, default=0.01)
    parser.add_argument("--max-trials", type=int, default=16, help="16 is the whole default static tuning space.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"versions": {p: version(p) for p in ("optimum", "optimum-onnx", "onnx-neural-compressor",
                                                         "onnxruntime", "onnx")}}
    peers = {
        "optimum": lambda: run_optimum(args.fp32, args.out, optimum_preset(cpu_flags())),
        "neural-compressor": lambda: run_neural_compressor(args.fp32, args.out, args.calibration, args.score_cmd,
                                                           args.max_drop, args.max_trials),
    }
    for name, run in peers.items():
        start = time.perf_counter()
        try:
            report[name] = {"ok": True, **run()}
        except Exception as error:  # recorded in the benchmark table: which peer failed and why
            report[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                            "trace": traceback.format_exc(limit=3)}
        report[name]["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "peers.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
