"""lit.commands.scan.analysis against independent references (numpy, scipy, hand-computed cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lit.commands.scan.analysis import (
    DEFAULT_THRESHOLDS,
    background_bias,
    baseline_rows,
    class_similarity,
    count_above,
    duplicate_comparison,
    linear_fit,
    normalize_scores,
    score_summary,
    within_class_top1,
)


def test_score_summary_matches_numpy() -> None:
    scores = torch.tensor([0.1, 0.55, 0.7, 0.71, 0.93, 0.96, 0.2, 0.8])
    summary = score_summary(scores)
    ref = scores.double().numpy()
    assert list(summary["rates"]) == ["0.5", "0.7", "0.8", "0.9", "0.95"]
    for t in DEFAULT_THRESHOLDS:  # strictly above: 0.7 and 0.8 themselves do not count
        assert summary["rates"][f"{t:g}"] == pytest.approx(float(np.mean(ref > t)))
    assert summary["rates"]["0.7"] == pytest.approx(4 / 8)
    assert summary["mean"] == pytest.approx(ref.mean())
    assert summary["median"] == pytest.approx(np.median(ref))
    assert summary["p95"] == pytest.approx(np.percentile(ref, 95))
    assert summary["max"] == pytest.approx(0.96)
    assert summary["count"] == 8


def test_baseline_rows_exact_and_sampled() -> None:
    exact = baseline_rows(10, None)
    assert exact.exact and exact.rows.tolist() == list(range(10))
    assert baseline_rows(10, 10).exact
    sample = baseline_rows(1000, 50, seed=3)
    assert not sample.exact and sample.rows.numel() == 50
    assert len(set(sample.rows.tolist())) == 50 and sample.rows.tolist() == sorted(sample.rows.tolist())
    assert torch.equal(sample.rows, baseline_rows(1000, 50, seed=3).rows)
    assert not torch.equal(sample.rows, baseline_rows(1000, 50, seed=4).rows)
    assert sample.record() == {"exact": False, "sample_size": 50, "population": 1000, "seed": 3}
    with pytest.raises(ValueError, match="sample_size"):
        baseline_rows(10, 0)


def test_count_above_blockwise_equals_brute_force() -> None:
    generator = torch.Generator().manual_seed(0)
    sims = torch.rand(7, 23, generator=generator)
    own = torch.tensor([0, 5, 22, -1, 11, 12, 3])
    reference = [sum(1 for j in range(23) if sims[q, j] > 0.6 and j != int(own[q])) for q in range(7)]
    whole = count_above(sims, 0.6, own)
    assert whole.tolist() == reference
    blocks = sum(count_above(sims[:, s : s + 5], 0.6, own, block_start=s) for s in range(0, 23, 5))
    assert blocks.tolist() == reference


def test_count_above_is_strict() -> None:
    assert count_above(torch.tensor([[0.95, 0.951, 0.5]]), 0.95).tolist() == [1]


def test_duplicate_comparison_fields() -> None:
    result = duplicate_comparison(torch.tensor([0, 3, 5]), torch.tensor([0, 0, 1, 0]))
    assert result["top_matches"]["mean"] == pytest.approx(8 / 3)
    assert result["top_matches"]["share_with_duplicates"] == pytest.approx(2 / 3)
    assert result["random_training"]["mean"] == pytest.approx(0.25)
    assert result["random_training"]["max"] == 1
    assert result["threshold"] == 0.95


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
