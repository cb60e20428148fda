"""The scan-specific analyses (paper Sec. 6-7): pure functions of scores and labels.

The replication statistics themselves (top-1 similarity, rates, the self-similarity
baseline, duplicate counts, mirror-aware matching) are defined once in
:mod:`lit.replication`, for the scan and the monitor alike. What only a scan does lives here:

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
