"""The generation head: prompts without added special tokens, chat templates rendered in Jinja's
sandbox, and messages checked with the field named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.errors import InvalidInput
from service.heads import HEADS, GenerationHead
from service.repository import HEAD_FILE
from tests.service.generation_repo import CONTEXT
from tests.tiny_llama import STOP_IDS


def _with_template(version_dir: Path, tmp_path: Path, template: str | None) -> Path:
    out = tmp_path / "version"
    shutil.copytree(version_dir, out)
    head = json.loads((out / HEAD_FILE).read_text())
    head["generation"]["chat_template"] = template
    (out / HEAD_FILE).write_text(json.dumps(head))
    return out


def test_registered_with_its_limits(version_dir: Path) -> None:
    head = HEADS["generation"](version_dir)
    assert isinstance(head, GenerationHead)
    assert head.max_length == CONTEXT and head.stop_token_ids == STOP_IDS and head.has_chat_template


def test_chat_renders_with_the_generation_prompt_and_encodes_special_tokens(version_dir: Path) -> None:
    head = GenerationHead(version_dir)
    text = head.render_chat([{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": [{"type": "text", "text": "Capital "},
                                                          {"type": "text", "text": "of France?"}]}])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = head.encode_prompt(text)
    assert ids[0] == head.tokenizer.token_to_id("<|im_start|>")  # the template's own tokens, nothing added
    assert head.decode(ids) == "system\nBe brief.\nuser\nCapital of France?\nassistant\n"


@pytest.mark.parametrize(("messages", "field"), [
    ([], "messages"),
    ("hello", "messages"),
    (["hello"], r"messages\[0\]"),
    ([{"role": "wizard", "content": "x"}], r"messages\[0\]\.role"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], r"messages\[1\]\.content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], r"messages\[0\]\.content\[0\]"),
])
def test_bad_messages_name_the_field(version_dir: Path, messages: object, field: str) -> None:
    with pytest.raises(InvalidInput, match=rf"^{field}"):
        GenerationHead(version_dir).render_chat(messages)  # type: ignore[arg-type]


def test_a_templates_own_error_is_the_clients(version_dir: Path, tmp_path: Path) -> None:
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
              "{{ m['content'] }}{% endfor %}")
    head = GenerationHead(_with_template(version_dir, tmp_path, strict))
    assert head.render_chat([{"role": "user", "content": "hi"}]) == "hi"
    with pytest.raises(InvalidInput, match="messages: Conversation roles must alternate"):
        head.render_chat([{"role": "assistant", "content": "hi"}])


def test_the_sandbox_refuses_unsafe_templates(version_dir: Path, tmp_path: Path) -> None:
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    head = GenerationHead(_with_template(version_dir, tmp_path, escape))
    with pytest.raises(InvalidInput, match="cannot render"):
        head.render_chat([{"role": "user", "content": "hi"}])
    mutate = "{{ messages.append(1) }}"
    with pytest.raises(InvalidInput, match="cannot render"):
        GenerationHead(_with_template(version_dir, tmp_path / "m", mutate)).render_chat(
            [{"role": "user", "content": "hi"}])


def test_no_template_or_a_broken_one(version_dir: Path, tmp_path: Path) -> None:
    head = GenerationHead(_with_template(version_dir, tmp_path / "none", None))
    with pytest.raises(InvalidInput, match="no chat template"):
        head.render_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="does not compile"):
        GenerationHead(_with_template(version_dir, tmp_path / "broken", "{% for %}"))


def test_a_prompt_that_fills_the_model_is_refused(version_dir: Path) -> None:
    head = GenerationHead(version_dir)
    with pytest.raises(InvalidInput, match=rf"prompt is \d+ tokens; the model holds at most {CONTEXT}"):
        head.encode_prompt("Paris " * CONTEXT)
