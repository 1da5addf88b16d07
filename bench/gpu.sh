#!/usr/bin/env bash
# The GPU path's one prepared device run (bench/gpu.py). Here, once per session that has a GPU:
#
#   bash bench/gpu.sh prepare     # wheels the device image lacks -> .whl/, MiniLM + records -> runs/gpu-bench/
#
# then through the device tool, from the repository root (8 minutes at most on one H200):
#
#   run(command="bash bench/gpu.sh", carry=[".whl", "runs/gpu-bench", "service/api/grpc_gen"], timeout_s=560)
#
# and here: python bench/gpu.py record --results <files_at>. The device image runs Python 3.12 with its own
# torch (2.11, CUDA 13), onnxruntime (CPU), tokenizers, safetensors, aiohttp and grpcio; the server's
# web stack (FastAPI, Starlette, pydantic, uvicorn ...; not uvloop, which the server uses only where it is
# installed: the carry limit is 64 MiB) and our gRPC stubs' protobuf/grpcio versions travel
# as wheels (the device tool's README, "nvidia-h200", says how). Everything is written under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(fastapi starlette uvicorn httptools orjson pydantic pydantic-core pydantic-settings python-dotenv
        annotated-types typing-inspection grpcio grpcio-health-checking grpcio-reflection protobuf)

if [[ "${1:-}" == "prepare" ]]; then
    grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    # the versions this checkout's environment runs (docker/requirements-common.txt pins the server's)
    mapfile -t pinned < <(python -c 'import sys, importlib.metadata as m; [print(f"{n}=={m.version(n)}") for n in sys.argv[1:]]' "${WHEELS[@]}")
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pinned[@]}"
    python bench/gpu.py prepare --out runs/gpu-bench
    du -sh .whl runs/gpu-bench service/api/grpc_gen
    exit 0
fi

OUT=${OUT:-/tmp/gpu-bench-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
set -o pipefail
timeout 500 python3 bench/gpu.py run --input runs/gpu-bench --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
