"""Publish a SAMP result as the next version of a model in the repository (atomically).

Only what the server can serve is published: a checkpoint whose task has no server head
(``service.heads.HEADS``) is refused before anything is written, and so is one whose task differs
from the model's committed config.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantizer.export import ExportInfo, export_onnx
from quantizer.report import REPORT_JSON, REPORT_PNG, write_json, write_plot
from quantizer.samp import Samp
from quantizer.schemas import DEFAULT_BATCH_COSINE, SampReport, SampResult, SampSettings
from quantizer.samp_decoder import DecoderSamp, DecoderSampSettings
from service.heads import HEADS
from service.repository import (
    HEAD_FILE,
    MODEL_CONFIG_FILE,
    ONNX_FILE,
    TOKENIZER_FILE,
    GenerationMeta,
    AudioSpec,
    HeadMeta,
    ImageSpec,
    OrtFusion,
    RepoModelConfig,
    list_versions,
    load_model_config,
    publish,
    verify,
)
from training.checkpoint import CONFIG_FILE, Checkpoint, raw_tokenizer

SERVED_TASKS = {"matching": "matching", "classification": "classification", "lm": "generation"}
"""A checkpoint's training task -> the repository task it publishes as (RepoModelConfig.task)."""


class NotServable(ValueError):
    """The checkpoint's task is one the server has no head for, or not the model's committed task."""


def served_task(model_dir: Path, checkpoint: Checkpoint) -> str:
    """The repository task ``checkpoint`` publishes as into ``model_dir``; raises NotServable, naming
    the tasks the server does serve, when the server could not serve it. Writes nothing."""
    trained = checkpoint.head.task
    task = SERVED_TASKS.get(trained, trained)
    if task not in HEADS:
        published_as = f" (published as task {task!r})" if task != trained else ""
        raise NotServable(
            f"{model_dir.name}: the server has no head for task {trained!r}{published_as}; it serves "
            f"{', '.join(sorted(HEADS))}. Nothing was published."
        )
    if (Path(model_dir) / MODEL_CONFIG_FILE).exists():
        committed = load_model_config(Path(model_dir)).task
        if committed != task:
            raise NotServable(
                f"{Path(model_dir) / MODEL_CONFIG_FILE}: task {committed!r}, but the checkpoint is a {task} "
                "model. Nothing was published."
            )
    return task


def ensure_model_config(model_dir: Path, checkpoint: Checkpoint, max_drop: float) -> RepoModelConfig:
    """The model's committed config.json: created with defaults on first publish, else validated."""
    task = served_task(model_dir, checkpoint)
    if (model_dir / MODEL_CONFIG_FILE).exists():
        return load_model_config(model_dir)
    config = RepoModelConfig.model_validate({"name": model_dir.name, "task": task, "source": str(checkpoint.path),
                                             "max_drop": max_drop, "max_length": checkpoint.head.max_length})
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / MODEL_CONFIG_FILE).write_text(config.model_dump_json(indent=2, exclude_none=True) + "\n")
    return config


def generation_meta(checkpoint: Checkpoint) -> GenerationMeta | None:
    """The cache layout and stopping rules of a causal LM's graph (None for encoders)."""
    config, head = checkpoint.config, checkpoint.head
    if head.task != "lm":
        return None
    stops = list(head.stop_token_ids or ([config.eos_token_id] if config.eos_token_id is not None else []))
    if not stops:
        raise NotServable("a generator needs an end-of-sequence id (eos_token_id or head stop_token_ids)")
    return GenerationMeta(num_layers=config.encoder.num_layers, num_kv_heads=config.key_value_heads,
                          head_dim=config.attention_head_dim, stop_token_ids=stops, chat_template=head.chat_template,
                          bos_token=head.bos_token, eos_token=head.eos_token)


def image_spec(checkpoint: Checkpoint) -> ImageSpec | None:
    """The pixels an image model's version takes, from its image processor's settings: the server then
    prepares UINT8 images with the same arithmetic (the client sends them at the model's size)."""
    if checkpoint.config.modality != "image":
        return None
    emb, processor = checkpoint.config.embedding, checkpoint.preprocessor or {}
    size = processor.get("size") or {}
    if (size.get("height"), size.get("width")) != (emb.image_size, emb.image_size):
        raise NotServable(f"the image processor resizes to {size}, but the model takes {emb.image_size}x"
                          f"{emb.image_size} pixels")
    normalize = processor.get("do_normalize", True)
    return ImageSpec(
        height=emb.image_size, width=emb.image_size, channels=emb.num_channels,
        rescale_factor=processor.get("rescale_factor", 1 / 255) if processor.get("do_rescale", True) else 1.0,
        mean=list(processor.get("image_mean", [0.5] * emb.num_channels)) if normalize else [0.0] * emb.num_channels,
        std=list(processor.get("image_std", [0.5] * emb.num_channels)) if normalize else [1.0] * emb.num_channels,
    )


def audio_spec(checkpoint: Checkpoint) -> AudioSpec | None:
    """The sound an audio model's version takes, from its feature extractor's settings and clip length."""
    if checkpoint.config.modality != "audio":
        return None
    emb, extractor = checkpoint.config.embedding, checkpoint.preprocessor or {}
    rate = extractor.get("sampling_rate", emb.sampling_rate)
    if rate != emb.sampling_rate:
        raise NotServable(f"the feature extractor takes {rate} Hz, but the model was built for {emb.sampling_rate} Hz")
    if extractor.get("return_attention_mask") or extractor.get("padding_value", 0.0) != 0.0:
        raise NotServable("the server pads clips with silence and passes no attention mask (wav2vec2-base's way)")
    return AudioSpec(sampling_rate=rate, max_samples=emb.max_samples,
                     normalize=bool(extractor.get("do_normalize", True)))


def input_files(checkpoint: Checkpoint) -> dict[str, bytes]:
    """What a version needs beside the graph to prepare inputs: a text model's tokenizer (an image model's
    preparation is in head.json's ``image``)."""
    if checkpoint.tokenizer is None:
        return {}
    return {TOKENIZER_FILE: raw_tokenizer(checkpoint.tokenizer).to_str().encode()}


def served_head(checkpoint: Checkpoint, info: ExportInfo,
                disabled_optimizers: list[OrtFusion] | None = None) -> HeadMeta:
    """head.json of a version: how the server feeds the exported graph and reads its output, and the
    onnxruntime fusions SAMP measured the plan faster without."""
    return HeadMeta(
        disabled_optimizers=disabled_optimizers or None,
        generation=generation_meta(checkpoint),
        input_names=list(info.input_names),  # export_onnx names only the inputs HeadMeta knows
        max_length=checkpoint.head.max_length,
        image=image_spec(checkpoint),
        audio=audio_spec(checkpoint),
        pad_token_id=checkpoint.config.pad_token_id,
        labels=checkpoint.head.labels,
        normalized=bool(checkpoint.config.target.normalize),
        text_prefix=checkpoint.head.text_prefix or None,
    )


def publish_fp32(checkpoint: Checkpoint, repo: Path, model: str, workdir: Path) -> Path:
    """Publish the exported FP32 graph as it is (no SAMP): the baseline a benchmark compares with."""
    model_dir = Path(repo) / model
    served_task(model_dir, checkpoint)
    info = export_onnx(checkpoint, Path(workdir) / "fp32.onnx")
    ensure_model_config(model_dir, checkpoint, max_drop=0.0)
    return publish(model_dir, {
        ONNX_FILE: info.path,
        **input_files(checkpoint),
        HEAD_FILE: served_head(checkpoint, info).to_json(),
    }, {"source": str(checkpoint.path), "verdict": "FP32, not quantized", "quantized": False})


def publish_result(samp: Samp | DecoderSamp, result: SampResult, repo: Path, model: str) -> Path:
    """Write ``repo/model/<next>/``; returns its path.
    Refuses (NotServable) a checkpoint the server could not serve, before writing anything."""
    model_dir = Path(repo) / model
    served_task(model_dir, samp.checkpoint)
    settings = samp.settings
    max_drop = 1.0 - settings.min_agreement if isinstance(settings, DecoderSampSettings) else settings.max_drop
    ensure_model_config(model_dir, samp.checkpoint, max_drop)
    work = result.workdir
    files: dict[str, Path | bytes] = {
        ONNX_FILE: result.model_path,
        **input_files(samp.checkpoint),
        HEAD_FILE: served_head(samp.checkpoint, samp.info, result.report.disabled_optimizers).to_json(),
        REPORT_JSON: write_json(result.report, work / REPORT_JSON),
        REPORT_PNG: write_plot(result.report, work / REPORT_PNG),
    }
    metadata: dict[str, Any] = {"source": str(samp.checkpoint.path), "verdict": result.report.verdict,
                                "mode": result.report.mode}
    if result.report.provenance is not None:  # the server compares it with the host it runs on
        metadata["provenance"] = result.report.provenance.model_dump()
    chosen = next(c for c in result.report.candidates if c.name == result.report.chosen)
    if chosen.batch_invariant is not None:  # what /v2/models/{m} tells clients about batch-mates
        metadata["batch_invariance"] = {"invariant": chosen.batch_invariant, "batch_cosine": chosen.batch_cosine,
                                        "required": result.report.budget.get("min_batch_cosine")}
    return publish(model_dir, files, metadata)


def retune_source(model_dir: Path, version: int | None = None) -> tuple[Path, SampSettings]:
    """The checkpoint and budget a published encoder version was quantized with (its newest version by
    default): ``sampserve quantize --retune`` runs SAMP again with them on the machine at hand, so that the
    speed decisions (which INT8 form, which units) are this machine's, and publishes a new version."""
    number = version or max(list_versions(model_dir), default=0)
    if not number:
        raise FileNotFoundError(f"{model_dir}: no published version to re-tune")
    version_dir = Path(model_dir) / str(number)
    manifest = verify(version_dir)
    if not (version_dir / REPORT_JSON).is_file():
        raise NotServable(f"{version_dir}: no {REPORT_JSON} (not a SAMP plan): nothing to re-tune")
    report = SampReport.model_validate_json((version_dir / REPORT_JSON).read_text())
    if report.task == "generation":
        raise NotServable(f"{version_dir}: re-tuning covers encoders; quantize a generator again from its checkpoint")
    source = Path(str(manifest.metadata.get("source", "")))
    if not (source / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{version_dir}: its source checkpoint {source} is not on this machine; pass "
                                "--checkpoint to quantize from a copy of it")
    budget = report.budget
    settings = SampSettings(
        max_drop=budget["max_drop"] if budget.get("max_drop") is not None else 0.01,
        min_cosine=budget.get("min_cosine"),
        min_batch_cosine=budget.get("min_batch_cosine", DEFAULT_BATCH_COSINE),
        matching_metric="retrieval" if report.metric == "retrieval_acc@1" else "spearman_vs_fp32",
    )
    return source, settings
