"""Serving benchmark: sampserve against the in-process ceiling, MLServer and infinity-emb, side by side, one run.

    python bench/serve.py                    # writes its sections of docs/benchmarks.md and docs/serving.png
    python bench/serve.py --endpoints-only   # only /v1/embeddings against v2 infer on one server

The same FP32 ONNX file of all-MiniLM-L6-v2 is served by: sampserve REST (v2 infer and OpenAI's
/v1/embeddings; batching on and off) and gRPC, MLServer 1.7.1 (minimal onnxruntime runtime, batching
off and adaptive); infinity-emb 0.0.78 serves the same model from its Hugging Face folder on its
torch engine; and, for the gain a user gets, sampserve REST with the SAMP plan. Load comes from
bench/loadgen.py in its own process (Debian's wrk where installed, else aiohttp; grpc.aio), one real
sentence per request, at 1, 16 and 64 closed-loop clients. The ceiling is the same file through
onnxruntime in-process with length-sorted batches. The peers run from their own virtualenvs
(bench/peers/README.md) and are skipped, with a line saying so, where those are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.docs import machine, write_section  # noqa: E402
from quantizer.publish import publish_fp32  # noqa: E402
from service.repository import MODEL_CONFIG_FILE, list_versions  # noqa: E402
from service.settings import Settings  # noqa: E402
from training.data.gettext_topics import load_gettext_topics  # noqa: E402
from training.jobs import bundled_minilm_dir, console, import_checkpoint  # noqa: E402
from training.tokenization import configured  # noqa: E402

MARKS = ("<!-- bench/serve.py begin -->", "<!-- bench/serve.py end -->")
ENDPOINT_MARKS = ("<!-- bench/serve.py endpoints begin -->", "<!-- bench/serve.py endpoints end -->")
PEER_PYTHON = Path("/tmp/mlserver-env/bin/python")
INFINITY = Path("/tmp/infinity-env/bin/infinity_emb")
PLOT = ROOT / "docs" / "serving.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sentences(count: int = 512, seed: int = 0) -> list[str]:
    """Real English sentences of 8-52 words (gettext messages shipped with Debian's packages)."""
    texts = [r["text"] for r in load_gettext_topics(max_per_topic=None, seed=seed)]
    chosen = [t for t in texts if 8 <= len(t.split()) <= 52]
    random.Random(seed).shuffle(chosen)
    return chosen[:count]


def wait_ready(url: str, timeout: float = 120, path: str = "/v2/health/ready") -> None:
    """Poll ``path`` (the server's readiness, or one model's: /v2/models/{m}/ready) until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}{path} never became ready")


def http_client() -> str:
    """wrk (C) when installed: it leaves more of the two shared cores to the server than aiohttp."""
    return "wrk" if shutil.which("wrk") else "aiohttp"


def load(url: str, model: str, clients: int, seconds: float, sentence_file: Path, protocol: str = "http",
         client: str | None = None, path: str = "v2") -> dict:
    """One closed-loop point from bench/loadgen.py: ``path`` v2 (infer) or v1 (OpenAI's embeddings)."""
    command = [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--url", url, "--model", model, "--clients",
               str(clients), "--seconds", str(seconds), "--sentences", str(sentence_file), "--protocol", protocol,
               "--client", client or http_client(), "--path", path]
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _sorted_batches_rate(sessions: list, tokenizer, texts: list[str], batch: int, seconds: float = 8) -> float:
    """Sentences/s with each session in its own thread, tokenizing and running its share of the texts."""
    import threading

    done = [0] * len(sessions)
    stop = time.perf_counter() + seconds

    def work(k: int) -> None:
        while time.perf_counter() < stop:
            encodings = sorted(tokenizer.encode_batch(texts[k :: len(sessions)]), key=lambda e: len(e.ids))
            for i in range(0, len(encodings), batch):
                chunk = encodings[i : i + batch]
                ids = np.zeros((len(chunk), max(len(e.ids) for e in chunk)), dtype=np.int64)
                mask = np.zeros_like(ids)
                for row, e in enumerate(chunk):
                    ids[row, : len(e.ids)] = e.ids
                    mask[row, : len(e.ids)] = 1
                sessions[k].run({"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
                done[k] += len(chunk)

    start = time.perf_counter()
    workers = [threading.Thread(target=work, args=(k,)) for k in range(len(sessions))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / (time.perf_counter() - start)


def ceiling(model_dir: Path, texts: list[str], threads: int, counts: Sequence[int],
            batches: Sequence[int] = (8, 16, 32)) -> tuple[float, int, int]:
    """Sentences/s through onnxruntime in-process, tokenization included, length-sorted batches,
    sessions made as the server makes them: the best over ``batches`` and over ``counts`` sessions
    side by side. Returns (rate, batch, sessions)."""
    from tokenizers import Tokenizer

    from service.repository import load_head
    from service.runtimes.onnxruntime import OnnxRuntime

    disabled = load_head(model_dir).disabled_optimizers or ()
    tokenizer = configured(Tokenizer.from_file(str(model_dir / "tokenizer.json")), 256, 0)
    tokenizer.no_padding()  # each batch is padded to its own longest
    best = (0.0, 0, 0)
    for count in counts:
        sessions = [OnnxRuntime(model_dir / "model.onnx", threads, count == 1, disabled) for _ in range(count)]
        for batch in batches:
            best = max(best, (_sorted_batches_rate(sessions, tokenizer, texts, batch), batch, count))
    return best


class Process:
    def __init__(self, command: list[str], env: dict | None = None) -> None:
        self.process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **(env or {})},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def prepare_repo(work: Path) -> Path:
    """fp32 (batching on), fp32-nobatch (max batch 1) and, when built, the SAMP plan of `sampserve up`."""
    repo = work / "repo"
    checkpoint = import_checkpoint(bundled_minilm_dir(), work / "minilm")
    publish_fp32(checkpoint, repo, "fp32", work)
    shutil.copytree(repo / "fp32", repo / "fp32-nobatch")
    config = json.loads((repo / "fp32-nobatch" / MODEL_CONFIG_FILE).read_text())
    config.update(name="fp32-nobatch")
    config["batching"]["max_batch_size"] = 1
    (repo / "fp32-nobatch" / MODEL_CONFIG_FILE).write_text(json.dumps(config))
    built = ROOT / "model_repo" / "minilm-l6"
    if built.exists() and list_versions(built):
        (repo / "samp").mkdir()
        config = json.loads((built / MODEL_CONFIG_FILE).read_text())
        config.update(name="samp")
        (repo / "samp" / MODEL_CONFIG_FILE).write_text(json.dumps(config))
        latest = str(list_versions(built)[-1])
        shutil.copytree(built / latest, repo / "samp" / latest)  # the manifest names its version
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="onnxruntime threads per instance")
    parser.add_argument("--instances", type=int, default=Settings().instances, help="runtime instances per model")
    parser.add_argument("--pairs", type=int, default=3,
                        help="alternating gRPC / REST runs at the most clients, on the same server")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--endpoints-only", action="store_true",
                        help="only /v1/embeddings against v2 infer, alternating on one server (its own section)")
    args = parser.parse_args()
    if args.endpoints_only:
        endpoints_only(args)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    texts = sentences()
    sentence_file = work / "sentences.json"
    sentence_file.write_text(json.dumps(texts))
    repo = prepare_repo(work)
    rows: list[tuple[str, int, dict]] = []

    rate, batch, sessions = ceiling(repo / "fp32" / "1", texts, args.threads, sorted({1, args.instances}))
    paired: list[tuple[float, dict, float]] = []
    console.print(f"in-process ceiling: {rate:.0f} sentences/s (length-sorted batches of {batch}, {sessions} "
                  f"session(s) of {args.threads} threads)")

    ours, url, grpc_port = start_sampserve(repo, args)
    try:
        for clients in args.clients:
            for label, model, protocol, target, client, path in (
                ("sampserve REST, FP32", "fp32", "http", url, None, "v2"),
                ("sampserve REST /v1/embeddings, FP32", "fp32", "http", url, None, "v1"),
                ("sampserve REST, FP32, batching off", "fp32-nobatch", "http", url, None, "v2"),
                ("sampserve gRPC, FP32", "fp32", "grpc", f"127.0.0.1:{grpc_port}", None, "v2"),
                # a Python client, like the gRPC one: REST and gRPC compared at the same client cost
                ("sampserve REST, FP32, aiohttp client", "fp32", "http", url, "aiohttp", "v2"),
                ("sampserve REST, SAMP plan", "samp", "http", url, None, "v2"),
            ):
                if model == "samp" and not (repo / "samp").exists():
                    continue
                if client == "aiohttp" and http_client() == "aiohttp":
                    continue  # the first row already is
                if label == "sampserve REST, FP32" and clients == max(args.clients):
                    paired = ceiling_pairs(repo / "fp32" / "1", texts, (sessions, batch), target, clients, args,
                                           sentence_file)
                    result = paired[0][1]
                else:
                    result = load(target, model, clients, args.seconds, sentence_file, protocol, client, path)
                rows.append((label, clients, result))
                print_point(label, clients, result)
        pairs = transport_pairs(url, f"127.0.0.1:{grpc_port}", max(args.clients), args, sentence_file)
        endpoints = endpoint_pairs(url, max(args.clients), args, sentence_file)
    finally:
        ours.stop()

    if PEER_PYTHON.exists():
        rows += run_mlserver(repo / "fp32" / "1", args, sentence_file)
    else:
        console.print(f"MLServer peer skipped: {PEER_PYTHON} missing (see bench/peers/README.md)")
    if INFINITY.exists():
        rows += run_infinity(args, sentence_file)
    else:
        console.print(f"infinity-emb peer skipped: {INFINITY} missing (see bench/peers/README.md)")

    plot(rows, PLOT)
    write_section(markdown(rows, (rate, batch, sessions), paired, args) + pairs_markdown(pairs, max(args.clients))
                  + "\n![req/s and p99 against clients](serving.png)\n", args.out, MARKS)
    write_section(endpoints_markdown(endpoints, max(args.clients), args), args.out, ENDPOINT_MARKS)
    console.print(f"wrote {args.out} and {PLOT}")


def start_sampserve(repo: Path, args: argparse.Namespace) -> tuple[Process, str, int]:
    """sampserve on free loopback ports, ready: (process, REST url, gRPC port)."""
    http, grpc_port = free_port(), free_port()
    ours = Process([sys.executable, "-m", "sampserve.cli", "serve", "--repo", str(repo), "--http-port", str(http),
                    "--grpc-port", str(grpc_port), "--threads", str(args.threads),
                    "--instances", str(args.instances)])
    url = f"http://127.0.0.1:{http}"
    try:
        wait_ready(url)
    except RuntimeError:
        ours.stop()
        raise
    return ours, url, grpc_port


def endpoints_only(args: argparse.Namespace) -> None:
    """/v1/embeddings and v2 infer alternating on one sampserve (FP32), at the most clients."""
    work = Path(tempfile.mkdtemp(prefix="bench-endpoints-"))
    sentence_file = work / "sentences.json"
    sentence_file.write_text(json.dumps(sentences()))
    repo = prepare_repo(work)
    ours, url, _ = start_sampserve(repo, args)
    try:
        load(url, "fp32", max(args.clients), 3, sentence_file)  # warm-up, not recorded
        endpoints = endpoint_pairs(url, max(args.clients), args, sentence_file)
    finally:
        ours.stop()
    write_section(endpoints_markdown(endpoints, max(args.clients), args), args.out, ENDPOINT_MARKS)
    console.print(f"wrote {args.out}")


def print_point(label: str, clients: int, result: dict) -> None:
    console.print(f"{label:40s} {clients:3d} clients: {result['rps']:7.1f} req/s "
                  f"p50 {result['p50_ms']:7.1f} ms p99 {result['p99_ms']:7.1f} ms {result['codes']}")


def endpoint_pairs(url: str, clients: int, args: argparse.Namespace, sentence_file: Path) -> list[tuple[dict, dict]]:
    """v2 infer and /v1/embeddings alternately on the same server and model, ``args.pairs`` times, one
    sentence per request from the same load generator: what each route's own cost leaves to the model."""
    pairs = []
    for index in range(args.pairs):
        v2 = load(url, "fp32", clients, args.seconds, sentence_file, path="v2")
        v1 = load(url, "fp32", clients, args.seconds, sentence_file, path="v1")
        pairs.append((v2, v1))
        console.print(f"pair {index + 1}: v2 infer {v2['rps']:.1f} / v1 embeddings {v1['rps']:.1f} req/s")
    return pairs


def endpoints_markdown(pairs: list[tuple[dict, dict]], clients: int, args: argparse.Namespace) -> str:
    ratios = [v1["rps"] / v2["rps"] for v2, v1 in pairs]
    listed = ", ".join(f"{v1['rps']:.1f} / {v2['rps']:.1f} (p99 {v1['p99_ms']:.0f} / {v2['p99_ms']:.0f} ms)"
                       for v2, v1 in pairs)
    return ("## Serving: OpenAI's /v1/embeddings against v2 infer\n\n"
            f"`python bench/serve.py --endpoints-only` ({machine()}; {args.seconds:.0f} s per point, {clients} "
            f"clients, {http_client()}, one real sentence per request, the FP32 MiniLM, sampserve with "
            f"{args.instances} instances of {args.threads} threads). The two routes alternately on the same server, "
            f"/v1 / v2 req/s: {listed}; mean ratio **{sum(ratios) / len(ratios):.2f}** (each pair "
            f"{min(ratios):.2f}-{max(ratios):.2f}). Both are answered by the fast door in front of FastAPI "
            "(service/api/door.py). Before it, /v1/embeddings went through FastAPI's routing: on 1 December, on "
            "the default repository's SAMP plan at 64 clients (AMD EPYC with AVX-512 VNNI), it served 359 req/s to "
            "v2 infer's 496 (0.72).\n")


def run_infinity(args: argparse.Namespace, sentence_file: Path) -> list[tuple[str, int, dict]]:
    """infinity-emb 0.0.78 (a TEI-like OpenAI-compatible embedding server) on its torch engine, the same
    all-MiniLM-L6-v2 from its local Hugging Face folder; its own dynamic batching."""
    rows = []
    http = free_port()
    label = "infinity-emb 0.0.78, torch FP32"
    peer = Process([str(INFINITY), "v2", "--model-id", str(bundled_minilm_dir()), "--served-model-name", "minilm",
                    "--engine", "torch", "--device", "cpu", "--host", "127.0.0.1", "--port", str(http),
                    "--url-prefix", "/v1", "--batch-size", "32", "--no-model-warmup"],
                   env={"OMP_NUM_THREADS": str(args.threads), "INFINITY_ANONYMOUS_USAGE_STATS": "0",
                        "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"})
    try:
        url = f"http://127.0.0.1:{http}"
        wait_ready(url, timeout=300, path="/health")  # infinity serves health outside its prefix
        load(url, "minilm", max(args.clients), 3, sentence_file, path="v1")  # warm-up, not recorded
        for clients in args.clients:
            result = load(url, "minilm", clients, args.seconds, sentence_file, path="v1")
            rows.append((label, clients, result))
            print_point(label, clients, result)
    finally:
        peer.stop()
    return rows


PLOTTED = ("sampserve REST, FP32", "sampserve REST /v1/embeddings, FP32", "sampserve REST, SAMP plan",
           "MLServer 1.7.1, FP32, adaptive batching 32 / 5 ms", "infinity-emb 0.0.78, torch FP32")


def plot(rows: list[tuple[str, int, dict]], out: Path) -> None:
    """req/s and p99 against clients, one line per server (matplotlib, for docs/benchmarks.md)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (rate, tail) = plt.subplots(1, 2, figsize=(11, 4))
    for label in PLOTTED:
        points = sorted((clients, r) for name, clients, r in rows if name == label)
        if not points:
            continue
        xs = [clients for clients, _ in points]
        rate.plot(xs, [r["rps"] for _, r in points], marker="o", label=label)
        tail.plot(xs, [r["p99_ms"] for _, r in points], marker="o", label=label)
    for axis, title in ((rate, "requests/s (higher is better)"), (tail, "p99 latency, ms (lower is better)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("closed-loop clients")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    tail.set_yscale("log")
    rate.legend(fontsize=7)
    figure.suptitle(f"one sentence per request, all-MiniLM-L6-v2 ({machine()})", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def ceiling_pairs(model_dir: Path, texts: list[str], best: tuple[int, int], url: str, clients: int,
                  args: argparse.Namespace, sentence_file: Path) -> list[tuple[float, dict, float]]:
    """The ceiling's best configuration and the server's REST point, alternately, ``args.pairs``
    times: (ceiling before, the load's result, ceiling after) each. This machine drifts by +-10%
    over minutes, so a ratio of two runs minutes apart says little; alternating ones do."""
    sessions, batch = best
    measured = [ceiling(model_dir, texts, args.threads, [sessions], [batch])[0]]
    results = []
    for _ in range(args.pairs):
        results.append(load(url, "fp32", clients, args.seconds, sentence_file))
        measured.append(ceiling(model_dir, texts, args.threads, [sessions], [batch])[0])
        console.print(f"ceiling {measured[-2]:.0f} / REST {results[-1]['rps']:.1f} / ceiling {measured[-1]:.0f}")
    return [(measured[i], results[i], measured[i + 1]) for i in range(len(results))]


def transport_pairs(url: str, grpc_target: str, clients: int, args: argparse.Namespace,
                    sentence_file: Path) -> list[tuple[float, float]]:
    """gRPC and REST alternately on the same server, ``args.pairs`` times, each with a Python asyncio
    client (grpc.aio, aiohttp): one pair is within this machine's +-10% drift, the mean of several
    alternating ones is not."""
    pairs = []
    for index in range(args.pairs):
        grpc_rps = load(grpc_target, "fp32", clients, args.seconds, sentence_file, "grpc")["rps"]
        rest_rps = load(url, "fp32", clients, args.seconds, sentence_file, "http", "aiohttp")["rps"]
        pairs.append((grpc_rps, rest_rps))
        console.print(f"pair {index + 1}: gRPC {grpc_rps:.1f} / REST {rest_rps:.1f} req/s")
    return pairs


def pairs_markdown(pairs: list[tuple[float, float]], clients: int) -> str:
    if not pairs:
        return ""
    ratios = [g / r for g, r in pairs]
    listed = ", ".join(f"{g:.1f} / {r:.1f}" for g, r in pairs)
    return ("\n" f"gRPC against REST, alternating on the same server at {clients} clients, both with a Python "
            f"asyncio client (grpc.aio, aiohttp), gRPC / REST req/s: {listed}; mean ratio "
            f"**{sum(ratios) / len(ratios):.2f}** (each pair {min(ratios):.2f}-{max(ratios):.2f}).\n")


def run_mlserver(model_dir: Path, args: argparse.Namespace, sentence_file: Path) -> list[tuple[str, int, dict]]:
    rows = []
    for label, batching in (("MLServer 1.7.1, FP32, batching off", []),
                            ("MLServer 1.7.1, FP32, adaptive batching 32 / 5 ms",
                             ["--max-batch-size", "32", "--max-batch-time", "0.005"])):
        http, grpc_port = free_port(), free_port()
        peer = Process([str(PEER_PYTHON), str(ROOT / "bench" / "peers" / "mlserver_serve.py"), "--model-dir",
                        str(model_dir), "--http-port", str(http), "--grpc-port", str(grpc_port), "--threads",
                        str(args.threads), *batching])
        try:
            url = f"http://127.0.0.1:{http}"
            wait_ready(url)
            for clients in args.clients:
                result = load(url, "minilm", clients, args.seconds, sentence_file)
                rows.append((label, clients, result))
                print_point(label, clients, result)
        finally:
            peer.stop()
    return rows


def markdown(rows: list[tuple[str, int, dict]], best: tuple[float, int, int],
             paired: list[tuple[float, dict, float]], args: argparse.Namespace) -> str:
    rate, batch, sessions = best
    # the first ceiling is the best of several noisy runs, so it errs high; the same configuration
    # measured right before and after the 64-client point is the fairer reference when there is one
    ceilings = [paired[0][0], *(after for _, _, after in paired)] if paired else [rate]
    reference = sum(ceilings) / len(ceilings)
    lines = ["## Serving: sampserve vs MLServer and the in-process ceiling", "",
             f"`python bench/serve.py` ({args.seconds:.0f} s per point, {machine()}, CPU only; onnxruntime "
             f"{args.threads} threads per instance, sampserve with {args.instances} instances per model; one real "
             f"sentence of 8-52 words per request; load from bench/loadgen.py in its own process, "
             f"{http_client()} "
             "for HTTP, grpc.aio for gRPC). In-process ceiling, same FP32 file, tokenization included, best of "
             f"1 or {args.instances} sessions and batches of 8/16/32: **{rate:.0f} sentences/s** ({sessions} "
             f"session(s), length-sorted batches of {batch}). The load generator shares the 2 cores with the "
             "server.",
             "", f"| server | clients | req/s | p50 ms | p99 ms | vs ceiling ({reference:.0f}/s) | errors |",
             "|---|---|---|---|---|---|---|"]
    for label, clients, r in rows:
        errors = {k: v for k, v in r["codes"].items() if k not in ("200", "OK")}
        lines.append(f"| {label} | {clients} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['rps'] / reference:.0%} | {errors or '-'} |")
    if paired:
        ratios = [r["rps"] / ((before + after) / 2) for before, r, after in paired]
        listed = ", ".join(f"{before:.0f} / {r['rps']:.1f} / {after:.0f}" for before, r, after in paired)
        lines += ["", f"Paired: the ceiling's best configuration and the {max(args.clients)}-client `sampserve REST, "
                  f"FP32` point, alternately (ceiling / server req/s / ceiling): {listed}. The server reached "
                  f"**{sum(ratios) / len(ratios):.0%}** of the ceiling around it on average (each "
                  f"{min(ratios):.0%}-{max(ratios):.0%}); the column above divides by the mean of those ceilings "
                  f"({reference:.0f}/s; the table's row is the first run). The first ceiling, the best of six "
                  "runs minutes earlier, errs high on this machine's ±10% drift."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
