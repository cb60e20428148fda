"""The analyses of a scan (paper Sec. 6-7): pure functions of scores, rows and labels.

``lit scan`` (:mod:`lit.commands.scan.command`) streams stores through the search and hands the
resulting tensors to these functions; they never read files. Definitions
(README, "Definitions"):

- **top-1 similarity** of a generation: its largest similarity to any training
  image; summarised by :func:`score_summary` (rates at thresholds, strictly
  above, plus mean / median / p95 / max, from :func:`lit.replication.replication_stats`);
- **self-similarity baseline**: each training image's largest similarity to any
  *other* training image, on every row (``exact``) or on a seeded sample of rows
  (:func:`baseline_rows`; the sample size is part of the result);
- **duplicates of a training image** (Fig. 11 right): other training images with
  similarity > :data:`lit.replication.DUPLICATE_THRESHOLD`, counted blockwise
  (:func:`count_above`) for the top-1 match of every generation and for random
  training images (:func:`duplicate_comparison`);
- **per-class** (Fig. 6): for each class, the largest generation top-1 score
  against the mean *within-class* self-similarity of its training images
  (each image's best match among the other images of its class), with the
  Pearson correlation and the least-squares slope over classes (:func:`class_similarity`);
- **score normalisation** (SSCD, Pizzi et al. 2022): a generation's scores minus
  ``beta`` times the mean of its ``k`` best similarities to a background set
  (:func:`normalize_scores`); a per-generation shift, so each generation's
  ranking of training images is unchanged, only comparisons across generations
  (rates, the report's order) move.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit.replication import DUPLICATE_THRESHOLD, format_threshold, replication_stats

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95)


def score_summary(scores: Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """JSON-able summary of top-1 scores: ``count``, ``rates`` (``{"0.5": ...}``), mean, median, p95, max."""
    stats = replication_stats(scores, thresholds)
    return {
        "count": stats.count,
        "rates": {format_threshold(t): rate for t, rate in stats.rates.items()},
        "mean": stats.mean,
        "median": stats.median,
        "p95": stats.p95,
        "max": stats.max,
    }


@dataclass(frozen=True)
class RowSample:
    """Rows chosen from ``population`` rows: all of them (``exact``) or a seeded sample of ``len(rows)``."""

    rows: Tensor  # (n,) int64, ascending
    population: int
    exact: bool
    seed: int | None

    def record(self) -> dict[str, Any]:
        """What was sampled, for summary.json."""
        return {"exact": self.exact, "sample_size": int(self.rows.numel()), "population": self.population,
                "seed": self.seed}


def baseline_rows(num_rows: int, sample_size: int | None, seed: int = 0) -> RowSample:
    """Every row when ``sample_size`` is ``None`` or covers ``num_rows``; else ``sample_size``
    distinct rows drawn with ``torch.Generator().manual_seed(seed)`` (same seed, same rows), ascending."""
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    if sample_size is None or sample_size >= num_rows:
        return RowSample(torch.arange(num_rows, dtype=torch.int64), num_rows, True, None)
    if sample_size < 1:
        raise ValueError(f"sample_size must be >= 1, got {sample_size}")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(num_rows, generator=generator)[:sample_size]
    return RowSample(torch.sort(rows).values, num_rows, False, seed)


def count_above(similarities: Tensor, threshold: float, own_rows: Tensor | None = None,
                block_start: int = 0) -> Tensor:
    """Per query, the gallery columns of one block with similarity strictly above ``threshold``.

    ``similarities`` (Q, B) scores a block of gallery rows ``block_start .. block_start + B``;
    ``own_rows`` (Q,) names each query's own global gallery row (not counted; -1 for none).
    Summing the counts of every block gives the count over the whole gallery.
    """
    if similarities.ndim != 2:
        raise ValueError(f"similarities must be (Q, B), got shape {tuple(similarities.shape)}")
    above = similarities > threshold
    if own_rows is not None:
        if own_rows.shape != (similarities.shape[0],):
            raise ValueError(f"own_rows must be ({similarities.shape[0]},), got {tuple(own_rows.shape)}")
        local = own_rows.to(torch.int64) - block_start
        inside = (local >= 0) & (local < similarities.shape[1])
        columns = torch.arange(similarities.shape[1])[None, :]
        above &= ~((columns == local[:, None]) & inside[:, None])
    return above.sum(dim=1).to(torch.int64)


def duplicate_comparison(match_counts: Tensor, random_counts: Tensor,
                         threshold: float = DUPLICATE_THRESHOLD) -> dict[str, Any]:
    """Fig. 11 right: duplicates (> ``threshold``) of each generation's top match vs of random training images."""

    def describe(counts: Tensor) -> dict[str, Any]:
        values = counts.double()
        return {"count": int(values.numel()), "mean": float(values.mean()), "median": float(values.median()),
                "max": int(counts.max()), "share_with_duplicates": float((counts > 0).double().mean())}

    if match_counts.numel() == 0 or random_counts.numel() == 0:
        raise ValueError("duplicate_comparison needs at least one top match and one random training image")
    return {"threshold": threshold, "top_matches": describe(match_counts), "random_training": describe(random_counts)}


@dataclass(frozen=True)
class LinearFit:
    """Pearson correlation and least-squares line ``y = slope * x + intercept`` (NaN when undefined)."""

    pearson: float
    slope: float
    intercept: float
    count: int


def linear_fit(x: Tensor, y: Tensor) -> LinearFit:
    """Pearson r and the least-squares line through ``(x, y)`` in float64 (NaN for < 2 points or constant x)."""
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {tuple(x.shape)} and {tuple(y.shape)}")
    n = int(x.numel())
    if n < 2:
        return LinearFit(math.nan, math.nan, math.nan, n)
    xd, yd = x.double() - x.double().mean(), y.double() - y.double().mean()
    sxx, syy, sxy = float((xd * xd).sum()), float((yd * yd).sum()), float((xd * yd).sum())
    if sxx == 0.0:
        return LinearFit(math.nan, math.nan, math.nan, n)
    slope = sxy / sxx
    intercept = float(y.double().mean()) - slope * float(x.double().mean())
    pearson = sxy / math.sqrt(sxx * syy) if syy > 0.0 else math.nan
    return LinearFit(pearson, slope, intercept, n)


@dataclass(frozen=True)
class ClassSimilarity:
    """Fig. 6: per class, the best generation score (y) against the mean within-class self-similarity (x)."""

    classes: list[str]
    max_generation: Tensor  # (C,) float64
    mean_within: Tensor  # (C,) float64
    fit: LinearFit

    def record(self) -> dict[str, Any]:
        """JSON-able: one entry per class plus the correlation and the fitted line."""
        return {
            "classes": [{"label": c, "max_generation_similarity": float(g), "mean_within_class_self_similarity": float(w)}
                        for c, g, w in zip(self.classes, self.max_generation.tolist(), self.mean_within.tolist())],
            "pearson": _json_float(self.fit.pearson),
            "slope": _json_float(self.fit.slope),
            "intercept": _json_float(self.fit.intercept),
            "num_classes": self.fit.count,
        }


def within_class_top1(scores_by_row: Tensor, classes: Sequence[str]) -> dict[str, float]:
    """Mean of finite within-class top-1 scores per class (classes whose images have no other member are left out)."""
    if scores_by_row.shape != (len(classes),):
        raise ValueError(f"need one score per class label, got {tuple(scores_by_row.shape)} and {len(classes)} labels")
    sums: dict[str, list[float]] = {}
    for label, score in zip(classes, scores_by_row.double().tolist()):
        if math.isfinite(score):
            sums.setdefault(label, []).append(score)
    return {label: sum(values) / len(values) for label, values in sums.items()}


def class_similarity(generation_scores: Tensor, generation_classes: Sequence[str],
                     mean_within: dict[str, float]) -> ClassSimilarity:
    """Per class present in both: max of its generations' top-1 scores vs its mean within-class self-similarity.

    Classes sort by name; the fit is over classes (one point each), as in the paper's Fig. 6.
    """
    if generation_scores.shape != (len(generation_classes),):
        raise ValueError(f"need one class per generation, got {tuple(generation_scores.shape)} scores and "
                         f"{len(generation_classes)} classes")
    best: dict[str, float] = {}
    for label, score in zip(generation_classes, generation_scores.double().tolist()):
        best[label] = max(best.get(label, -math.inf), score)
    classes = sorted(set(best) & set(mean_within))
    y = torch.tensor([best[c] for c in classes], dtype=torch.float64)
    x = torch.tensor([mean_within[c] for c in classes], dtype=torch.float64)
    return ClassSimilarity(classes, y, x, linear_fit(x, y))


def background_bias(background_scores: Tensor, k: int) -> Tensor:
    """SSCD's per-query bias: the mean of the ``k`` best background similarities, from a (Q, >=k) top-k list."""
    if background_scores.ndim != 2 or background_scores.shape[1] < k or k < 1:
        raise ValueError(f"need a (Q, >= {k}) top-k score list with k >= 1, got {tuple(background_scores.shape)}")
    top = background_scores[:, :k].double()
    if not torch.isfinite(top).all():
        raise ValueError(f"the background set has fewer than k={k} items")
    return top.mean(dim=1)


def normalize_scores(scores: Tensor, bias: Tensor, beta: float) -> Tensor:
    """``scores - beta * bias`` per query row: (Q,) or (Q, k) scores, (Q,) bias; -inf slots stay -inf."""
    if bias.shape != (scores.shape[0],):
        raise ValueError(f"bias must be ({scores.shape[0]},), got {tuple(bias.shape)}")
    shift = (beta * bias).to(scores.dtype)
    return scores - (shift[:, None] if scores.ndim == 2 else shift)


def _json_float(value: float) -> float | None:
    """NaN/inf as ``None`` (JSON has no NaN)."""
    return value if math.isfinite(value) else None
