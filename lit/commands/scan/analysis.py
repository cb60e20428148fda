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

For generations written by ``lit generate`` (paper Sec. 7, Fig. 10 and 11; Wen et al. 2024):

- **memorization score against top-1 similarity** (:func:`score_correlation`: Pearson and
  Spearman; :func:`score_roc`: ROC AUC and TPR at 1% FPR of the score for the label
  "top-1 above t", by :mod:`lit.memorization`'s ``roc_auc`` / ``tpr_at_fpr``);
- **caption sources** (Fig. 11 centre, :func:`source_statistics`): each generation's
  similarity to the training image its prompt came from, beside its top-1 match; and the
  duplicate counts of those images, of top matches and of matches above each threshold
  (Fig. 11 right, :func:`source_duplicates`, by :func:`lit.replication.describe_counts`);
- **prompt ablations** (Fig. 10, :func:`ablation_groups`): per prompt variant, its images'
  top-1 similarity and memorization score, grouped under the full prompt.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit.memorization import average_ranks, roc_auc, tpr_at_fpr
from lit.replication import describe_counts, format_threshold, score_summary


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


# ----------------------------------------------------------------------------- generations of lit generate


def rank_correlation(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation: Pearson's r of the average ranks (ties share their mean rank;
    ``scipy.stats.spearmanr``); NaN for < 2 points or a constant side."""
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got {tuple(x.shape)} and {tuple(y.shape)}")
    ranks = [torch.from_numpy(average_ranks(v.double().numpy())) for v in (x, y)]
    return linear_fit(*ranks).pearson


def score_correlation(scores: Tensor, top1: Tensor) -> dict[str, Any]:
    """How the memorization score goes with the top-1 similarity: ``count``, ``pearson``, ``spearman``
    (``None`` where undefined)."""
    return {"count": int(scores.numel()), "pearson": _json_float(linear_fit(scores, top1).pearson),
            "spearman": _json_float(rank_correlation(scores, top1))}


def score_roc(scores: Tensor, top1: Tensor, thresholds: Sequence[float], max_fpr: float = 0.01) -> list[dict[str, Any]]:
    """Per threshold t: how well ``scores`` find the generations whose top-1 similarity is above t
    (strictly, as a replication rate): ``positives``, ``negatives``, ``auc`` and ``tpr_at_fpr``
    (at ``max_fpr``), both ``None`` when a class is empty."""
    if scores.shape != top1.shape or scores.ndim != 1:
        raise ValueError(f"need one score per top-1 similarity, got {tuple(scores.shape)} and {tuple(top1.shape)}")
    rows = []
    for t in thresholds:
        labels = top1.double() > t
        rows.append({"threshold": float(t), "positives": int(labels.sum()), "negatives": int((~labels).sum()),
                     "auc": roc_auc(scores, labels), "tpr_at_fpr": tpr_at_fpr(scores, labels, max_fpr),
                     "max_fpr": max_fpr})
    return rows


def source_statistics(top_indices: Tensor, top1: Tensor, source_rows: Tensor, source_similarity: Tensor,
                      thresholds: Sequence[float]) -> dict[str, Any] | None:
    """Fig. 11 centre over the generations whose caption source is known (``source_rows`` >= 0):
    how many have it as their top-1 match (``top1_is_source``) or among their top-k
    (``source_in_top_k``), how many have a source similarity above each threshold (and, for
    comparison, a top-1 similarity above it), and both similarities summarised. ``None`` when
    no source is known."""
    known = source_rows >= 0
    n = int(known.sum())
    if n == 0:
        return None
    rows = source_rows[known]
    similarity, best = source_similarity[known].double(), top1[known].double()
    is_top1 = int((top_indices[known, 0] == rows).sum())
    return {"generations": n, "top1_is_source": is_top1, "top1_is_source_share": is_top1 / n,
            "source_in_top_k": int((top_indices[known] == rows[:, None]).any(dim=1).sum()),
            "source_above": {format_threshold(t): int((similarity > t).sum()) for t in thresholds},
            "top1_above": {format_threshold(t): int((best > t).sum()) for t in thresholds},
            "source_similarity": score_summary(similarity, thresholds),
            "top1_similarity": score_summary(best, thresholds)}


def source_duplicates(source_counts: Tensor, match_counts: Tensor, top1: Tensor, thresholds: Sequence[float],
                      duplicate_threshold: float) -> dict[str, Any] | None:
    """Fig. 11 right: duplicate counts (> ``duplicate_threshold``) of the generations' caption-source
    images (``source_counts``, -1 where unknown), of their top matches, and of the top matches of
    generations above each threshold (``None`` for a threshold no generation passes); one count per
    generation. ``None`` when no source is known."""
    known = source_counts >= 0
    if not bool(known.any()):
        return None
    above = {}
    for t in thresholds:
        chosen = match_counts[top1.double() > t]
        above[format_threshold(t)] = describe_counts(chosen) if chosen.numel() else None
    return {"threshold": duplicate_threshold, "caption_sources": describe_counts(source_counts[known]),
            "top_matches": describe_counts(match_counts), "matches_above": above}


def ablation_groups(prompt_indices: Sequence[int], variants: Sequence[str], prompts: Sequence[str],
                    top1: Sequence[float], scores: Sequence[float], threshold: float) -> list[dict[str, Any]]:
    """Fig. 10: the generations of prompt variants (``lit generate --ablate``), one row per variant
    prompt (``prompt_index``: its images' count, mean and max top-1, how many above ``threshold``,
    mean memorization score), grouped under their full prompt: in prompt-index order, a variant
    ``"full"`` opens a group and the variants after it join it (variants before any ``"full"``
    form a group without a full prompt). Only generations with a non-empty variant are given."""
    if not len(prompt_indices) == len(variants) == len(prompts) == len(top1) == len(scores):
        raise ValueError("need one prompt index, variant, prompt, top-1 and score per generation")
    per_prompt: dict[int, dict[str, Any]] = {}
    for index, variant, prompt, best, score in zip(prompt_indices, variants, prompts, top1, scores):
        entry = per_prompt.setdefault(int(index), {"prompt_index": int(index), "variant": variant, "prompt": prompt,
                                                   "top1": [], "scores": []})
        entry["top1"].append(float(best))
        entry["scores"].append(float(score))
    groups: list[dict[str, Any]] = []
    for index in sorted(per_prompt):
        entry = per_prompt[index]
        if entry["variant"] == "full" or not groups:
            full = entry["variant"] == "full"
            groups.append({"prompt": entry["prompt"] if full else None, "prompt_index": index if full else None,
                           "variants": []})
        values, marks = entry.pop("top1"), entry.pop("scores")
        groups[-1]["variants"].append({**entry, "images": len(values), "top1_mean": sum(values) / len(values),
                                       "top1_max": max(values), "above": sum(v > threshold for v in values),
                                       "threshold": threshold,
                                       "memorization_score_mean": sum(marks) / len(marks)})
    return groups
