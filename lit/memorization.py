"""The training-data-free memorization score (Wen et al., ICLR 2024) and how well it separates.

- :func:`noise_difference_norm`: ``d_t = || eps(x_t, c) - eps(x_t, empty) ||_2`` over the whole
  flattened noise prediction of each sample (the latent for latent models), not scaled by the
  guidance;
- :class:`ScoreTrace`: the ``d_t`` of a batch, step by step; an image's score is the mean of its
  ``d_t`` (:attr:`ScoreTrace.mean`), its first-step score ``d_1`` (:attr:`ScoreTrace.first`);
- :func:`guidance_halves`: the two halves of a classifier-free-guidance batch, the layout every
  diffusers text-to-image pipeline uses (``torch.cat([unconditional, conditional])``);
- :func:`roc_auc` and :func:`tpr_at_fpr`: how well a score ranks positives (e.g. "top-1 above
  0.5") above negatives; ties count one half, as in scikit-learn (:func:`average_ranks`, also the
  ranks of ``lit scan``'s Spearman correlation).

One definition each, for ``lit generate``, ``lit scan`` and the training monitor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


def noise_difference_norm(conditional: Tensor, unconditional: Tensor) -> Tensor:
    """Per-sample ``|| conditional - unconditional ||_2`` over all but the batch dimension, in float32."""
    if conditional.shape != unconditional.shape:
        raise ValueError(f"noise predictions differ in shape: {tuple(conditional.shape)} vs {tuple(unconditional.shape)}")
    if conditional.ndim < 1:
        raise ValueError("noise predictions need a batch dimension")
    difference = conditional.float() - unconditional.float()
    return torch.linalg.vector_norm(difference.reshape(difference.shape[0], -1), dim=1)


def guidance_halves(prediction: Tensor) -> tuple[Tensor, Tensor]:
    """``(conditional, unconditional)`` halves of a guidance batch laid out as ``[unconditional, conditional]``."""
    if prediction.shape[0] % 2:
        raise ValueError(f"a guidance batch has an even size, got {prediction.shape[0]}")
    unconditional, conditional = prediction.chunk(2)
    return conditional, unconditional


@dataclass
class ScoreTrace:
    """``d_t`` of one batch of images, one row per denoising step (append in step order)."""

    steps: list[Tensor] = field(default_factory=list)

    def add(self, conditional: Tensor, unconditional: Tensor) -> None:
        """Record one step's ``d_t`` for every image of the batch."""
        self.steps.append(noise_difference_norm(conditional, unconditional).detach().cpu())

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def _stacked(self) -> Tensor:
        if not self.steps:
            raise ValueError("no denoising step was recorded")
        return torch.stack(self.steps)

    @property
    def mean(self) -> Tensor:
        """Per image: the mean of ``d_t`` over the recorded steps (the memorization score)."""
        return self._stacked().mean(dim=0)

    @property
    def first(self) -> Tensor:
        """Per image: ``d_t`` at the first step."""
        return self._stacked()[0]


def _checked_binary(scores: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores hold NaN or inf")
    return s, y


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (ascending), ties sharing the mean of their ranks
    (``scipy.stats.rankdata(method="average")``), float64."""
    values = np.asarray(values).reshape(-1)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if values.size else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], values.size]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def roc_auc(scores: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for binary ``labels``; ``None`` when a class is empty.

    The Mann-Whitney statistic: the share of (positive, negative) pairs ranked the right way,
    ties counted one half (equal to ``sklearn.metrics.roc_auc_score``)."""
    s, y = _checked_binary(scores, labels)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return None
    rank_sum = average_ranks(s)[y].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def tpr_at_fpr(scores: np.ndarray | Tensor, labels: np.ndarray | Tensor, max_fpr: float = 0.01) -> float | None:
    """Largest true-positive rate at a threshold whose false-positive rate is at most ``max_fpr``
    (a sample is called positive when its score is >= the threshold); ``None`` when a class is empty."""
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must lie in [0, 1], got {max_fpr}")
    s, y = _checked_binary(scores, labels)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return None
    # thresholds from high to low: the calls (and both rates) only grow, so the best TPR is at the
    # lowest threshold whose FPR stays within max_fpr; O(n log n) for any number of distinct scores
    order = np.argsort(-s, kind="stable")
    sorted_scores, sorted_labels = s[order], y[order]
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    true_called = np.cumsum(sorted_labels)[last_of_tie]
    false_called = np.cumsum(~sorted_labels)[last_of_tie]
    allowed = false_called / negatives <= max_fpr
    return float(true_called[allowed].max() / positives) if allowed.any() else 0.0
