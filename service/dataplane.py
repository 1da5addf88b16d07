"""The one core both transports call: validate, tokenize, batch, run, post-process.

REST and gRPC handlers convert their messages to these calls and map ``ServiceError``s to status
codes by one table each (``service.errors``); they hold no task logic of their own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from service.batching import BatcherClosed, DeadlineExceeded, QueueFull
from service.errors import DeadlinePassed, InvalidInput, ModelFailure, Overloaded, ServiceError
from service.heads import ClassificationHead, MatchingHead
from service.models import LoadedVersion, ModelManager
from service.settings import Settings


@dataclass
class Result:
    model: str
    version: int
    values: np.ndarray
    tokens: int
    head: MatchingHead | ClassificationHead  # of the version that ran (versions can swap meanwhile)


class DataPlane:
    def __init__(self, models: ModelManager, settings: Settings) -> None:
        self.models = models
        self.settings = settings

    def check_texts(self, texts: list[str], field: str) -> None:
        if not texts:
            raise InvalidInput(f"{field}: give at least one text")
        if len(texts) > self.settings.max_texts_per_request:
            limit = self.settings.max_texts_per_request
            raise InvalidInput(f"{field}: {len(texts)} texts; at most {limit} per request")
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise InvalidInput(f"{field}[{index}] must be a string")

    def head_of(self, loaded: LoadedVersion, task: str) -> MatchingHead | ClassificationHead:
        if loaded.config.task != task:
            raise InvalidInput(f"model {loaded.name!r} is a {loaded.config.task} model, not {task}")
        return loaded.head  # type: ignore[return-value]

    async def forward(self, model: str, version: str | int | None, texts: list[str], pairs: list[str] | None = None,
                      truncate: bool = False, field: str = "texts", task: str | None = None) -> Result:
        """Texts -> the model's raw output rows (embeddings or logits), batched with other requests."""
        self.check_texts(texts, field)
        loaded = self.models.get(model, version)
        if task is not None:
            self.head_of(loaded, task)
        items = loaded.head.encode(texts, pairs, truncate, field)
        try:
            try:
                values = await loaded.run(items, self.settings.request_timeout_s)
            except BatcherClosed:
                if version not in (None, ""):
                    raise
                # the version was swapped out between lookup and queueing: run on its successor
                loaded = self.models.get(model, None)
                values = await loaded.run(loaded.head.encode(texts, pairs, truncate, field),
                                          self.settings.request_timeout_s)
        except QueueFull as exc:
            raise Overloaded(f"model {model!r}: {exc}") from None
        except DeadlineExceeded as exc:
            raise DeadlinePassed(f"model {model!r}: {exc}") from None
        except (ServiceError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise ModelFailure(f"model {model!r} failed: {type(exc).__name__}: {exc}") from None
        return Result(model, loaded.version, values, sum(item.length for item in items), loaded.head)  # type: ignore[arg-type]

    async def embed(self, model: str, texts: list[str], truncate: bool = False, field: str = "input") -> Result:
        result = await self.forward(model, None, texts, None, truncate, field, task="matching")
        result.values = result.head.normalize(result.values)  # type: ignore[union-attr]
        return result

    async def similarity(self, model: str, pairs: list[list[str]], truncate: bool = False
                         ) -> tuple[Result, list[float]]:
        for index, pair in enumerate(pairs):
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise InvalidInput(f"pairs[{index}] must be two texts")
        flat = [p[0] for p in pairs] + [p[1] for p in pairs]
        result = await self.forward(model, None, flat, None, truncate, "pairs", task="matching")
        n = len(pairs)
        scores = result.head.similarity(result.values[:n], result.values[n:])  # type: ignore[union-attr]
        return result, [float(s) for s in scores]

    async def rerank(self, model: str, query: str, documents: list[str], truncate: bool = False
                     ) -> tuple[Result, list[tuple[int, float]]]:
        self.check_texts(documents, "documents")
        result = await self.forward(model, None, [query, *documents], None, truncate, "documents", task="matching")
        return result, result.head.rerank(result.values[0], result.values[1:])  # type: ignore[union-attr]

    async def classify(self, model: str, texts: list[str], pairs: list[str] | None, top_k: int,
                       truncate: bool = False) -> tuple[Result, list[list[tuple[str, float]]]]:
        result = await self.forward(model, None, texts, pairs, truncate, "texts", task="classification")
        return result, result.head.top_k(result.values, top_k)  # type: ignore[union-attr]
