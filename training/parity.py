"""Parity of our imported model against the reference implementation it came from.

For a sentence-transformers folder the reference is sentence-transformers itself (mean pooling +
L2 norm as it computes them); for other HF checkpoints it is transformers' own model class.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.checkpoint import Checkpoint
from training.tokenization import configured, encode

# Short and long (past 256 tokens, so truncated), non-ASCII, emoji, mixed lengths in one batch.
PARITY_SENTENCES: list[str] = [
    "Hello world.",
    "A man is playing a guitar on stage.",
    "The quick brown fox jumps over the lazy dog.",
    "Ça va très bien, merci beaucoup !",
    "Der Bundesrat hat die Vorlage gestern verabschiedet.",
    "El niño comió una manzana roja en el parque.",
    "Привет, как дела? Всё хорошо.",
    "東京は日本の首都です。",
    "안녕하세요, 만나서 반갑습니다.",
    "مرحبا بالعالم",
    "I love pizza 🍕🍕 and tacos 🌮!",
    "🚀🚀🚀",
    "Emoji with skin tones 👍🏽 and flags 🇫🇷 and families 👨‍👩‍👧.",
    "a",
    "",
    "   leading and trailing spaces   ",
    "UPPER CASE AND lower case AND MiXeD cAsE",
    "Numbers 3.14159, 2,718 and -42 % of $1,000.00",
    "C'est l'été ; naïve café déjà vu — coöperate.",
    "Tabs\tand\nnewlines\r\nin text",
    "URL https://example.com/path?q=1&r=2 and e-mail someone@example.org",
    "function foo(x) { return x * 2; } // code",
    "The patient was administered 5 mg of the drug intravenously twice daily.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "Two sentences here. And a second one that is a bit longer than the first one.",
    " ".join(["long"] * 300),
    " ".join(f"token{i}" for i in range(400)),
    "This is a long paragraph. " * 60,
    "Mixed scripts: English, Ελληνικά, עברית, हिन्दी, ไทย in one line.",
    "Repeated punctuation!!! ??? ... ,,, ;;;",
    "Zero\u200bwidth\u200bspaces and non\u00a0breaking\u00a0spaces",
]


def sentence_transformers_diff(checkpoint: Checkpoint, hf_dir: Path, sentences: list[str]) -> float:
    """Max abs difference between our embeddings and sentence-transformers' for ``sentences``."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(hf_dir), device="cpu")
    expected = reference.encode(sentences, convert_to_tensor=True, batch_size=len(sentences))
    tokenizer = configured(checkpoint.tokenizer, checkpoint.head.max_length, checkpoint.config.pad_token_id)
    batch = encode(tokenizer, sentences)
    with torch.no_grad():
        ours = checkpoint.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return float((ours - expected.to(ours.dtype)).abs().max())


def tensor_batch(checkpoint: Checkpoint, rows: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of an image or audio model, in its processor's range (pixels in [-1, 1], audio
    normalized): what parity compares when there are no sentences to tokenize."""
    from training.model import MODEL_INPUTS

    generator = torch.Generator().manual_seed(seed)
    emb = checkpoint.config.embedding
    if checkpoint.config.modality == "image":
        shape = (rows, emb.num_channels, emb.image_size, emb.image_size)
        return {MODEL_INPUTS["image"]: torch.rand(shape, generator=generator) * 2 - 1}
    return {MODEL_INPUTS["audio"]: torch.randn(rows, emb.max_samples, generator=generator)}


def transformers_diff(checkpoint: Checkpoint, hf_dir: Path, batch: dict[str, torch.Tensor]) -> float:
    """Max abs difference between our served output and transformers' own class on ``batch``.

    For heads that return logits the logits are compared; for bare encoders (pooled embeddings)
    the pooled, normalized last hidden state is computed from transformers' output the same way."""
    import transformers

    hf_config = transformers.AutoConfig.from_pretrained(str(hf_dir))
    arch = hf_config.architectures[0]
    reference = getattr(transformers, arch).from_pretrained(str(hf_dir)).eval()
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids",
                                                       "decoder_input_ids", "decoder_attention_mask",
                                                       "pixel_values", "input_values")}
    with torch.no_grad():
        ours = checkpoint.model(**kwargs)
        out = reference(**kwargs)
    if hasattr(out, "logits"):
        expected = out.logits
    else:
        hidden = out.last_hidden_state
        mask = batch.get("attention_mask", torch.ones(hidden.shape[:2], dtype=torch.long))
        expected = checkpoint.model.target(hidden, mask)
    return float((ours - expected).abs().max())
