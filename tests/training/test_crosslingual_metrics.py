"""Cross-lingual metrics on constructed arrays, and the embedding encoder and its cache on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.training.conftest import shrink
from training.crosslingual import embeddings
from training.crosslingual.metrics import (
    bidirectional_retrieval,
    rankdata,
    report,
    retrieval_accuracy,
    sample_pairs,
    spearman,
    sts_proxy,
)


def _random(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_identity_retrieves_everything():
    a = _random(50)
    assert retrieval_accuracy(a, a) == 1.0
    assert retrieval_accuracy(a, 3 * a) == 1.0  # cosine: scale does not matter
    assert bidirectional_retrieval(a, a + 1e-4 * _random(50, seed=1)) == 1.0


def test_permutation_gives_its_fixed_points():
    a = _random(10)
    perm = np.array([0, 1, 2, 3, 5, 4, 7, 6, 9, 8])  # 4 fixed points of 10
    assert retrieval_accuracy(a, a[perm]) == pytest.approx(0.4)
    assert bidirectional_retrieval(a, a[perm]) == pytest.approx(0.4)
    # x row 1 is a copy of en row 0: it retrieves row 0, every other x row its own
    x = a.copy()
    x[1] = a[0]
    assert retrieval_accuracy(x, a) == pytest.approx(0.9)  # x row 1 retrieves en row 0
    with pytest.raises(ValueError):
        retrieval_accuracy(a, a[:5])


def test_spearman_and_ranks():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(200)
    assert spearman(v, np.exp(3 * v) + 7) == pytest.approx(1.0)  # monotone transform
    assert spearman(v, -v ** 3) == pytest.approx(-1.0)
    np.testing.assert_allclose(rankdata(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    assert np.isnan(spearman(v, np.ones_like(v)))


def test_sts_proxy():
    teacher = _random(40, 8)
    student_en = np.concatenate([teacher, _random(40, 4, seed=2) * 0], axis=1)  # same geometry, wider
    assert sts_proxy(student_en, student_en, teacher) == pytest.approx(1.0)
    pairs = sample_pairs(40, 500, seed=1)
    assert pairs.shape == (500, 2) and (pairs[:, 0] != pairs[:, 1]).all() and pairs.max() < 40
    np.testing.assert_array_equal(pairs, sample_pairs(40, 500, seed=1))
    noise = sts_proxy(_random(40, seed=5), _random(40, seed=6), teacher, pairs)
    assert abs(noise) < 0.2


def test_report():
    a, b = _random(20), _random(30, seed=3)
    perm = np.roll(np.arange(20), 1)  # no fixed point
    out = report({"de": (a, a), "fr": (a, a[perm])}, teacher_en={"de": a})
    assert out["languages"]["de"] == {"n": 20, "en->x": 1.0, "x->en": 1.0, "acc@1": 1.0,
                                      "sts_proxy": pytest.approx(1.0)}
    assert out["languages"]["fr"]["acc@1"] == 0.0 and "sts_proxy" not in out["languages"]["fr"]
    assert out["mean"] == {"acc@1": 0.5, "sts_proxy": pytest.approx(1.0)}
    json.dumps(out)
    assert report({"ja": (b, b)})["mean"] == {"acc@1": 1.0}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer

    from training.checkpoint import HeadInfo, load_checkpoint, save_checkpoint
    from training.jobs import bundled_minilm_dir
    from training.model import build_model

    torch.manual_seed(0)
    config = shrink("tiny-bert", target={"name": "contrastive", "pooling": "mean", "normalize": True},
                    vocab_size=30522)  # the MiniLM tokenizer's vocabulary
    out = tmp_path_factory.mktemp("xl") / "ckpt"
    tokenizer = Tokenizer.from_file(str(bundled_minilm_dir() / "tokenizer.json"))
    save_checkpoint(out, build_model(config), HeadInfo(task="matching", max_length=64), tokenizer)
    return load_checkpoint(out)


TEXTS = ["The file could not be opened.", "a", "Die Datei konnte nicht geöffnet werden.", "", "word " * 100,
         "Fichier introuvable", "x y z"]


def test_encode_matches_unbatched(tiny_checkpoint):
    vectors = embeddings.encode(tiny_checkpoint, TEXTS, batch_size=3, max_length=16)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    for i, text in enumerate(TEXTS):  # length-sorted, padded batches give each text's own vector
        alone = embeddings.encode(tiny_checkpoint, [text], max_length=16)
        np.testing.assert_allclose(vectors[i], alone[0], atol=1e-5)
    prefixed = embeddings.encode(tiny_checkpoint, TEXTS[:1], prefix="query: ", max_length=16)
    assert not np.allclose(prefixed[0], vectors[0])
    assert embeddings.encode(tiny_checkpoint, [], max_length=16).shape == (0, 32)
    from_path = embeddings.encode(tiny_checkpoint.path, TEXTS[:2], max_length=16)
    np.testing.assert_allclose(from_path, vectors[:2], atol=1e-6)


def test_cached_encode_computes_once(tiny_checkpoint, tmp_path, monkeypatch):
    calls = []
    real = embeddings.encode

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(embeddings, "encode", counting)
    first = embeddings.cached_encode(tiny_checkpoint, TEXTS, tmp_path, max_length=16)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(calls) == 1 and len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    second = embeddings.cached_encode(tiny_checkpoint, TEXTS, tmp_path, max_length=16)
    assert len(calls) == 1 and files[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first, second)
    assert not list(tmp_path.glob(".*"))  # no temp file left
    # a different prefix, max_length or text list is a different entry
    embeddings.cached_encode(tiny_checkpoint, TEXTS, tmp_path, max_length=16, prefix="query: ")
    embeddings.cached_encode(tiny_checkpoint, TEXTS, tmp_path, max_length=8)
    embeddings.cached_encode(tiny_checkpoint, TEXTS[1:], tmp_path, max_length=16)
    assert len(calls) == 4 and len(list(tmp_path.glob("*.safetensors"))) == 4


def test_crosslingual_eval_command(tiny_checkpoint, tmp_path, capsys):
    from sampserve.commands import app

    rows = [{"en": f"message number {i} about files", "x": f"Nachricht Nummer {i}", "lang": lang, "program": "p"}
            for lang in ("fr", "de") for i in range(6)]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["crosslingual-eval", "--checkpoint", str(tiny_checkpoint.path), "--data", str(data), "--limit", "4",
            "--teacher", str(tiny_checkpoint.path), "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as done:
        app(args=args, prog_name="sampserve")
    assert done.value.code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(out["languages"]) == ["de", "fr"] and out["languages"]["de"]["n"] == 4
    assert 0.0 <= out["mean"]["acc@1"] <= 1.0 and "sts_proxy" in out["mean"]
    # both languages hold the same texts and the teacher is the student: one entry for en, one for x
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_paired_bootstrap_finds_a_real_difference_and_not_a_null_one() -> None:
    from training.crosslingual.metrics import paired_bootstrap

    rng = np.random.default_rng(0)
    base = {lang: (rng.random((3, 400)) < 0.6).astype(int) for lang in ("de", "fr")}
    better = {lang: np.where(rng.random((3, 400)) < 0.15, 1, hits) for lang, hits in base.items()}
    diff, low, high = paired_bootstrap(better, base)
    assert low > 0 and low <= diff <= high
    same, low, high = paired_bootstrap(base, base)
    assert same == 0 and low == 0 and high == 0
    noise = {lang: rng.permuted(hits, axis=1) for lang, hits in base.items()}
    _, low, high = paired_bootstrap(noise, base)
    assert low < 0 < high
    with pytest.raises(ValueError):
        paired_bootstrap({"de": base["de"]}, base)
    # Seeds that disagree: two runs gain about 20 points, the third loses as much. Holding the runs fixed,
    # the mean gain is clear; resampling the runs too, the interval is wider and includes 0.
    flips = {lang: rng.random((3, 400)) < 0.4 for lang in base}
    mixed = {lang: np.stack([base[lang][0] | flips[lang][0], base[lang][1] | flips[lang][1],
                             base[lang][2] & ~flips[lang][2]]).astype(int) for lang in base}
    fixed = paired_bootstrap(mixed, base)
    spread = paired_bootstrap(mixed, base, resample_runs=True)
    assert fixed[0] == spread[0] > 0 and fixed[1] > 0
    assert spread[2] - spread[1] > fixed[2] - fixed[1] and spread[1] < 0 < spread[2]
