"""Autoregressive generation with the key/value cache, for causal LMs (GPT-2, Llama) and seq2seq (T5).

Each step feeds only the newest token and reuses the cached keys/values of everything before it,
so a step costs O(length) instead of re-running the whole prefix. Prompts of different lengths batch
left-padded when the model's positions are rotary: each row's positions count its own tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from training.model import Model


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # nucleus: sample from the fewest tokens holding this much probability
    seed: int = 0
    stop_ids: tuple[int, ...] = ()  # end a sequence besides config.eos_token_id (chat end-of-turn ids)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches top_p (at least one token)."""
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = torch.softmax(ordered.float(), -1)
    drop = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _pick(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) next token ids."""
    if settings.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / settings.temperature
    if settings.top_k:
        kth = torch.topk(logits, min(settings.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        logits = top_p_filter(logits, settings.top_p)
    return torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator).squeeze(-1)


def _check_padding(model: Model, attention_mask: torch.Tensor) -> None:
    """Causal LMs batch prompts left-padded, and only with rotary positions: those come from the
    mask, while a learned absolute position table would see each row shifted by its padding."""
    if bool(attention_mask.all()):
        return
    if model.config.encoder.position != "rope":
        raise ValueError("causal-LM generation with learned positions takes prompts of equal length: "
                         "generate one at a time")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("pad prompts on the left: each row's last token is where generation continues")


@torch.no_grad()
def stream(
    model: Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    settings: GenerationSettings = GenerationSettings(),
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B,) one step at a time; stops at max_new_tokens or when every
    sequence has produced a stop token (eos or settings.stop_ids). A finished row yields pad ids."""
    config = model.config
    if config.target.name not in ("lm", "seq2seq_lm"):
        raise ValueError(f"target {config.target.name!r} does not generate text; use an lm or seq2seq_lm model")
    model.eval()
    generator = torch.Generator(device=input_ids.device).manual_seed(settings.seed)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch = input_ids.shape[0]
    if "pos" in config.embedding.parts or config.encoder.position == "rope":
        limit = config.embedding.max_position
        length = settings.max_new_tokens + (0 if config.is_encoder_decoder else input_ids.shape[1])
        if length > limit:
            raise ValueError(f"prompt + max_new_tokens = {length} exceeds the model's max_position {limit}")
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    stops = [*settings.stop_ids, *([] if config.eos_token_id is None else [config.eos_token_id])]
    stop_ids = torch.tensor(sorted(set(stops)), dtype=torch.long, device=input_ids.device)

    if config.is_encoder_decoder:
        memory = model.encode(input_ids, attention_mask).hidden
        start = config.decoder_start_token_id or 0
        step_ids = torch.full((batch, 1), start, dtype=torch.long, device=input_ids.device)
        out = model.decode(step_ids, memory, attention_mask, use_cache=True)
        decoder_mask = torch.ones_like(step_ids)
    else:
        _check_padding(model, attention_mask)
        out = model.encode(input_ids, attention_mask, use_cache=True)
        decoder_mask = attention_mask
    for _ in range(settings.max_new_tokens):
        logits = model.target(out.hidden[:, -1:], None)[:, -1]
        token = _pick(logits, settings, generator)
        if stops:
            token = torch.where(finished, torch.full_like(token, config.pad_token_id), token)
        yield token
        if stops:
            finished |= torch.isin(token, stop_ids)
            if bool(finished.all()):
                return
        decoder_mask = torch.cat([decoder_mask, torch.ones_like(token[:, None])], dim=1)
        if config.is_encoder_decoder:
            out = model.decode(token[:, None], None, attention_mask, decoder_mask, past=out.cache, use_cache=True)
        else:
            out = model.encode(token[:, None], decoder_mask, past=out.cache, use_cache=True)


def generate(
    model: Model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    settings: GenerationSettings = GenerationSettings(),
) -> torch.Tensor:
    """All new tokens at once: (B, new_length)."""
    steps = list(stream(model, input_ids, attention_mask, settings))
    if not steps:
        return torch.empty(input_ids.shape[0], 0, dtype=torch.long)
    return torch.stack(steps, dim=1)
