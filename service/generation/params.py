"""What a generation request asks for, and what the engine streams back: one schema for every API.

The OpenAI routes, the v2 generate routes and gRPC all build a ``SamplingParams`` (validation names
the field on error: a 400 / INVALID_ARGUMENT before any work) and consume ``Delta``s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.errors import InvalidInput

FinishReason = Literal["stop", "length"]
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256


class SamplingParams(BaseModel):
    """Sampling and stopping. temperature 0 is greedy (the default of the v2 extension; the OpenAI
    routes default to 1 as OpenAI does)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1)
    """New tokens at most; the prompt plus this must fit the model's max_model_len."""
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    """0: no top-k cut."""
    seed: int | None = Field(None, ge=0, lt=2**63)
    """Makes sampling reproducible for this request, whatever else shares its batch."""
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    """CTRL-style: logits of tokens already in prompt or output are divided (or, negative, multiplied)."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends before the first occurrence; the string is not returned."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks)."""

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: object) -> object:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        return value

    @field_validator("stop")
    @classmethod
    def _stop_bounds(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in value):
            raise ValueError(f"each stop string has 1 to {MAX_STOP_CHARS} characters")
        return value

    @classmethod
    def parse(cls, values: dict[str, object], prefix: str = "") -> SamplingParams:
        """Validate client values; a bad one raises InvalidInput naming the field (``prefix`` + name)."""
        try:
            return cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            first = e.errors()[0]
            name = ".".join(str(p) for p in first["loc"]) or "parameters"
            raise InvalidInput(f"{prefix}{name}: {first['msg']}") from None


@dataclass
class Delta:
    """One step of a stream: the text that became final since the last delta (may be empty while
    a multi-byte character or a possible stop string is held back), the new token ids, and at the
    end the finish reason. Counts are running totals, so the last delta carries the usage."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
