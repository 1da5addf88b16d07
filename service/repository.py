"""The versioned model repository: the one definition of its on-disk format.

The offline quantizer publishes versions here and the online server loads them, so both import
this module. It must stay free of torch, onnx, ``training`` and ``quantizer`` (the server image has
no torch): stdlib and pydantic only.

Layout::

    model_repo/
      <model>/config.json        committed per-model settings (RepoModelConfig)
      <model>/<N>/               N = 1, 2, 3 ...: one published version
          manifest.json          written last by publish: sizes and sha256 of every file
          head.json              how to feed the graph and read its output (HeadMeta)
          model.onnx, tokenizer.json, samp_report.json, ...
      <model>/.tmp-<hex>/        a publish in progress (or left by a crash); never a version

A version appears only through one ``rename`` of a fully written and fsynced temp directory, so a
reader never sees half a version, and a crash leaves only a ``.tmp-*`` directory behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_FILE = "manifest.json"
MODEL_CONFIG_FILE = "config.json"
ONNX_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
HEAD_FILE = "head.json"
TORCH_PLAN_FILE = "torch/plan.json"
"""The PyTorch (GPU) plan of a version, beside its ONNX (CPU) plan: TorchPlan."""
TORCH_CONFIG_FILE = "torch/model_config.json"
"""The toolkit's model config the PyTorch runtime builds the model from (training.config.ModelConfig)."""
TORCH_WEIGHTS_FILE = "torch/model.safetensors"
"""The toolkit's FP32 weights; the runtime derives each unit's form (INT8, FP16, ...) from them at load."""
TORCH_REPORT_FILE = "torch/samp_report.json"
"""What SAMP measured on the GPU to choose the plan (quantizer.samp_torch.TorchSampReport)."""
REPORT_FILE = "samp_report.json"

TEMP_PREFIX = ".tmp-"
"""Prefix of in-progress publish directories; never listed as versions."""

PUBLISH_RETRIES = 100
"""How many version numbers publish tries before giving up when other publishers keep winning."""

_VERSION_NAME = re.compile(r"[1-9][0-9]*")
_CHUNK = 1 << 20
_OCCUPIED = {errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR}


class RepositoryError(Exception):
    """Base of the errors this module raises about repository contents."""


class ModelConfigError(RepositoryError, ValueError):
    """A model's config.json is missing, not JSON, or does not match RepoModelConfig."""


class ManifestError(RepositoryError):
    """A version directory does not match its manifest.json (or the manifest itself is bad)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


# ----------------------------------------------------------------------------------------------
# config.json


class BatchingConfig(_Strict):
    """How the server groups requests into batches for one model."""

    max_batch_size: int = Field(32, ge=1, le=1024)
    """Most requests in one batch. There is no queue delay to set: a batch runs as soon as a runtime
    instance is free, and what queued meanwhile forms the next one (docs/design.md)."""
    max_batch_tokens: int = Field(8192, ge=1)
    """Token budget per batch, padding included (batch size x longest sequence)."""
    max_queue_size: int = Field(256, ge=1)
    """Requests waiting beyond this are rejected (back-pressure) instead of queued."""
    instances: int | None = Field(None, ge=1, le=16)
    """Runtime instances, each running one batch at a time (Triton's instance_group count); unset:
    the server's ``instances`` setting."""


class GenerationConfig(_Strict):
    """How the server schedules a generation model (continuous batching with a key/value cache)."""

    max_num_seqs: int = Field(16, ge=1, le=1024)
    """Sequences decoded together at most (the running batch's rows)."""
    max_batch_prefill_tokens: int = Field(2048, ge=1)
    """Prompt tokens one step may prefill; must hold one sequence of max_model_len tokens."""
    max_kv_tokens: int | None = Field(None, ge=1)
    """Key/value cache slots at most, counted as batch x padded length; a decode step that would
    go past it preempts the newest sequence (recomputed later). None: max_num_seqs x max_model_len,
    which never preempts."""
    max_model_len: int | None = Field(None, ge=2)
    """Most tokens one sequence holds, prompt and output together; None: head.json's max_length
    (a larger value is refused at load)."""
    max_waiting: int = Field(256, ge=1)
    """Requests waiting for a slot beyond this are rejected at once (429) instead of queued."""
    continuous_batching: bool = True
    """False: request-level batching, a batch runs to completion before new requests join (for
    comparison only: new requests then wait for the slowest sequence of the batch)."""

    @model_validator(mode="after")
    def _fits(self) -> GenerationConfig:
        """One sequence of max_model_len tokens must fit the prefill budget and the cache."""
        if self.max_model_len is not None:
            for name in ("max_batch_prefill_tokens", "max_kv_tokens"):
                value = getattr(self, name)
                if value is not None and value < self.max_model_len:
                    raise ValueError(f"{name}={value} is below max_model_len={self.max_model_len}: "
                                     "a sequence of that length could never run")
        return self


class VersionPolicy(_Strict):
    """Which published versions the server loads; exactly one of the three is set (default latest=1)."""

    latest: int | None = Field(None, ge=1)
    """Serve the N newest versions."""
    specific: list[int] | None = Field(None, min_length=1)
    """Serve exactly these version numbers (those that exist)."""
    all: bool | None = None
    """Serve every published version; must be true when given."""

    @model_validator(mode="before")
    @classmethod
    def _default_latest(cls, data: Any) -> Any:
        """An empty policy means "the newest version", as in Triton."""
        if isinstance(data, Mapping) and all(data.get(k) is None for k in ("latest", "specific", "all")):
            return {**data, "latest": 1}
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        """Two policies at once would be ambiguous, and all=false would select nothing."""
        given = [k for k in ("latest", "specific", "all") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of latest, specific, all (got {', '.join(given)})")
        if self.all is False:
            raise ValueError("all must be true when given (use latest or specific to restrict)")
        if self.specific is not None and any(v < 1 for v in self.specific):
            raise ValueError(f"specific versions must be >= 1, got {self.specific}")
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of ``available``, ascending."""
        versions = sorted(set(available))
        if self.latest is not None:
            return versions[-self.latest :]
        if self.specific is not None:
            wanted = set(self.specific)
            return [v for v in versions if v in wanted]
        return versions


OrtProvider = Literal["tensorrt", "cuda", "cpu"]
"""onnxruntime execution providers by short name, tried in the order given (the CPU one always last)."""
ORT_PROVIDER_NAMES: dict[str, str] = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
                                      "cpu": "CPUExecutionProvider"}


class OrtRuntimeConfig(_Strict):
    """How onnxruntime runs a model's ONNX plan on the node at hand."""

    providers: list[OrtProvider] | None = Field(None, min_length=1)
    """Providers in order of preference; those the installed onnxruntime lacks are skipped (and logged), the
    CPU provider always closes the list. None: the server's ``ort_providers``."""
    tensorrt_fp16: bool = True
    """TensorRT: run the float parts in FP16."""
    tensorrt_int8: bool = True
    """TensorRT: run the graph's Q/DQ pairs as INT8 (explicit quantization: no calibration table)."""


class TorchRuntimeConfig(_Strict):
    """How the PyTorch runtime runs a version's PyTorch plan."""

    device: Literal["cuda", "cpu"] = "cuda"
    """``cuda``: the first GPU (the version fails to load, saying so, where CUDA is absent); ``cpu``: torch on
    the CPU (a check of the plan, not a fast path: onnxruntime serves CPUs)."""
    cuda_graphs: bool = True
    """CUDA: capture one graph per (batch, length) bucket at load and replay it (removes kernel launches)."""
    batch_buckets: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32], min_length=1)
    """Batch sizes captured; a batch is padded with copies of its first row to the next bucket. Capped by
    batching.max_batch_size (which is always covered)."""
    length_buckets: list[int] = Field(default_factory=lambda: [32, 64, 128, 256, 512], min_length=1)
    """Sequence lengths captured; a batch is padded (attention mask 0) to the next bucket. Capped by the
    model's max_length (which is always covered)."""

    @model_validator(mode="after")
    def _positive_sorted(self) -> TorchRuntimeConfig:
        for name in ("batch_buckets", "length_buckets"):
            values = getattr(self, name)
            if any(v < 1 for v in values) or values != sorted(set(values)):
                raise ValueError(f"{name}: positive and strictly increasing, got {values}")
        return self


class RepoModelConfig(_Strict):
    """A served model's committed ``<model>/config.json``."""

    name: str = Field(min_length=1)
    """Model name; must equal its folder name in the repository."""
    task: Literal["classification", "matching", "generation"]
    """What the model does; decides the request/response shape the server exposes."""
    source: str
    """Where the checkpoint comes from (free text: a path, a hub id, a training run)."""
    max_drop: float = Field(0.01, ge=0)
    """Accuracy budget the quantizer used: the most metric drop allowed versus full precision."""
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    """Dynamic batching settings."""
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    """Which versions to load."""
    max_length: int | None = Field(None, ge=1)
    """Longest input in tokens the server accepts; None: the model's own limit."""
    runtime: str = Field("onnxruntime", min_length=1)
    """The runtime by name, from service.runtimes.RUNTIMES (``onnxruntime``: the ONNX plan; ``pytorch``: the
    version's PyTorch plan, torch/); plugins may register more."""
    onnxruntime: OrtRuntimeConfig = Field(default_factory=lambda: OrtRuntimeConfig())
    """onnxruntime's execution providers for this model (default: the server's order)."""
    pytorch: TorchRuntimeConfig = Field(default_factory=lambda: TorchRuntimeConfig())
    """The PyTorch runtime's device and CUDA-graph buckets (used when ``runtime`` is ``pytorch``)."""
    generation: GenerationConfig | None = None
    """Generation models: scheduling and cache limits (defaults when absent); ``batching`` is then
    unused. Only for task "generation"."""

    @model_validator(mode="after")
    def _generation_only_for_generation(self) -> RepoModelConfig:
        if self.generation is not None and self.task != "generation":
            raise ValueError(f"generation: only for task 'generation' (this model's task is {self.task!r})")
        return self


def _describe(err: ValidationError) -> str:
    """One line per pydantic error, with the dotted field path, so the message names the field."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def _read_json(path: Path, error: type[RepositoryError]) -> Any:
    """Parse a JSON file, turning a missing file or bad JSON into ``error`` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def load_model_config(model_dir: Path) -> RepoModelConfig:
    """Read and validate ``model_dir/config.json``; errors name the file and the field."""
    path = Path(model_dir) / MODEL_CONFIG_FILE
    data = _read_json(path, ModelConfigError)
    try:
        config = RepoModelConfig.model_validate(data)
    except ValidationError as e:
        raise ModelConfigError(f"{path}: {_describe(e)}") from e
    if config.name != Path(model_dir).name:
        raise ModelConfigError(f"{path}: name: {config.name!r} does not match folder name {Path(model_dir).name!r}")
    return config


# ----------------------------------------------------------------------------------------------
# head.json


class HeadError(RepositoryError, ValueError):
    """A version's head.json is missing, not JSON, or does not match HeadMeta."""


class GenerationMeta(BaseModel):
    """Generation heads: how to feed the decoder graph's cache and when a sequence ends."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    num_layers: int = Field(ge=1)
    """Layers, each with a past/present key and value (graph names ``past_key_values.{i}.key``...)."""
    num_kv_heads: int = Field(ge=1)
    """Key/value heads in the cache (fewer than query heads under grouped-query attention)."""
    head_dim: int = Field(ge=1)
    stop_token_ids: list[int] = Field(min_length=1)
    """Token ids that end a sequence (the model's end-of-sequence ids)."""
    chat_template: str | None = None
    """Jinja chat template (Hugging Face's format) rendering ``messages`` into a prompt."""
    bos_token: str | None = None
    """Text of the beginning-of-sequence token the template may reference (None: the model has none)."""
    eos_token: str | None = None


OrtFusion = Literal["SkipLayerNormFusion"]
"""onnxruntime graph fusions SAMP times with and without on the machine at hand (docs/design.md)."""


class ImageSpec(_Strict):
    """How an image model's version takes pixels: the one shape its graph accepts and the arithmetic
    that turns UINT8 pixels into its FP32 ``pixel_values`` (transformers' image processor's rescale and
    normalize, recorded from the checkpoint's ``preprocessor_config.json``)."""

    height: int = Field(ge=1, le=4096)
    width: int = Field(ge=1, le=4096)
    channels: int = Field(ge=1, le=4)
    rescale_factor: float = Field(1 / 255, gt=0)
    """UINT8 pixels are multiplied by this (1/255: to [0, 1]) ..."""
    mean: list[float]
    """... then have this subtracted, per channel ..."""
    std: list[float]
    """... and are divided by this, per channel."""

    @model_validator(mode="after")
    def _per_channel(self) -> ImageSpec:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need one value per channel ({self.channels})")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self


class AudioSpec(_Strict):
    """How an audio model's version takes sound: the rate, the clip length its graph takes, and whether
    clips are normalized to zero mean and unit variance (transformers' wav2vec2 feature extractor)."""

    sampling_rate: int = Field(ge=1000, le=192000)
    max_samples: int = Field(ge=1, le=10_000_000)
    """Every clip is padded with silence to this many samples (the graph's input length)."""
    normalize: bool = True


class HeadMeta(BaseModel):
    """``<model>/<N>/head.json``: what the server needs, beside the graph and the tokenizer, to turn
    texts (or images) into a version's inputs and its outputs into answers.

    Written by the quantizer's publish, read by the server's heads (service.heads) and by
    quantizer.torch_module. Fields nobody reads are not written. Unknown fields are ignored rather
    than refused, so that versions published before this schema (which also carried ``task``,
    ``text_pair``, ``source`` and ``output_name``) still load.
    """

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    input_names: list[Literal["input_ids", "attention_mask", "token_type_ids", "position_ids",
                              "pixel_values", "input_values"]] = Field(min_length=1)
    """The graph's inputs, in order: token inputs, all int64 (batch, sequence); or an image model's
    ``pixel_values``, float32 (batch, channels, height, width); an audio model's ``input_values``, float32
    (batch, samples). A generation graph also takes its cache (GenerationMeta)."""
    max_length: int = Field(ge=1)
    """Longest input in tokens (special tokens included) the model takes; an image model's patches + 1."""
    image: ImageSpec | None = None
    """An image model: the pixels it takes (it has no tokenizer)."""
    audio: AudioSpec | None = None
    """An audio model: the sound it takes (it has no tokenizer)."""
    pad_token_id: int = Field(0, ge=0)
    """Token id that pads a batch's shorter rows."""
    labels: list[str] | None = None
    """Classification: the class names, by logit index."""
    normalized: bool = False
    """Matching: the graph's embeddings are already unit length (the server skips normalizing)."""
    text_prefix: str | None = None
    """Put before every input text before tokenizing (multilingual-e5 models expect "query: ")."""
    generation: GenerationMeta | None = None
    """Generation: cache layout, stop ids, chat template; ``max_length`` is then the most tokens a
    sequence may hold, prompt and output together."""
    disabled_optimizers: list[OrtFusion] | None = Field(None, max_length=len(get_args(OrtFusion)))
    """onnxruntime fusions this version runs without: SAMP measured its graph faster without them on the
    machine it was tuned on (the manifest's provenance names that machine)."""

    def to_json(self) -> bytes:
        """The file's bytes as publish writes them."""
        return self.model_dump_json(indent=2, exclude_none=True).encode("utf-8") + b"\n"


TorchDtype = Literal["float32", "float16", "bfloat16"]
TorchForm = Literal["int8", "float32", "float16", "bfloat16"]
"""A unit's form in a PyTorch plan: INT8 is W8A8 with one scale per weight output channel and one per
activation row (so a row's result does not depend on its batch-mates), accumulated in int32."""


class TorchDevice(BaseModel):
    """The device a PyTorch plan was measured on."""

    model_config = ConfigDict(extra="ignore", use_attribute_docstrings=True)

    name: str
    """``torch.cuda.get_device_name()`` or the CPU's model name."""
    capability: str | None = None
    """CUDA compute capability (``9.0`` for Hopper); None on a CPU."""
    torch: str
    cuda: str | None = None
    """The CUDA version torch was built with."""


class TorchPlan(BaseModel):
    """``<model>/<N>/torch/plan.json``: the PyTorch plan SAMP chose (the GPU path; the ONNX plan beside it is
    the CPU path). The runtime builds the model from torch/model_config.json and torch/model.safetensors and
    gives every unit its form."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    format: Literal[1] = 1
    compute_dtype: TorchDtype
    """The dtype everything outside ``forms`` runs in (layer norms, attention, units not listed)."""
    forms: dict[str, TorchForm] = Field(default_factory=dict)
    """Units whose form differs from ``compute_dtype``, by unit name (``layer3.ffn_in``, ``head``)."""
    measured_on: TorchDevice | None = None
    """Where SAMP measured the plan (None: written by hand)."""

    @property
    def int8_units(self) -> list[str]:
        return sorted(u for u, f in self.forms.items() if f == "int8")

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2, exclude_none=True).encode("utf-8") + b"\n"


def load_torch_plan(version_dir: Path) -> TorchPlan | None:
    """Read and validate ``version_dir/torch/plan.json``; None when the version has no PyTorch plan."""
    path = Path(version_dir) / TORCH_PLAN_FILE
    if not path.is_file():
        return None
    try:
        return TorchPlan.model_validate(_read_json(path, HeadError))
    except ValidationError as e:
        raise HeadError(f"{path}: {_describe(e)}") from e


def load_head(version_dir: Path) -> HeadMeta:
    """Read and validate ``version_dir/head.json``; errors name the file and the field."""
    path = Path(version_dir) / HEAD_FILE
    data = _read_json(path, HeadError)
    try:
        return HeadMeta.model_validate(data)
    except ValidationError as e:
        raise HeadError(f"{path}: {_describe(e)}") from e


# ----------------------------------------------------------------------------------------------
# versions


def list_versions(model_dir: Path) -> list[int]:
    """Published version numbers, ascending: integer-named subdirectories only."""
    return sorted(
        int(p.name) for p in Path(model_dir).iterdir() if _VERSION_NAME.fullmatch(p.name) and p.is_dir()
    )


def next_version(model_dir: Path) -> int:
    """The number a new publish would take: one past the highest (numbers are never reused)."""
    return max(list_versions(model_dir), default=0) + 1


# ----------------------------------------------------------------------------------------------
# manifest.json


class FileEntry(_Strict):
    """One published file as recorded in the manifest."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hex SHA-256 of the content."""
    bytes: int = Field(ge=0)
    """Size in bytes."""


class Manifest(_Strict):
    """``<model>/<N>/manifest.json``: what a version contains, written last by publish."""

    version: int = Field(ge=1)
    """The version number; equals the folder name."""
    created: datetime
    """When the version was published (ISO 8601, UTC)."""
    files: dict[str, FileEntry]
    """Every file in the version except manifest.json, by POSIX relative path."""
    metadata: dict[str, Any] = Field(default_factory=dict)
    """Free-form publisher information (quantizer settings, accuracy, source checkpoint)."""


def check_relpath(name: str) -> PurePosixPath:
    """Validate a file name inside a version: relative, at most one subdirectory, no ``..``.

    Rejecting these keeps a publisher (or a tampered manifest) from writing or reading outside
    the version directory.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"file name must be a non-empty string, got {name!r}")
    path = PurePosixPath(name)
    if "\\" in name or "\0" in name or path.is_absolute() or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"file name {name!r} must be a relative POSIX path")
    if any(part in ("..", ".") for part in name.split("/")) or str(path) != name:
        raise ValueError(f"file name {name!r} must be normalized and must not contain '..' or '.'")
    if len(path.parts) > 2:
        raise ValueError(f"file name {name!r} is nested too deep (at most one subdirectory)")
    if name == MANIFEST_FILE:
        raise ValueError(f"{MANIFEST_FILE} is written by publish itself")
    return path


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(dest: Path, source: Path | bytes) -> FileEntry:
    """Write one file (hashing while writing) and fsync it; ``x`` mode refuses duplicates."""
    digest = hashlib.sha256()
    size = 0
    with open(dest, "xb") as out:
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            digest.update(data)
            out.write(data)
            size = len(data)
        elif isinstance(source, Path):
            with open(source, "rb", buffering=0) as src:  # unbuffered: a pipe yields what it has
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        else:
            raise TypeError(f"{dest.name}: source must be a Path or bytes, got {type(source).__name__}")
        out.flush()
        os.fsync(out.fileno())
    return FileEntry(sha256=digest.hexdigest(), bytes=size)


def _write_manifest(tmp: Path, manifest: Manifest) -> None:
    """(Re)write manifest.json in the temp dir; rewritten when the version number changes."""
    path = tmp / MANIFEST_FILE
    with open(path, "wb") as out:
        out.write(manifest.model_dump_json(indent=2).encode("utf-8") + b"\n")
        out.flush()
        os.fsync(out.fileno())
    _fsync_dir(tmp)


def _rename_to_next(tmp: Path, model_dir: Path, manifest: Manifest) -> Path:
    """Rename ``tmp`` to the next free number; if another publisher took it, renumber and retry."""
    n = manifest.version
    for _ in range(PUBLISH_RETRIES):
        target = model_dir / str(n)
        try:
            os.rename(tmp, target)
        except OSError as e:
            if e.errno not in _OCCUPIED:
                raise
            n = max(n + 1, next_version(model_dir))
            manifest = manifest.model_copy(update={"version": n})
            _write_manifest(tmp, manifest)
            continue
        _fsync_dir(model_dir)
        return target
    raise RepositoryError(f"{model_dir}: no free version number after {PUBLISH_RETRIES} attempts")


def publish(model_dir: Path, files: Mapping[str, Path | bytes], metadata: dict[str, Any] | None = None) -> Path:
    """Atomically add the next version of a model and return its directory.

    Files go to ``model_dir/.tmp-<hex>/`` (each fsynced, manifest.json last), then one ``rename``
    makes the version visible: readers see all of it or none. A number taken meanwhile by another
    publisher is skipped. On any error the temp directory is removed; after a hard crash it stays
    for ``remove_stale_temp``.
    """
    model_dir = Path(model_dir)
    names = {name: check_relpath(name) for name in files}
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory does not exist")
    tmp = model_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        entries: dict[str, FileEntry] = {}
        for name, rel in names.items():
            dest = tmp / rel
            if len(rel.parts) > 1 and not dest.parent.is_dir():
                dest.parent.mkdir()
            entries[name] = _write_file(dest, files[name])
        for sub in {tmp / rel.parent for rel in names.values() if len(rel.parts) > 1}:
            _fsync_dir(sub)
        manifest = Manifest(
            version=next_version(model_dir),
            created=datetime.now(UTC),
            files=dict(sorted(entries.items())),
            metadata=dict(metadata or {}),
        )
        _write_manifest(tmp, manifest)
        return _rename_to_next(tmp, model_dir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, streamed so large models do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(version_dir: Path) -> Manifest:
    """Parse manifest.json, naming the file and field on failure."""
    path = version_dir / MANIFEST_FILE
    data = _read_json(path, ManifestError)
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(f"{path}: {_describe(e)}") from e


def _check_listed(version_dir: Path, name: str, entry: FileEntry) -> str | None:
    """What is wrong with one listed file, or None. Symlinks count as wrong: they may point outside."""
    try:
        check_relpath(name)
    except ValueError as e:
        return f"{version_dir / MANIFEST_FILE}: bad file name: {e}"
    path = version_dir / name
    try:
        st = path.lstat()
    except FileNotFoundError:
        return f"{path}: listed in {MANIFEST_FILE} but missing"
    if not path.is_file() or path.is_symlink():
        return f"{path}: not a regular file"
    if st.st_size != entry.bytes:
        return f"{path}: size {st.st_size} bytes, {MANIFEST_FILE} says {entry.bytes}"
    actual = _sha256_file(path)
    if actual != entry.sha256:
        return f"{path}: sha256 {actual} does not match {MANIFEST_FILE} ({entry.sha256})"
    return None


def _unlisted(version_dir: Path, listed: set[str]) -> list[str]:
    """Non-directory entries that the manifest does not mention (extra or injected files)."""
    problems = []
    for root, dirs, filenames in os.walk(version_dir):
        rel_root = Path(root).relative_to(version_dir)
        names = filenames + [d for d in dirs if (Path(root) / d).is_symlink()]
        for fname in sorted(names):
            rel = (rel_root / fname).as_posix()
            if rel != MANIFEST_FILE and rel not in listed:
                problems.append(f"{version_dir / rel}: not listed in {MANIFEST_FILE}")
    return problems


def verify(version_dir: Path) -> Manifest:
    """Check a version against its manifest and return the manifest.

    Every listed file must exist with the recorded size and sha256, nothing else may be there, and
    the manifest's version must equal the folder name. All problems are reported in one
    ManifestError, each naming the file and what is wrong.
    """
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise ManifestError(f"{version_dir}: not a directory")
    manifest = load_manifest(version_dir)
    problems = []
    if not _VERSION_NAME.fullmatch(version_dir.name) or int(version_dir.name) != manifest.version:
        problems.append(
            f"{version_dir / MANIFEST_FILE}: version {manifest.version} does not match folder name {version_dir.name!r}"
        )
    for name, entry in manifest.files.items():
        if (problem := _check_listed(version_dir, name, entry)) is not None:
            problems.append(problem)
    problems += _unlisted(version_dir, set(manifest.files))
    if problems:
        raise ManifestError("; ".join(problems))
    return manifest


# ----------------------------------------------------------------------------------------------
# cleanup


def _newest_mtime(path: Path) -> float:
    """Latest modification time in a tree: a live publisher still writing a big file stays young."""
    newest = path.stat().st_mtime
    for root, _dirs, filenames in os.walk(path):
        for name in filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


def remove_stale_temp(model_dir: Path, older_than_s: float = 3600) -> list[Path]:
    """Delete ``.tmp-*`` directories left by crashed publishers; returns what was removed.

    Only directories untouched for ``older_than_s`` seconds go, so a publish still in progress
    is left alone (with the default threshold).
    """
    removed = []
    now = time.time()
    for path in sorted(Path(model_dir).iterdir()):
        if not path.name.startswith(TEMP_PREFIX) or path.is_symlink() or not path.is_dir():
            continue
        try:
            if now - _newest_mtime(path) < older_than_s:
                continue
            shutil.rmtree(path)
        except FileNotFoundError:  # another cleaner got there first
            continue
        removed.append(path)
    return removed
