"""The image path trained for real: a small ViT learns scikit-learn's handwritten digits from scratch."""

import pytest

from training.checkpoint import load_checkpoint
from tests.conftest import read_splits, train_from_scratch
from training.jobs import evaluate_checkpoint

CHANCE = 0.1  # ten digits, near-equal counts


def test_the_digit_splits_are_disjoint_and_stratified(digits_data):
    parts = read_splits(digits_data)
    assert {name: len(records) for name, records in parts.items()} == {"train": 1258, "dev": 179, "test": 360}
    files = [set(r["image"] for r in records) for records in parts.values()]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])
    total = {d: sum(r["label"] == str(d) for records in parts.values() for r in records) for d in range(10)}
    for name, share in (("train", 0.7), ("dev", 0.1), ("test", 0.2)):
        for d in range(10):
            assert abs(sum(r["label"] == str(d) for r in parts[name]) - share * total[d]) <= 1


def test_a_small_vit_learns_the_digits(digits_data, digits_vit):
    """1,200 steps (~20 s on 2 cores): held-out test accuracy 0.978 measured; asserted >= 0.93, chance 0.1."""
    checkpoint = load_checkpoint(digits_vit)
    assert checkpoint.tokenizer is None and checkpoint.head.labels == [str(d) for d in range(10)]
    assert checkpoint.preprocessor["size"] == {"height": 32, "width": 32}
    test = evaluate_checkpoint(digits_vit, digits_data / "test.jsonl")
    assert test["accuracy"] >= 0.93 > CHANCE


@pytest.mark.slow
def test_the_full_digits_run_reaches_its_stated_accuracy(digits_data, tmp_path):
    """The full run (README): 4,000 steps (~70 s); held-out test accuracy 0.961 measured, asserted >= 0.95.
    (More steps do not help on 1,258 images without augmentation: the 1,200-step run scored 0.978.)"""
    train_from_scratch(tmp_path / "vit", "vit-digits", digits_data, 4000)
    assert evaluate_checkpoint(tmp_path / "vit", digits_data / "test.jsonl")["accuracy"] >= 0.95
