#!/usr/bin/env python3
"""Start MLServer 1.7.1 as the serving benchmark's *peer* (not project code).

Writes an MLServer ``settings.json`` and ``minilm/model-settings.json`` into a
config dir, then execs ``mlserver start <dir>`` from the peer venv. It only
writes files and execs, so it runs under any Python 3 (system or peer venv).

    python bench/peers/mlserver_serve.py --model-dir DIR --http-port P --grpc-port G \
        [--max-batch-size N --max-batch-time S] [--threads T] [--parallel-workers W]

DIR holds ``model.onnx`` and ``tokenizer.json``. The runtime is
``mlserver_runtime.OnnxEmbeddingRuntime`` beside this file. Set up the peer venv
with ``python3 -m venv /tmp/mlserver-env && /tmp/mlserver-env/bin/pip install
-r bench/peers/mlserver-requirements.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MLSERVER = "/tmp/mlserver-env/bin/mlserver"
MODEL_NAME = "minilm"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True, type=Path,
                   help="folder with model.onnx and tokenizer.json")
    p.add_argument("--http-port", required=True, type=int)
    p.add_argument("--grpc-port", required=True, type=int)
    p.add_argument("--max-batch-size", type=int, default=0,
                   help="adaptive batching is on when > 1 (default: off)")
    p.add_argument("--max-batch-time", type=float, default=0.005,
                   help="seconds to wait to fill a batch (with --max-batch-size > 1)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra_op_num_threads")
    p.add_argument("--parallel-workers", type=int, default=0,
                   help="MLServer 1.7.1 server-level `parallel_workers`; 0 = infer in the main process")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="metrics server port (default: a free one)")
    p.add_argument("--no-metrics", action="store_true", help="disable the metrics server")
    p.add_argument("--debug", action="store_true",
                   help="MLServer `debug` (debug logs + per-request access logs); off by default")
    p.add_argument("--config-dir", type=Path, default=None,
                   help="where to write the settings (default: a new temp dir)")
    p.add_argument("--mlserver", default=DEFAULT_MLSERVER, help="mlserver executable")
    return p.parse_args(argv)


def write_config(args: argparse.Namespace) -> Path:
    model_dir = args.model_dir.resolve()
    for name in ("model.onnx", "tokenizer.json"):
        if not (model_dir / name).is_file():
            sys.exit(f"mlserver_serve: {model_dir / name} not found")

    cfg = (args.config_dir or Path(tempfile.mkdtemp(prefix="mlserver-peer-"))).resolve()
    (cfg / MODEL_NAME).mkdir(parents=True, exist_ok=True)

    settings: dict = {
        "debug": args.debug,
        "host": "127.0.0.1",
        "http_port": args.http_port,
        "grpc_port": args.grpc_port,
        "parallel_workers": args.parallel_workers,
        "metrics_endpoint": None if args.no_metrics else "/metrics",
        "metrics_port": args.metrics_port or free_port(),
        # keep MLServer's scratch dirs out of the caller's cwd
        "metrics_dir": str(cfg / ".metrics"),
        "environments_dir": str(cfg / ".envs"),
    }
    model_settings: dict = {
        "name": MODEL_NAME,
        "implementation": "mlserver_runtime.OnnxEmbeddingRuntime",
        "parameters": {
            "uri": str(model_dir),
            "extra": {"intra_op_num_threads": args.threads},
        },
    }
    if args.max_batch_size > 1:
        model_settings["max_batch_size"] = args.max_batch_size
        model_settings["max_batch_time"] = args.max_batch_time

    (cfg / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    (cfg / MODEL_NAME / "model-settings.json").write_text(json.dumps(model_settings, indent=2) + "\n")
    return cfg


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = write_config(args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    print(f"mlserver_serve: config in {cfg}; exec {args.mlserver} start {cfg}", file=sys.stderr, flush=True)
    os.chdir(cfg)
    os.execve(args.mlserver, [args.mlserver, "start", str(cfg)], env)


if __name__ == "__main__":
    main()
