"""Cross-lingual embedding metrics in pure numpy: translation retrieval and a teacher-referenced STS proxy.

Rows of the arrays are sentence embeddings; row i of the English array and row i of the other language's
array are a translation pair. Embeddings need not be normalized: every cosine here normalizes first.
"""

from __future__ import annotations

import numpy as np

CHUNK = 1024  # query rows per similarity block: bounds memory at CHUNK x N floats


def _unit(a: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    a = np.asarray(a, dtype=np.float32)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norms, 1e-12)


def retrieval_accuracy(src: np.ndarray, tgt: np.ndarray) -> float:
    """Translation retrieval accuracy@1: the share of rows i whose nearest ``tgt`` row by cosine is row i.

    Ties go to the lowest index (``argmax``)."""
    if src.shape != tgt.shape or src.ndim != 2:
        raise ValueError(f"src and tgt must be matching (N, d) arrays, got {src.shape} and {tgt.shape}")
    n = src.shape[0]
    if n == 0:
        raise ValueError("no rows to retrieve")
    s, t = _unit(src), _unit(tgt)
    hits = 0
    for start in range(0, n, CHUNK):
        best = (s[start:start + CHUNK] @ t.T).argmax(axis=1)
        hits += int((best == np.arange(start, start + len(best))).sum())
    return hits / n


def bidirectional_retrieval(en: np.ndarray, x: np.ndarray) -> float:
    """The mean of en -> x and x -> en retrieval accuracy@1."""
    return (retrieval_accuracy(en, x) + retrieval_accuracy(x, en)) / 2


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (scipy's ``rankdata`` default)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(1, len(a) + 1)
    values, inverse = np.unique(a, return_inverse=True)
    if len(values) < len(a):  # average the ranks within each group of ties
        sums = np.bincount(inverse, weights=ranks)
        counts = np.bincount(inverse)
        ranks = (sums / counts)[inverse]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (tie-aware); NaN when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if len(ra) != len(rb):
        raise ValueError(f"{len(ra)} values against {len(rb)}")
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def sample_pairs(n: int, count: int = 2000, seed: int = 0) -> np.ndarray:
    """``count`` random (a, b) index pairs with a != b, as a (count, 2) int array (seeded)."""
    if n < 2:
        raise ValueError("need at least 2 rows to sample pairs")
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, size=count)
    b = (a + rng.integers(1, n, size=count)) % n  # uniform over the other n - 1 rows
    return np.stack([a, b], axis=1)


def sts_proxy(student_en: np.ndarray, student_x: np.ndarray, teacher_en: np.ndarray,
              pairs_index: np.ndarray | None = None, *, count: int = 2000, seed: int = 0) -> float:
    """Spearman between the student's cos(en_a, x_b) and the teacher's cos(en_a, en_b) over (a, b) pairs.

    How well the student's cross-lingual similarities keep the teacher's English ones; ``pairs_index``
    (an (M, 2) int array) defaults to ``count`` seeded random pairs with a != b."""
    n = student_en.shape[0]
    if student_x.shape[0] != n or teacher_en.shape[0] != n:
        raise ValueError(f"row counts differ: {n}, {student_x.shape[0]}, {teacher_en.shape[0]}")
    pairs = sample_pairs(n, count, seed) if pairs_index is None else np.asarray(pairs_index, dtype=np.int64)
    a, b = pairs[:, 0], pairs[:, 1]
    se, sx, te = _unit(student_en), _unit(student_x), _unit(teacher_en)
    student = (se[a] * sx[b]).sum(axis=1)
    teacher = (te[a] * te[b]).sum(axis=1)
    return spearman(student, teacher)


def report(per_language: dict[str, tuple[np.ndarray, np.ndarray]],
           teacher_en: dict[str, np.ndarray] | None = None) -> dict:
    """Per language (en, x) student embeddings -> ``{"languages": {lang: {...}}, "mean": {...}}``.

    Each language gets ``n``, ``en->x``, ``x->en`` and ``acc@1`` (their mean), plus ``sts_proxy`` when
    ``teacher_en`` holds the teacher's embeddings of that language's English rows; ``mean`` averages
    ``acc@1`` (and ``sts_proxy``) over the languages, unweighted."""
    languages: dict[str, dict[str, float]] = {}
    for lang, (en, x) in per_language.items():
        forward, backward = retrieval_accuracy(en, x), retrieval_accuracy(x, en)
        row = {"n": int(en.shape[0]), "en->x": forward, "x->en": backward, "acc@1": (forward + backward) / 2}
        if teacher_en is not None and lang in teacher_en:
            row["sts_proxy"] = sts_proxy(en, x, teacher_en[lang])
        languages[lang] = row
    mean: dict[str, float] = {}
    for key in ("acc@1", "sts_proxy"):
        values = [row[key] for row in languages.values() if key in row]
        if values:
            mean[key] = float(np.mean(values))
    return {"languages": languages, "mean": mean}


def paired_bootstrap(a: dict[str, np.ndarray], b: dict[str, np.ndarray], resamples: int = 2000,
                     seed: int = 0, resample_runs: bool = False) -> tuple[float, float, float]:
    """Method a minus method b in mean accuracy over languages, with a 95% paired bootstrap interval.

    ``a[lang]`` and ``b[lang]`` are (runs, N) 0/1 hit arrays over the same N test examples, row r of both
    from the same seed. Each resample draws examples with replacement within each language (the same draws
    for both methods: paired) and averages each example's hit rate over the runs; with ``resample_runs``
    it first draws the runs too (seed pairs, with replacement), so the interval also holds the
    seed-to-seed spread, not only the test sampling. The statistic is the unweighted mean over languages.
    Returns (observed difference, 2.5th percentile, 97.5th percentile)."""
    if set(a) != set(b) or not a:
        raise ValueError(f"languages differ: {sorted(a)} against {sorted(b)}")
    rng = np.random.default_rng(seed)
    per_run = {lang: np.atleast_2d(np.asarray(a[lang], float)) - np.atleast_2d(np.asarray(b[lang], float))
               for lang in sorted(a)}  # (runs, N) differences of hits
    observed = float(np.mean([d.mean() for d in per_run.values()]))
    runs = next(iter(per_run.values())).shape[0]
    draws = np.zeros(resamples)
    for d in per_run.values():
        if resample_runs:
            chosen = rng.integers(0, runs, size=(resamples, runs))
            rates = d[chosen].mean(axis=1)  # (resamples, N): each resample's seed-averaged differences
        else:
            rates = np.broadcast_to(d.mean(axis=0), (resamples, d.shape[1]))
        index = rng.integers(0, d.shape[1], size=(resamples, d.shape[1]))
        draws += np.take_along_axis(rates, index, axis=1).mean(axis=1)
    draws /= len(per_run)
    low, high = np.percentile(draws, [2.5, 97.5])
    return observed, float(low), float(high)
