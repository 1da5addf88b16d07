"""Generation: the version's tokenizer, its chat template and its stop ids (the engine does the rest).

Chat templates are Jinja written by whoever published the model, so they render in Jinja's
immutable sandbox (no attribute access to Python internals, no mutation of what is passed in), as
Hugging Face's ``apply_chat_template`` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from service.errors import InvalidInput
from service.repository import TOKENIZER_FILE, GenerationMeta, HeadMeta, load_head

ROLES = ("system", "user", "assistant", "tool", "developer")


class _RaisedByTemplate(Exception):
    """A template's own ``raise_exception(...)``: its message is about the messages, so a 400."""


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    """Hugging Face's tojson: unicode kept as is (Jinja's escapes it for HTML)."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


class GenerationHead:
    task = "generation"

    def __init__(self, version_dir: Path) -> None:
        self.meta: HeadMeta = load_head(version_dir)
        if self.meta.generation is None:
            raise ValueError(f"{Path(version_dir) / 'head.json'}: a generation version needs a 'generation' block")
        self.generation: GenerationMeta = self.meta.generation
        self.max_length: int = self.meta.max_length
        """The most tokens a sequence holds, prompt and output together (head.json's max_length)."""
        self.pad_id: int = self.meta.pad_token_id
        self.stop_token_ids: list[int] = list(self.generation.stop_token_ids)
        self.tokenizer = Tokenizer.from_file(str(Path(version_dir) / TOKENIZER_FILE))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._template = None
        if self.generation.chat_template is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_exception
            env.filters["tojson"] = _tojson
            try:
                self._template = env.from_string(self.generation.chat_template)
            except TemplateError as e:  # a broken template fails the load, not every request
                raise ValueError(f"head.json: generation.chat_template does not compile: {e}") from e

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode_prompt(self, text: str, add_special_tokens: bool = False, field: str = "prompt") -> list[int]:
        """Token ids of a prompt. No BOS/EOS is added unless asked: a rendered chat template writes
        its own special tokens (as text, which the tokenizer maps to their ids)."""
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if len(ids) >= self.max_length:
            raise InvalidInput(f"{field} is {len(ids)} tokens; the model holds at most {self.max_length} "
                               "tokens, prompt and output together")
        return ids

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def render_chat(self, messages: list[dict[str, Any]], field: str = "messages") -> str:
        """The prompt text for a conversation, with the generation prompt of the assistant's turn."""
        if self._template is None:
            raise InvalidInput(f"{field}: this model has no chat template; send a plain prompt instead")
        clean = [_check_message(message, f"{field}[{i}]") for i, message in enumerate(_check_list(messages, field))]
        try:
            return self._template.render(messages=clean, add_generation_prompt=True,
                                         bos_token=self.generation.bos_token or "",
                                         eos_token=self.generation.eos_token or "")
        except _RaisedByTemplate as e:
            raise InvalidInput(f"{field}: {e}") from None
        except TemplateError as e:  # includes the sandbox refusing an unsafe operation
            raise InvalidInput(f"{field}: the chat template cannot render these messages: {e}") from None


def _check_list(messages: object, field: str) -> list[Any]:
    if not isinstance(messages, list) or not messages:
        raise InvalidInput(f"{field}: a non-empty list of messages is required")
    return messages


def _check_message(message: object, field: str) -> dict[str, Any]:
    """A message as templates expect it: a known role, and content as a string (OpenAI's text
    parts are joined; other part types are refused)."""
    if not isinstance(message, dict):
        raise InvalidInput(f"{field}: a message is an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise InvalidInput(f"{field}.role: must be one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidInput(f"{field}.content[{j}]: only text parts are supported "
                                   '({"type": "text", "text": "..."})')
            texts.append(part["text"])
        content = "".join(texts)
    elif content is None and role == "assistant":
        content = ""
    elif not isinstance(content, str):
        raise InvalidInput(f"{field}.content: must be a string or a list of text parts")
    clean: dict[str, Any] = {"role": role, "content": content}
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise InvalidInput(f"{field}.name: must be a string")
        clean["name"] = name
    return clean
