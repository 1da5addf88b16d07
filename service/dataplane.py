"""The one core both transports call: the protocol's contract, limits, tokenization, batching.

REST and gRPC convert their messages into these calls (tensors arrive as ``TensorInput``, whose
elements are decoded only after their count has been checked) and map the one error type,
``ServiceError``, to a status by one table each (``service.errors``). Metadata, readiness, v2 tensor
validation, output naming and request metrics live here, once; the transports hold no task logic.

Limits are checked before work: texts per request (below the model's queue size), characters per
text (before tokenizing; ``truncate`` cuts characters first, so a huge text is never tokenized
whole), and large tokenizations run on threads, off the event loop that answers health probes.

Generation (``DataPlane.generate``) is the one streaming call: every API's stream (OpenAI, the v2
generate extension, gRPC) is the same ``Generation``, whose first delta is already computed when it
is returned, so an error before the first token is still a plain status, never a broken stream.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from service import tracing
from service.batching import BatcherClosed, DeadlineExceeded, QueueFull
from service.errors import (
    Code,
    DeadlinePassed,
    InvalidInput,
    ModelFailure,
    NotReady,
    Overloaded,
    ServiceError,
    shorten,
)
from service.generation import Delta, SamplingParams
from service.heads import ClassificationHead, Encoded, MatchingHead, TensorHead, TensorItem, TextEncoder
from service.instances import RuntimeHung
from service.metrics import Metrics
from service.models import GenerationVersion, IndexEntry, LoadedVersion, ModelManager
from service.request_context import current_request
from service.runtimes import RuntimeInfo
from service.settings import Settings
from service.tensors import TensorInput

__all__ = ["DataPlane", "TensorInput"]

EXTENSIONS = ["binary_tensor_data", "generate", "model_repository"]
"""The protocol extensions served (server metadata, both transports, as Triton lists them)."""
OUTPUT_NAMES = {"matching": "embeddings", "classification": "logits"}
INPUT_NAMES = ("text", "text_pair")
MAX_DIMS = 8
TOKENIZE_INLINE_CHARS = 4096
MAX_DETOKENIZE = 65536
"""Most ids one /detokenize call decodes (a bound on the event loop's work per request)."""
"""Requests with more characters than this are tokenized on a thread: ~1 ms of work inline at most."""
MAX_ROLE_CHARS = 32
UNLOAD_PARAMETERS = ("unload_dependents",)
"""What tritonclient's unload_model may send; no model here has dependents, so it changes nothing."""
CLIENT_GONE = "client_gone"
"""The outcome of a stream whose client left before its end (a disconnect, a cancelled RPC)."""
T = TypeVar("T")


@dataclass
class Result:
    model: str
    version: int
    values: np.ndarray
    tokens: int
    head: MatchingHead | ClassificationHead | TensorHead
    """The head of the version that ran (versions can swap meanwhile)."""

    @property
    def output_name(self) -> str:
        return OUTPUT_NAMES[self.head.task]


class DeltaStream:
    """The engine's deltas for one request, counted once when the stream ends (ok, an error's code,
    or client_gone when closed early). A class rather than an async generator so that ``aclose()``
    closes the engine's generator (freeing the sequence's slot) even when iteration never began."""

    def __init__(self, model: str, source: AsyncGenerator[Delta, None], first: Delta,
                 on_end: Callable[[str], None]) -> None:
        self.model = model
        self._source, self._on_end = source, on_end
        self._pending: Delta | None = first
        self._ended = False

    def __aiter__(self) -> DeltaStream:
        return self

    async def __anext__(self) -> Delta:
        if self._ended:
            raise StopAsyncIteration
        if self._pending is not None:
            delta, self._pending = self._pending, None
        else:
            try:
                delta = await _next_delta(self.model, self._source)
            except ServiceError as exc:
                await self._end(exc.code.value)
                raise
            except asyncio.CancelledError:
                await self._end(CLIENT_GONE)
                raise
        if delta.finish_reason is not None:
            await self._end("ok")
        return delta

    async def aclose(self) -> None:
        """Stop: the engine drops the sequence (a no-op once the stream has ended)."""
        await self._end(CLIENT_GONE)

    async def _end(self, outcome: str) -> None:
        if self._ended:
            return
        self._ended = True
        try:
            await self._source.aclose()
        finally:
            self._on_end(outcome)


@dataclass
class Generation:
    """A started generation: the version running it and its deltas. The first delta is already
    computed, so a full queue, a prompt too long or a deadline before the first token were raised by
    ``DataPlane.generate`` itself, where the transport can still answer a status. Iterate ``deltas``
    to the delta with a finish reason, or ``aclose()``: that frees the sequence's slot at once."""

    model: str
    version: int
    deltas: DeltaStream

    async def aclose(self) -> None:
        await self.deltas.aclose()

    async def collect(self) -> tuple[str, Delta]:
        """The whole text and the last delta (finish reason, usage), for answers not streamed."""
        parts: list[str] = []
        last: Delta | None = None
        try:
            async for delta in self.deltas:
                parts.append(delta.text)
                last = delta
        finally:
            await self.aclose()
        assert last is not None  # the stream ends with the delta that has the finish reason, or raises
        return "".join(parts), last


@dataclass
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]


@dataclass
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = field(default_factory=dict)


class DataPlane:
    def __init__(self, models: ModelManager, settings: Settings, metrics: Metrics) -> None:
        self.models = models
        self.settings = settings
        self.metrics = metrics
        self.draining = False
        self._tokenizers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")

    # -- health, readiness, metadata -----------------------------------------------------------

    def live(self) -> tuple[bool, str]:
        """False while a model version is wedged (runtime calls stuck): restart the process."""
        wedged = self.models.wedged()
        return (False, f"runtime calls stuck in {', '.join(wedged)}") if wedged else (True, "")

    def ready(self) -> bool:
        return not self.draining and self.models.ready()

    def model_ready(self, name: str, version: str | None) -> tuple[bool, str]:
        return self.models.readiness(name, version)

    def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        loaded = self.models.served(name, version)
        state = self.models.models[name]
        failed = {str(k): f.reason for k, f in state.failed.items()}
        if isinstance(loaded, GenerationVersion):  # Triton's generate extension: text_input -> text_output
            limits = loaded.engine.limits
            return ModelMetadata(
                name=name, versions=[str(v) for v in sorted(state.versions)], platform=loaded.runtime.platform,
                inputs=[TensorMetadata("text_input", "BYTES", [1])],
                outputs=[TensorMetadata("text_output", "BYTES", [1])],
                parameters={"task": "generation", "max_length": loaded.head.max_length,
                            "max_model_len": limits.max_model_len, "max_num_seqs": limits.max_num_seqs,
                            "max_waiting": limits.max_waiting, "chat_template": loaded.head.has_chat_template,
                            "failed_versions": failed, **runtime_parameters(loaded.runtime),
                            **loaded.tuning.parameters()})
        extra: dict[str, Any] = {}
        if isinstance(loaded.head, TensorHead):  # one of these tensors, not several
            inputs = [TensorMetadata(n, loaded.head.inputs[n], shape) for n, shape in loaded.head.shapes().items()]
            extra = loaded.head.parameters()
        else:
            inputs = [TensorMetadata(n, "BYTES", [-1]) for n in INPUT_NAMES]
        return ModelMetadata(
            name=name, versions=[str(v) for v in sorted(state.versions)], platform=loaded.runtime.platform,
            inputs=inputs,
            outputs=[TensorMetadata(OUTPUT_NAMES[loaded.config.task], "FP32", [-1, -1])],
            parameters={"task": loaded.config.task, "max_length": loaded.head.max_length,
                        "instances": loaded.pool.instances, "max_texts_per_request": loaded.max_texts,
                        "failed_versions": failed, **extra, **runtime_parameters(loaded.runtime),
                        **loaded.tuning.parameters()})

    # -- the model repository extension (index, load, unload) ----------------------------------

    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        return self.models.index(ready_only)

    async def load_model(self, name: str, parameters: dict[str, Any]) -> None:
        """Load or reload a model from the repository (explicit model control only)."""
        _check_repository_parameters(parameters, ())
        if self.draining:
            raise NotReady("the server is shutting down")
        await self.models.load(name)

    async def unload_model(self, name: str, parameters: dict[str, Any]) -> None:
        _check_repository_parameters(parameters, UNLOAD_PARAMETERS)
        await self.models.unload(name)

    # -- request accounting ------------------------------------------------------------------

    async def _measured(self, endpoint: str, model: str, version: str | None,
                        work: Callable[[], Awaitable[tuple[Result, T]]]) -> tuple[Result, T]:
        """Run one request, counting its outcome and latency under the served labels only."""
        start = time.perf_counter()
        context = current_request()
        context.model, context.version = model, version or ""
        try:
            result, answer = await work()
        except ServiceError as exc:
            self.metrics.observe_request(model, version, endpoint, exc.code.value, start)
            raise
        context.version = str(result.version)
        self.metrics.observe_request(model, result.version, endpoint, "ok", start)
        return result, answer

    # -- limits ------------------------------------------------------------------------------

    def _check_count(self, count: int, field: str, loaded: LoadedVersion) -> None:
        if count == 0:
            raise InvalidInput(f"{field}: give at least one text")
        if count > loaded.max_texts:
            raise InvalidInput(f"{field}: {count} texts; at most {loaded.max_texts} per request for model "
                               f"{loaded.name!r} (SAMPSERVE_MAX_TEXTS_PER_REQUEST, and half the model's queue)")

    def _check_texts(self, texts: list[Any], field: str, truncate: bool) -> list[str]:
        limit = self.settings.max_text_chars
        out = []
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInput(f"{field}[{index}] must be a string")
            if len(text) > limit:
                if not truncate:
                    raise InvalidInput(f"{field}[{index}] is {len(text)} characters; at most {limit} "
                                       "(SAMPSERVE_MAX_TEXT_CHARS). Shorten it or set truncate=true")
                text = text[:limit]
            out.append(text)
        return out

    async def _encode(self, loaded: LoadedVersion, texts: list[str], pairs: list[str] | None, truncate: bool,
                      field: str) -> list[Encoded]:
        head = loaded.head
        assert isinstance(head, TextEncoder)  # forward refuses texts for an image model first
        if truncate:  # cut characters first: the tokens kept come from the start of the text anyway
            cut = loaded.head.max_length * 64
            texts = [t[:cut] for t in texts]
            pairs = [t[:cut] for t in pairs] if pairs is not None else None
        size = sum(map(len, texts)) + (sum(map(len, pairs)) if pairs is not None else 0)
        with tracing.span("tokenize", characters=size):
            if size <= TOKENIZE_INLINE_CHARS:
                return head.encode(texts, pairs, truncate, field)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._tokenizers, head.encode, texts, pairs, truncate, field)

    # -- the forward pass --------------------------------------------------------------------

    async def forward(self, model: str, version: str | int | None, texts: list[Any],
                      pairs: list[Any] | None = None, truncate: bool = False, field: str = "texts",
                      task: str | None = None, token_ids: list[list[int]] | None = None) -> Result:
        """Texts (or rows of the model's token ids) -> the model's raw output rows (embeddings or
        logits), batched with other requests."""
        loaded = self.models.get(model, version)
        if task is not None and loaded.config.task != task:
            raise InvalidInput(f"model {model!r} is a {loaded.config.task} model, not {task}")
        self._check_count(len(texts) if token_ids is None else len(token_ids), field, loaded)
        if token_ids is None:
            texts = self._check_texts(texts, field, truncate)
            if pairs is not None:
                pairs = self._check_texts(pairs, f"{field} pairs", truncate)

        async def items_for(loaded: LoadedVersion) -> list[Encoded]:
            if isinstance(loaded.head, TensorHead):
                raise InvalidInput(f"model {model!r} takes tensors, not texts: send v2 infer with "
                                   f"{loaded.head.usage()}")
            if token_ids is not None:
                return loaded.head.from_ids(token_ids, truncate, field)
            return await self._encode(loaded, texts, pairs, truncate, field)

        return await self._run(model, version, loaded, items_for, field)

    async def _run(self, model: str, version: str | int | None, loaded: LoadedVersion,
                   items_for: Callable[[LoadedVersion], Awaitable[list[Encoded]] | Awaitable[list[TensorItem]]],
                   field: str) -> Result:
        """Queue one request's items (made for the version that runs them) and map the batcher's and
        the runtime's failures to the protocol's errors."""
        try:
            items = await items_for(loaded)
            try:
                values = await loaded.run(items, self.settings.request_timeout_s)
            except BatcherClosed:
                if version not in (None, ""):
                    raise
                # the version was swapped out between lookup and queueing: run on its successor
                loaded = self.models.get(model, None)
                items = await items_for(loaded)
                values = await loaded.run(items, self.settings.request_timeout_s)
        except QueueFull as exc:
            raise Overloaded(f"model {model!r}: {exc}") from None
        except DeadlineExceeded as exc:
            raise DeadlinePassed(f"model {model!r}: {exc}") from None
        except RuntimeHung as exc:
            raise DeadlinePassed(f"model {model!r}: {exc}") from None
        except (ServiceError, asyncio.CancelledError):
            raise
        except UnicodeError:  # a lone surrogate that got past the parser: the client's text, not our fault
            raise InvalidInput(f"{field}: texts must be valid Unicode (no lone surrogates)") from None
        except Exception as exc:
            raise ModelFailure(f"model {model!r} failed: {type(exc).__name__}: {exc}") from None
        return Result(model, loaded.version, values, sum(item.length for item in items), loaded.head)  # type: ignore[arg-type]

    # -- the Open Inference Protocol's infer ---------------------------------------------------

    async def infer(self, model: str, version: str | None, inputs: list[TensorInput], truncate: bool) -> Result:
        """A v2 infer call: its input tensors validated against the contract, then run."""

        async def work() -> tuple[Result, None]:
            loaded = self.models.get(model, version)
            head = loaded.head
            if isinstance(head, TensorHead):
                items = head.items(inputs, loaded.max_texts)

                async def items_for(serving: LoadedVersion) -> list[TensorItem]:
                    if type(serving.head) is not type(head) or serving.head.spec != head.spec:
                        raise InvalidInput(f"model {model!r}: its new version takes other inputs; send again")
                    return items

                return await self._run(model, version, loaded, items_for, "inputs"), None
            texts, pairs = self._text_tensors(inputs, loaded)
            return await self.forward(model, version, texts, pairs, truncate, "inputs.text"), None

        return (await self._measured("infer", model, version, work))[0]

    def _text_tensors(self, inputs: list[TensorInput], loaded: LoadedVersion) -> tuple[list[Any], list[Any] | None]:
        if not inputs:
            raise InvalidInput("inputs: give a BYTES tensor named 'text'")
        values: dict[str, list[Any]] = {}
        for tensor in inputs:
            where = f"inputs.{tensor.name[:64]}"
            if tensor.name not in INPUT_NAMES:
                raise InvalidInput(f"inputs: unknown tensor {tensor.name[:64]!r}; this model takes 'text' "
                                   "(and 'text_pair')")
            if tensor.name in values:
                raise InvalidInput(f"{where}: given twice")
            if tensor.datatype != "BYTES":
                raise InvalidInput(f"{where}: datatype must be BYTES, got {tensor.datatype[:32]}")
            if not tensor.shape or len(tensor.shape) > MAX_DIMS or any(d < 0 for d in tensor.shape):
                raise InvalidInput(f"{where}: shape {list(tensor.shape)[:MAX_DIMS + 1]} must have 1 to {MAX_DIMS} "
                                   "non-negative dimensions, e.g. [n] or [n, 1]")
            declared = math.prod(tensor.shape)
            self._check_count(declared, where, loaded)
            values[tensor.name] = tensor.decode(declared)
        if "text" not in values:
            raise InvalidInput("inputs: the BYTES tensor 'text' is missing")
        pairs = values.get("text_pair")
        if pairs is not None and len(pairs) != len(values["text"]):
            raise InvalidInput("inputs: 'text_pair' must have as many elements as 'text'")
        return values["text"], pairs

    # -- task endpoints ------------------------------------------------------------------------

    async def embed(self, model: str, texts: list[Any], truncate: bool = False, field: str = "input",
                    token_ids: list[list[int]] | None = None, dimensions: int | None = None) -> Result:
        """Unit-length embeddings; ``dimensions``: the first that many components, normalized again
        (what Matryoshka-trained models are made for; any model accepts it)."""
        async def work() -> tuple[Result, None]:
            if dimensions is not None:  # checked before any work is queued
                width = self.models.get(model, None).width
                if not 1 <= dimensions <= width:
                    raise InvalidInput(f"dimensions: {dimensions}; model {model!r} gives 1 to {width}")
            result = await self.forward(model, None, texts, None, truncate, field, task="matching",
                                        token_ids=token_ids)
            values = result.values if dimensions is None else result.values[:, :dimensions]
            if dimensions is not None:
                values = values / np.linalg.norm(values, axis=-1, keepdims=True).clip(1e-12)
            result.values = result.head.normalize(values)  # type: ignore[union-attr]
            return result, None

        return (await self._measured("embeddings", model, None, work))[0]

    async def tokenize(self, model: str, text: str,
                       add_special_tokens: bool = True) -> tuple[list[int], list[str], int]:
        """The ids (and token strings) the model sees for ``text``, its prefix included (an e5 model's
        "query: "), and the most tokens it takes: the ids /v1/embeddings accepts as input."""
        loaded = self.models.served(model, None)
        head = loaded.head
        if isinstance(head, TensorHead):
            raise InvalidInput(f"model {model!r} takes tensors: it has no tokenizer")
        if len(text) > self.settings.max_text_chars:
            raise InvalidInput(f"prompt is {len(text)} characters; at most {self.settings.max_text_chars} "
                               "(SAMPSERVE_MAX_TEXT_CHARS)")
        prefix = getattr(head, "text_prefix", "")

        def encode() -> tuple[list[int], list[str]]:
            encoding = head.tokenizer.encode(prefix + text, add_special_tokens=add_special_tokens)
            return list(encoding.ids), list(encoding.tokens)

        try:
            ids, tokens = await asyncio.get_running_loop().run_in_executor(self._tokenizers, encode)
        except UnicodeError:
            raise InvalidInput("prompt: must be valid Unicode (no lone surrogates)") from None
        return ids, tokens, head.max_length

    def detokenize(self, model: str, tokens: list[int]) -> str:
        """The text of the model's token ids (special tokens kept, so a /tokenize round trip shows them)."""
        head = self.models.served(model, None).head
        if isinstance(head, TensorHead):
            raise InvalidInput(f"model {model!r} takes tensors: it has no tokenizer")
        vocab = head.tokenizer.get_vocab_size(with_added_tokens=True)
        if len(tokens) > MAX_DETOKENIZE:
            raise InvalidInput(f"tokens: {len(tokens)} ids; at most {MAX_DETOKENIZE}")
        bad = next((t for t in tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidInput(f"tokens: id {bad} is outside this model's vocabulary (0..{vocab - 1})")
        return head.tokenizer.decode(tokens, skip_special_tokens=False)

    async def similarity(self, model: str, pairs: list[Any], truncate: bool = False) -> tuple[Result, list[float]]:
        async def work() -> tuple[Result, list[float]]:
            for index, pair in enumerate(pairs[: self.settings.max_texts_per_request + 1]):
                if not isinstance(pair, list | tuple) or len(pair) != 2:
                    raise InvalidInput(f"pairs[{index}] must be two texts")
            flat = [p[0] for p in pairs] + [p[1] for p in pairs]
            result = await self.forward(model, None, flat, None, truncate, "pairs", task="matching")
            n = len(pairs)
            scores = result.head.similarity(result.values[:n], result.values[n:])  # type: ignore[union-attr]
            return result, [float(s) for s in scores]

        return await self._measured("similarity", model, None, work)

    async def rerank(self, model: str, query: Any, documents: list[Any], truncate: bool = False
                     ) -> tuple[Result, list[tuple[int, float]]]:
        async def work() -> tuple[Result, list[tuple[int, float]]]:
            if not documents:
                raise InvalidInput("documents: give at least one text")
            result = await self.forward(model, None, [query, *documents], None, truncate, "documents",
                                        task="matching")
            return result, result.head.rerank(result.values[0], result.values[1:])  # type: ignore[union-attr]

        return await self._measured("rerank", model, None, work)

    async def classify(self, model: str, texts: list[Any], pairs: list[Any] | None, top_k: int,
                       truncate: bool = False) -> tuple[Result, list[list[tuple[str, float]]]]:
        async def work() -> tuple[Result, list[list[tuple[str, float]]]]:
            if pairs is not None and len(pairs) != len(texts):
                raise InvalidInput(f"text_pairs: {len(pairs)} pair texts for {len(texts)} texts")
            result = await self.forward(model, None, texts, pairs, truncate, "texts", task="classification")
            return result, result.head.top_k(result.values, top_k)  # type: ignore[union-attr]

        return await self._measured("classify", model, None, work)

    # -- generation ----------------------------------------------------------------------------

    async def generate(self, model: str, version: str | int | None, *, params: SamplingParams,
                       prompt: str | None = None, messages: Sequence[dict[str, Any]] | None = None,
                       endpoint: str = "generate", fill_max_tokens: bool = False,
                       timeout_s: float | None = None) -> Generation:
        """Start generating from ``prompt`` or chat ``messages`` (exactly one); the stream is counted
        under ``endpoint`` when it ends (ok, an error's code, or client_gone). ``fill_max_tokens``:
        the client gave no max_tokens (OpenAI chat), so it is what the context leaves after the prompt."""
        start = time.perf_counter()
        context = current_request()
        context.model, context.version = model, "" if version is None else str(version)
        stream: AsyncGenerator[Delta, None] | None = None
        counted: str | int | None = version
        try:
            loaded = self.models.generator(model, version)  # InvalidInput naming the task of any other model
            counted = loaded.version
            ids = await self._prompt_ids(loaded, prompt, messages)
            if fill_max_tokens:
                room = loaded.engine.limits.max_model_len - len(ids)
                params = params.model_copy(update={"max_tokens": max(1, room)})
            timeout = self.settings.request_timeout_s if timeout_s is None else timeout_s
            stream = loaded.engine.generate(ids, params, timeout)
            first = await _next_delta(model, stream)
        except BaseException as exc:
            if stream is not None:
                await stream.aclose()
            outcome = (exc.code.value if isinstance(exc, ServiceError) else
                       CLIENT_GONE if isinstance(exc, asyncio.CancelledError) else Code.INTERNAL.value)
            self.metrics.observe_request(model, counted, endpoint, outcome, start)
            raise
        context.version = str(loaded.version)
        number = loaded.version

        def ended(outcome: str) -> None:
            self.metrics.observe_request(model, number, endpoint, outcome, start)

        return Generation(model, number, DeltaStream(model, stream, first, ended))

    async def _prompt_ids(self, loaded: GenerationVersion, prompt: str | None,
                          messages: Sequence[dict[str, Any]] | None) -> list[int]:
        """The prompt's token ids; sizes checked before the chat template renders or the tokenizer runs."""
        limit = self.settings.max_text_chars
        if (prompt is None) == (messages is None):
            raise InvalidInput("give either a prompt or messages")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidInput("prompt must be a string")
            if len(prompt) > limit:
                raise InvalidInput(f"prompt is {len(prompt)} characters; at most {limit} (SAMPSERVE_MAX_TEXT_CHARS)")
            size = len(prompt)
        else:
            assert messages is not None
            if not messages:
                raise InvalidInput("messages: give at least one message")
            most = self.settings.max_texts_per_request
            if len(messages) > most:
                raise InvalidInput(f"messages: {len(messages)} messages; at most {most} "
                                   "(SAMPSERVE_MAX_TEXTS_PER_REQUEST)")
            size = 0
            for index, message in enumerate(messages):
                role, content = message.get("role"), message.get("content")
                if not isinstance(role, str) or not 0 < len(role) <= MAX_ROLE_CHARS:
                    raise InvalidInput(f"messages[{index}].role must be a string of 1 to {MAX_ROLE_CHARS} characters")
                if not isinstance(content, str):
                    raise InvalidInput(f"messages[{index}].content must be a string")
                size += len(content)
            if size > limit:
                raise InvalidInput(f"messages hold {size} characters; at most {limit} in all "
                                   "(SAMPSERVE_MAX_TEXT_CHARS)")
        head = loaded.head

        def encode() -> list[int]:
            if prompt is not None:
                return head.encode_prompt(prompt)
            return head.encode_prompt(head.render_chat([dict(m) for m in messages or ()]), field="messages")

        with tracing.span("tokenize", characters=size):
            try:
                if size <= TOKENIZE_INLINE_CHARS:
                    return encode()
                return await asyncio.get_running_loop().run_in_executor(self._tokenizers, encode)
            except UnicodeError:
                raise InvalidInput("prompt: text must be valid Unicode (no lone surrogates)") from None

    def close(self) -> None:
        self._tokenizers.shutdown(wait=False, cancel_futures=True)


def runtime_parameters(info: RuntimeInfo) -> dict[str, str]:
    """What runs a version, as model metadata parameters: ``runtime``, ``device`` and the engine's details
    (onnxruntime's ``providers``; the PyTorch plan's ``dtype``, ``int8_units``, ``cuda_graphs``)."""
    return {"runtime": info.runtime, "device": info.device, **info.detail}


def _check_repository_parameters(parameters: dict[str, Any], allowed: Sequence[str]) -> None:
    """Triton's load takes a model config and files to load instead of the repository's; here a model is
    only ever what was published (manifest checked), so those overrides are refused, by name."""
    if "config" in parameters or any(key.startswith("file:") for key in parameters):
        raise InvalidInput("parameters: config and file: overrides are not supported; publish a version to the "
                           "repository (sampserve quantize) and load the model by name")
    unknown = sorted(key for key in parameters if key not in allowed)
    if unknown:
        raise InvalidInput(f"parameters: unknown {', '.join(shorten(k) for k in unknown[:4])}; "
                           f"allowed: {list(allowed)}")


async def _next_delta(model: str, stream: AsyncIterator[Delta]) -> Delta:
    """The engine's next delta; a stream that ends without a finish reason, or any exception that is
    not the engine's ``ServiceError`` (a bug, a runtime failure), is the model's failure: a 500."""
    try:
        return await anext(stream)
    except StopAsyncIteration:
        raise ModelFailure(f"model {model!r}: the stream ended without a finish reason") from None
    except (ServiceError, asyncio.CancelledError):
        raise
    except Exception as exc:
        raise ModelFailure(f"model {model!r} failed: {type(exc).__name__}: {exc}") from None
