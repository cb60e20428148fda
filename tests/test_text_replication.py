"""lit.text_replication: per-group statistics against hand-computed values and scikit-learn."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from lit.text_replication import group_statistics, group_table, own_rows, score_statistics


def _case() -> dict[str, torch.Tensor]:
    return {
        "top1": torch.tensor([0.95, 0.85, 0.40, 0.30, 0.60, 0.20]),
        "own_match": torch.tensor([True, True, False, False, True, False]),
        "scores": torch.tensor([9.0, 7.0, 2.0, 3.0, 5.0, 1.0]),
        "first_scores": torch.tensor([4.0, 2.0, 1.0, 1.0, 2.0, 0.0]),
        "duplicated": torch.tensor([True, True, True, False, False, False]),
    }


def test_group_statistics_by_hand() -> None:
    case = _case()
    row = group_statistics(**case, thresholds=[0.5, 0.9])
    assert row["own_share"] == pytest.approx(3 / 6)
    assert row["duplicated/own_share"] == pytest.approx(2 / 3)
    assert row["unique/own_share"] == pytest.approx(1 / 3)
    assert row["duplicated/rate@0.5"] == pytest.approx(2 / 3) and row["unique/rate@0.5"] == pytest.approx(1 / 3)
    assert row["duplicated/rate@0.9"] == pytest.approx(1 / 3) and row["unique/rate@0.9"] == 0.0
    # numpy's linear-interpolation quantile of [0.4, 0.85, 0.95] at 0.95: 0.85 + 0.9 * (0.95 - 0.85)
    assert row["duplicated/top1_p95"] == pytest.approx(0.94, abs=1e-6)
    assert row["memorization/duplicated/score_mean"] == pytest.approx(6.0)
    assert row["memorization/unique/score_mean"] == pytest.approx(3.0)
    assert row["memorization/duplicated/score_first_mean"] == pytest.approx(7 / 3)
    assert row["memorization/auc_duplicated"] == pytest.approx(
        roc_auc_score(case["duplicated"].numpy(), case["scores"].numpy()))
    assert row["memorization/auc_copied@0.5"] == pytest.approx(
        roc_auc_score((case["top1"] > 0.5).numpy(), case["scores"].numpy()))


def test_one_group_only_and_an_empty_class_gives_nan_auc() -> None:
    case = _case()
    case["duplicated"] = torch.zeros(6, dtype=torch.bool)
    row = group_statistics(**case, thresholds=[0.5])
    assert "duplicated/rate@0.5" not in row and "unique/rate@0.5" in row
    assert math.isnan(row["memorization/auc_duplicated"])
    assert set(score_statistics(case["scores"], case["first_scores"], case["duplicated"])) == {
        "memorization/unique/score_mean", "memorization/unique/score_first_mean", "memorization/score_mean",
        "memorization/auc_duplicated"}


def test_shapes_must_agree() -> None:
    case = _case()
    case["scores"] = case["scores"][:5]
    with pytest.raises(ValueError, match="one value per generation"):
        group_statistics(**case, thresholds=[0.5])


def test_group_table_rows_and_missing_values() -> None:
    row = {"step": 500, **group_statistics(**_case(), thresholds=[0.5])}
    table = group_table([row, {"step": 0}], 0.5).splitlines()
    assert table[0].split()[:3] == ["step", "own", "dup"]
    assert table[1].split()[:3] == ["500", "0.667", "0.333"]
    assert table[2].split()[1] == "n/a"
    score_table = group_table([row], 0.5, score_only=True)
    assert "own" not in score_table.splitlines()[0] and "6.000" in score_table


def test_own_rows_and_unknown_keys() -> None:
    assert own_rows(["b", "a", "b"], ["a", "b", "c"]).tolist() == [1, 0, 1]
    with pytest.raises(KeyError, match="1 caption keys are not training images"):
        own_rows(["z"], ["a"])
