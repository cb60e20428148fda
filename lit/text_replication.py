"""Replication statistics of a text-conditioned model, per group of training captions.

The follow-up study ("Understanding and Mitigating Copying in Diffusion Models", Somepalli et al.,
NeurIPS 2023) draws a share of the training images more often (the *duplicated* group) and reads
its generations apart from the others (*unique*). For each group this module gives, from the
generations' top-1 similarities (:func:`lit.replication.replication_stats`) and memorization
scores (:mod:`lit.memorization`):

- ``{group}/rate@t`` and ``{group}/top1_p95`` (the study's headline "dataset similarity" is the
  95th percentile of top-1 similarity);
- ``{group}/own_share``: share of generations whose top-1 match is the training image their
  caption came from;
- ``memorization/{group}/score_mean`` and ``.../score_first_mean``;

and over all generations ``own_share``, ``memorization/auc_duplicated`` (the score separating the
duplicated captions from the unique ones) and ``memorization/auc_copied@t`` (the score against
"top-1 above t", at the first threshold). An AUC is NaN when a class is empty. One function each,
for the training monitor and the evidence benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lit.memorization import roc_auc
from lit.replication import format_threshold, replication_stats

GROUPS: tuple[str, ...] = ("duplicated", "unique")
SCORE_PREFIX = "memorization"


def _auc(scores: Tensor, labels: Tensor) -> float:
    value = roc_auc(scores, labels)
    return math.nan if value is None else value


def score_statistics(scores: Tensor, first_scores: Tensor, duplicated: Tensor) -> dict[str, float]:
    """Memorization-score scalars per group and the score's AUC for duplicated vs unique captions
    (all that the score-only monitor, which searches nothing, can say)."""
    duplicated = duplicated.bool()
    row: dict[str, float] = {}
    for group, members in zip(GROUPS, (duplicated, ~duplicated)):
        if members.any():
            row[f"{SCORE_PREFIX}/{group}/score_mean"] = float(scores[members].double().mean())
            row[f"{SCORE_PREFIX}/{group}/score_first_mean"] = float(first_scores[members].double().mean())
    row[f"{SCORE_PREFIX}/score_mean"] = float(scores.double().mean())
    row[f"{SCORE_PREFIX}/auc_duplicated"] = _auc(scores, duplicated)
    return row


def group_statistics(top1: Tensor, own_match: Tensor, scores: Tensor, first_scores: Tensor, duplicated: Tensor,
                     thresholds: Sequence[float]) -> dict[str, float]:
    """Per-group replication and memorization scalars of one set of generations (see the module docstring).

    ``top1``: top-1 similarity per generation; ``own_match``: whether its top-1 match is its own
    caption's training image; ``duplicated``: whether its caption belongs to a duplicated image."""
    if not (top1.shape == own_match.shape == scores.shape == first_scores.shape == duplicated.shape):
        raise ValueError("top1, own_match, scores, first_scores and duplicated need one value per generation")
    duplicated, own_match = duplicated.bool(), own_match.bool()
    row: dict[str, float] = {"own_share": float(own_match.double().mean())}
    for group, members in zip(GROUPS, (duplicated, ~duplicated)):
        if not members.any():
            continue
        stats = replication_stats(top1[members], thresholds)
        row.update({f"{group}/rate@{format_threshold(t)}": rate for t, rate in stats.rates.items()})
        row[f"{group}/top1_p95"] = stats.p95
        row[f"{group}/own_share"] = float(own_match[members].double().mean())
    row.update(score_statistics(scores, first_scores, duplicated))
    first = min(thresholds)
    row[f"{SCORE_PREFIX}/auc_copied@{format_threshold(first)}"] = _auc(scores, top1 > first)
    return row


def group_table(history: Sequence[Mapping[str, Any]], threshold: float, *, score_only: bool = False) -> str:
    """Steps as rows, the duplicated and unique captions side by side: what ``lit fit`` prints at the end."""
    t = format_threshold(threshold)
    columns: list[tuple[str, str]] = [] if score_only else [
        ("own dup", "duplicated/own_share"), ("own uniq", "unique/own_share"),
        (f">{t} dup", f"duplicated/rate@{t}"), (f">{t} uniq", f"unique/rate@{t}"),
        ("p95 dup", "duplicated/top1_p95"), ("p95 uniq", "unique/top1_p95"),
    ]
    columns += [("score dup", f"{SCORE_PREFIX}/duplicated/score_mean"), ("score uniq", f"{SCORE_PREFIX}/unique/score_mean"),
                ("AUC dup", f"{SCORE_PREFIX}/auc_duplicated")]
    if not score_only:
        columns.append((f"AUC >{t}", f"{SCORE_PREFIX}/auc_copied@{t}"))
    width = max(10, *(len(name) + 1 for name, _ in columns))
    lines = [f"{'step':>8} " + " ".join(f"{name:>{width}}" for name, _ in columns)]
    for row in history:
        cells = []
        for _, key in columns:
            value = row.get(key, math.nan)
            cells.append(f"{'n/a' if value is None or math.isnan(value) else f'{value:.3f}':>{width}}")
        lines.append(f"{int(row['step']):>8} " + " ".join(cells))
    legend = ("own = share of generations whose top-1 match is their own caption's training image; "
              f">{t} = share with top-1 similarity above {t}; p95 = 95th percentile of top-1 similarity; "
              "score = mean memorization score (Wen et al.); AUC dup = the score separating duplicated from "
              f"unique captions; AUC >{t} = the score against top-1 above {t}")
    if score_only:
        legend = ("score = mean memorization score (Wen et al.), no training-set search (score-only monitor); "
                  "AUC dup = the score separating duplicated from unique captions")
    return "\n".join([*lines, legend])


def own_rows(keys: Sequence[str], training_keys: Sequence[str]) -> Tensor:
    """Training row of each caption's own image (its key's position in ``training_keys``)."""
    position = {key: row for row, key in enumerate(training_keys)}
    missing = [key for key in keys if key not in position]
    if missing:
        raise KeyError(f"{len(missing)} caption keys are not training images, e.g. {missing[0]!r}")
    return torch.tensor([position[key] for key in keys], dtype=torch.long)
