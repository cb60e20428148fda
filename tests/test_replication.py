"""lit.replication against numpy / brute-force references, and lit.plots figures render."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lit.plots import rate_over_time, replication_summary, save_figure, similarity_histogram, top_copies_grid
from lit.replication import (
    duplicate_pairs,
    images_with_duplicates,
    mirror_aware_search,
    replication_rates,
    replication_stats,
    self_similarity,
    top_copies,
)
from tests.reference_scores import cosine_scores


def test_rates_are_strictly_above_threshold() -> None:
    scores = torch.tensor([0.1, 0.5, 0.50001, 0.9, 0.95, 1.0])
    rates = replication_rates(scores, [0.5, 0.9, 0.95])
    assert rates == {0.5: 4 / 6, 0.9: 2 / 6, 0.95: 1 / 6}  # 0.5, 0.9 and 0.95 themselves do not count
    # in float32, 0.9 and 0.95 round below the thresholds: only 0.5 told > from >= above.
    # float64 scores hit every threshold exactly (>= would give 5/6, 3/6, 2/6) ...
    rates = replication_rates(torch.tensor([0.1, 0.5, 0.50001, 0.9, 0.95, 1.0], dtype=torch.float64), [0.5, 0.9, 0.95])
    assert rates == {0.5: 4 / 6, 0.9: 2 / 6, 0.95: 1 / 6}
    # ... and so do float32 scores at thresholds exactly representable in binary (>=: 5/6, 3/6)
    exact = torch.tensor([0.25, 0.75, 0.8, 0.875, 0.9, 1.0], dtype=torch.float32)
    assert exact[1].item() == 0.75 and exact[3].item() == 0.875
    assert replication_rates(exact, [0.75, 0.875]) == {0.75: 4 / 6, 0.875: 2 / 6}
    assert replication_stats(exact, [0.75, 0.875]).rates == {0.75: 4 / 6, 0.875: 2 / 6}
    assert replication_rates(torch.tensor([0.75, 0.75]), [0.75]) == {0.75: 0.0}


def test_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        values = rng.uniform(-0.2, 1.0, size=n)
        stats = replication_stats(torch.tensor(values, dtype=torch.float32), [0.3, 0.6])
        ref = values.astype(np.float32).astype(np.float64)
        assert stats.count == n
        assert stats.mean == pytest.approx(ref.mean(), abs=1e-9)
        assert stats.median == pytest.approx(np.median(ref), abs=1e-9)
        assert stats.p95 == pytest.approx(np.percentile(ref, 95), abs=1e-9)
        assert stats.max == pytest.approx(ref.max(), abs=1e-9)
        assert stats.rates[0.3] == pytest.approx((ref > 0.3).mean())


def test_stats_keys() -> None:
    stats = replication_stats(torch.tensor([0.2, 0.6, 0.97]), [0.5, 0.95])
    assert set(stats.as_dict("x/")) == {"x/rate@0.5", "x/rate@0.95", "x/top1_mean", "x/top1_median",
                                        "x/top1_p95", "x/top1_max"}
    assert stats.as_dict()["top1_median"] == pytest.approx(0.6)


@pytest.mark.parametrize(("bad", "message"), [
    (torch.zeros(0), r"scores is empty"),
    (torch.zeros(2, 2), r"scores must be 1-D .*got shape \(2, 2\)"),
    (torch.tensor([0.1, float("nan")]), r"scores contain NaN or inf"),
    (torch.tensor([0.1, float("inf")]), r"scores contain NaN or inf"),
])
def test_bad_scores_raise(bad: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replication_stats(bad, [0.5])
    with pytest.raises(ValueError, match=message):
        replication_rates(bad, [0.5])


def test_self_similarity_matches_brute_force() -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(12, 5, generator=generator)
    features[7] = features[3] * 2.0 + 1e-4  # a near duplicate pair (3, 7)
    result = self_similarity(features, k=3)
    sims = torch.from_numpy(cosine_scores(features, features))
    sims.fill_diagonal_(-float("inf"))
    assert torch.allclose(result.scores[:, 0].double(), sims.max(dim=1).values, atol=1e-5)
    assert result.indices[3, 0] == 7 and result.indices[7, 0] == 3
    assert (result.indices != torch.arange(12)[:, None]).all()  # never its own match
    pairs = duplicate_pairs(result, threshold=0.95)
    brute = [(i, j) for i in range(12) for j in range(i + 1, 12) if sims[i, j] > 0.95]
    assert [(i, j) for i, j, _ in pairs] == brute == [(3, 7)]
    assert images_with_duplicates(result.scores[:, 0], 0.95) == 2


def _brute_mirror(queries: torch.Tensor, gallery: torch.Tensor, mirrored: torch.Tensor,
                  own: list[int] | None) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference: per gallery row the max of its and its mirror's cosine; own rows removed."""
    direct, flipped = cosine_scores(queries, gallery), cosine_scores(queries, mirrored)
    best = np.maximum(direct, flipped)
    if own is not None:
        best[np.arange(len(own)), own] = -np.inf
    return best, flipped > direct


def test_mirror_aware_search_matches_brute_force() -> None:
    generator = torch.Generator().manual_seed(2)
    gallery = torch.randn(9, 6, generator=generator)
    mirrored = torch.randn(9, 6, generator=generator)
    queries = torch.cat([torch.randn(4, 6, generator=generator), mirrored[5:6] * 3])  # last query: mirror of row 5
    found = mirror_aware_search(queries, gallery, mirrored, k=4)
    best, flipped = _brute_mirror(queries, gallery, mirrored, None)
    order = np.argsort(-best, axis=1, kind="stable")[:, :4]
    assert np.array_equal(found.result.indices.numpy(), order)
    assert np.allclose(found.result.scores.numpy(), np.take_along_axis(best, order, 1), atol=1e-5)
    assert np.array_equal(found.mirrored.numpy(), np.take_along_axis(flipped, order, 1))
    assert found.result.indices[4, 0] == 5 and bool(found.mirrored[4, 0])
    assert found.result.scores[4, 0] == pytest.approx(1.0, abs=1e-5)
    # every row listed once even though it is in the search twice (as itself and as its mirror)
    assert all(len(set(row)) == 4 for row in found.result.indices.tolist())


def test_mirror_aware_baseline_leaves_out_own_mirror() -> None:
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(6, 5, generator=generator)
    mirrored = features.clone()  # symmetric images: each one's mirror is itself
    mirrored[2] = features[4]  # the mirror of image 2 looks like image 4
    result = self_similarity(features, k=3, mirrored=mirrored)
    best, _ = _brute_mirror(features, features, mirrored, list(range(6)))
    assert np.allclose(result.scores.numpy(), -np.sort(-best, axis=1)[:, :3], atol=1e-5)
    assert (result.indices != torch.arange(6)[:, None]).all()
    assert result.indices[4, 0] == 2 and result.scores[4, 0] == pytest.approx(1.0, abs=1e-5)
    small = self_similarity(features[:2], k=5, mirrored=mirrored[:2])  # k clipped to G - 1
    assert small.indices.tolist() == [[1], [0]]


def test_self_similarity_needs_two_images() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        self_similarity(torch.randn(1, 4))


def test_top_copies_order_and_ties() -> None:
    scores = torch.tensor([0.2, 0.9, 0.5, 0.9, 0.1])
    assert top_copies(scores, 3).tolist() == [1, 3, 2]
    assert top_copies(scores, 10).tolist() == [1, 3, 2, 0, 4]


def test_figures_render(tmp_path: Path) -> None:
    gen, base = torch.rand(20), torch.rand(15)
    images, matches, scores = torch.rand(3, 3, 8, 8), torch.rand(3, 2, 3, 8, 8), torch.rand(3, 2)
    figures = {
        "hist": similarity_histogram(gen, base, thresholds=[0.5]),
        "grid": top_copies_grid(images, matches, scores, ["a", "b", "c"]),
        "rate": rate_over_time([0, 10, 20], {"rate@0.5": [0.0, 0.2, 0.5]}, {"rate@0.5": 0.1}),
        "summary": replication_summary([0, 10], {"rate@0.5": [0.0, 0.5]}, gen, base, images, matches, scores, [0.5]),
    }
    for name, figure in figures.items():
        path = save_figure(figure, tmp_path / f"{name}.png")
        assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="shapes disagree"):
        top_copies_grid(images[:2], matches, scores)
