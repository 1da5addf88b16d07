"""The image path trained for real: a small ViT learns scikit-learn's handwritten digits from scratch."""

import json

import pytest

from training.checkpoint import load_checkpoint
from training.data.digits import write_digits
from training.jobs import TrainJob, evaluate_checkpoint, run_training
from training.trainer import TrainSettings

CHANCE = 0.1  # ten digits, near-equal counts


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    sizes = write_digits(out)
    return out, sizes


def test_the_digit_splits_are_disjoint_and_stratified(digits):
    out, sizes = digits
    assert sizes == {"train": 1258, "dev": 179, "test": 360}
    parts = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
             for name in sizes}
    files = [set(r["image"] for r in records) for records in parts.values()]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])
    total = {d: sum(r["label"] == str(d) for records in parts.values() for r in records) for d in range(10)}
    for name, share in (("train", 0.7), ("dev", 0.1), ("test", 0.2)):
        for d in range(10):
            assert abs(sum(r["label"] == str(d) for r in parts[name]) - share * total[d]) <= 1


def _train(out, model_dir, steps):
    return run_training(TrainJob(data=out / "train.jsonl", dev=out / "dev.jsonl", out_dir=model_dir,
                                 config="vit-digits"),
                        TrainSettings(batch_size=32, max_steps=steps, lr=1e-3, progress=False))


def test_a_small_vit_learns_the_digits(digits, tmp_path):
    """1,200 steps (~20 s on 2 cores): held-out test accuracy 0.978 measured; asserted >= 0.93, chance 0.1."""
    out, _ = digits
    result = _train(out, tmp_path / "vit", steps=1200)
    assert result.dev_metrics["accuracy"] >= 0.9
    checkpoint = load_checkpoint(tmp_path / "vit")
    assert checkpoint.tokenizer is None and checkpoint.head.labels == [str(d) for d in range(10)]
    test = evaluate_checkpoint(tmp_path / "vit", out / "test.jsonl")
    assert test["accuracy"] >= 0.93 > CHANCE


@pytest.mark.slow
def test_the_full_digits_run_reaches_its_stated_accuracy(digits, tmp_path):
    """The full run (README): 4,000 steps (~70 s); held-out test accuracy 0.961 measured, asserted >= 0.95.
    (More steps do not help on 1,258 images without augmentation: the 1,200-step run scored 0.978.)"""
    out, _ = digits
    _train(out, tmp_path / "vit", steps=4000)
    assert evaluate_checkpoint(tmp_path / "vit", out / "test.jsonl")["accuracy"] >= 0.95
