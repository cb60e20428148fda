"""lit.memorization against independent references: scikit-learn's ROC and hand-computed norms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from lit.memorization import ScoreTrace, guidance_halves, noise_difference_norm, roc_auc, tpr_at_fpr


def test_noise_difference_norm_is_the_flattened_l2_norm() -> None:
    cond = torch.zeros(2, 1, 2, 2)
    uncond = torch.zeros(2, 1, 2, 2)
    cond[0, 0, 0, 0], cond[0, 0, 1, 1] = 3.0, 4.0  # 3-4-5 triangle
    uncond[1] = 1.0  # four ones: norm 2
    assert noise_difference_norm(cond, uncond).tolist() == pytest.approx([5.0, 2.0])


def test_noise_difference_norm_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        noise_difference_norm(torch.zeros(2, 3), torch.zeros(2, 4))


def test_guidance_halves_follow_the_diffusers_layout() -> None:
    batch = torch.arange(4.0).reshape(4, 1)  # [uncond0, uncond1, cond0, cond1]
    cond, uncond = guidance_halves(batch)
    assert cond.flatten().tolist() == [2.0, 3.0] and uncond.flatten().tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="even"):
        guidance_halves(torch.zeros(3, 1))


def test_score_trace_mean_and_first() -> None:
    trace = ScoreTrace()
    for value in (1.0, 2.0, 6.0):
        trace.add(torch.full((2, 4), value), torch.zeros(2, 4))  # norm = 2 * value
    assert trace.num_steps == 3
    assert trace.first.tolist() == pytest.approx([2.0, 2.0])
    assert trace.mean.tolist() == pytest.approx([6.0, 6.0])
    with pytest.raises(ValueError, match="no denoising step"):
        _ = ScoreTrace().mean


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_equals_scikit_learn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.normal(size=200) + labels, 1)  # rounding makes ties
    assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert roc_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_is_none_without_both_classes() -> None:
    assert roc_auc([0.1, 0.2], [True, True]) is None
    assert tpr_at_fpr([0.1, 0.2], [False, False]) is None


@pytest.mark.parametrize("max_fpr", [0.0, 0.01, 0.1, 0.5])
@pytest.mark.parametrize("decimals", [None, 1])
def test_tpr_at_fpr_equals_the_roc_curve(max_fpr: float, decimals: int | None) -> None:
    rng = np.random.default_rng(7)
    labels = rng.random(300) < 0.4
    scores = rng.normal(size=300) + 1.5 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)  # ties: a threshold calls every tied sample at once
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    expected = float(tpr[fpr <= max_fpr].max())
    assert tpr_at_fpr(scores, labels, max_fpr) == pytest.approx(expected)


def test_scores_must_be_finite() -> None:
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0.1, float("nan")], [True, False])
