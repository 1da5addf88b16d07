"""Handwritten digits for the image path, from the copy that ships inside scikit-learn.

``sklearn.datasets.load_digits`` holds 1,797 8x8 greyscale scans (UCI's optical recognition set,
pixel values 0-16). They are written as PNG files (scaled to 0-255) with JSONL records
``{"image": "<file relative to the JSONL>", "label": "<digit>"}``: the same layout a user's own image
folder takes. The split is stratified by digit with a fixed seed; the test part is never trained on.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np

SPLITS = (("train", 0.7), ("dev", 0.1), ("test", 0.2))


def write_digits(out: Path, seed: int = 0) -> dict[str, int]:
    """PNG files under ``out/images`` and ``out/{train,dev,test}.jsonl``; returns each split's size."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images_dir = Path(out) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    by_label: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(digits.target):
        by_label[int(label)].append(index)
    parts: dict[str, list[dict]] = {name: [] for name, _ in SPLITS}
    rng = random.Random(seed)
    for label, indices in sorted(by_label.items()):
        rng.shuffle(indices)
        start = 0
        for number, (name, share) in enumerate(SPLITS):
            end = len(indices) if number == len(SPLITS) - 1 else start + round(share * len(indices))
            for index in indices[start:end]:
                pixels = np.round(digits.images[index] * (255 / 16)).astype(np.uint8)
                file = images_dir / f"{index:04d}.png"
                Image.fromarray(pixels, mode="L").save(file)
                parts[name].append({"image": f"images/{file.name}", "label": str(label)})
            start = end
    for name, records in parts.items():
        rng.shuffle(records)
        (Path(out) / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {name: len(records) for name, records in parts.items()}
