"""lit.commands.scan.analysis against independent references (numpy, scipy, hand-computed cases).

(The replication statistics the scan shares with the monitor are tested in tests/test_replication.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lit.commands.scan.analysis import (
    background_bias,
    class_similarity,
    linear_fit,
    normalize_scores,
    within_class_top1,
)


def test_linear_fit_matches_scipy_and_polyfit() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 0.9, 40)
    y = 0.7 * x + 0.1 + rng.normal(0, 0.05, 40)
    fit = linear_fit(torch.from_numpy(x), torch.from_numpy(y))
    reference = stats.linregress(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert fit.pearson == pytest.approx(reference.rvalue, abs=1e-10)
    assert fit.slope == pytest.approx(slope, abs=1e-10)
    assert fit.intercept == pytest.approx(intercept, abs=1e-10)
    assert fit.count == 40


def test_linear_fit_degenerate_cases_are_nan() -> None:
    assert math.isnan(linear_fit(torch.tensor([1.0]), torch.tensor([2.0])).pearson)
    assert math.isnan(linear_fit(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 3.0])).slope)
    flat = linear_fit(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 3.0]))
    assert flat.slope == 0.0 and math.isnan(flat.pearson)


def test_class_similarity_hand_computed() -> None:
    within = within_class_top1(torch.tensor([0.2, 0.4, float("-inf"), 0.9, 0.7]), ["a", "a", "b", "c", "c"])
    assert within == pytest.approx({"a": 0.3, "c": 0.8})  # "b" has no other member
    result = class_similarity(torch.tensor([0.5, 0.6, 0.1, 0.95]), ["a", "a", "b", "c"], within)
    assert result.classes == ["a", "c"]
    assert result.max_generation.tolist() == pytest.approx([0.6, 0.95])
    assert result.mean_within.tolist() == pytest.approx([0.3, 0.8])
    assert result.fit.slope == pytest.approx((0.95 - 0.6) / (0.8 - 0.3))
    assert result.fit.pearson == pytest.approx(1.0)
    record = result.record()
    assert record["num_classes"] == 2 and record["classes"][1]["label"] == "c"


def test_score_normalisation() -> None:
    background = torch.tensor([[0.9, 0.7, 0.2], [0.4, 0.2, 0.1]])
    bias = background_bias(background, k=2)
    assert bias.tolist() == pytest.approx([0.8, 0.3])
    scores = torch.tensor([[0.95, 0.5], [0.6, float("-inf")]])
    normalised = normalize_scores(scores, bias, beta=0.5)
    assert normalised[0].tolist() == pytest.approx([0.55, 0.1])
    assert normalised[1, 0].item() == pytest.approx(0.45) and normalised[1, 1].item() == float("-inf")
    assert normalize_scores(scores[:, 0], bias, beta=1.0).tolist() == pytest.approx([0.15, 0.3])
    with pytest.raises(ValueError, match="fewer than k"):
        background_bias(torch.tensor([[0.5, float("-inf")]]), k=2)
