"""lit.replication against numpy / brute-force references (the statistics the monitor and the scan
share), and lit.plots figures render."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lit.choices import DEFAULT_THRESHOLDS
from lit.plots import (
    rate_over_time,
    replication_summary,
    save_figure,
    similarity_histogram,
    top_copies_grid,
)
from lit.replication import (
    MirroredRows,
    SearchSettings,
    baseline_rows,
    count_above,
    duplicate_comparison,
    duplicate_counts,
    replication_rates,
    replication_stats,
    score_summary,
    self_similarity_baseline,
    top_copies,
    top_matches,
)
from lit.search import TensorRows
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
    own = torch.arange(12)
    result = top_matches(features, features, 3, query_rows=own, own_rows=own)
    baseline = self_similarity_baseline(features)
    sims = torch.from_numpy(cosine_scores(features, features))
    sims.fill_diagonal_(-float("inf"))
    assert torch.allclose(result.scores[:, 0].double(), sims.max(dim=1).values, atol=1e-5)
    assert torch.equal(baseline, result.scores[:, 0])
    assert result.indices[3, 0] == 7 and result.indices[7, 0] == 3
    assert (result.indices != torch.arange(12)[:, None]).all()  # never its own match
    counts = duplicate_counts(features, own, threshold=0.95)
    brute = [(i, j) for i in range(12) for j in range(i + 1, 12) if sims[i, j] > 0.95]
    assert brute == [(3, 7)]
    assert counts.tolist() == (sims > 0.95).sum(dim=1).tolist()
    assert torch.nonzero(counts).flatten().tolist() == [3, 7]
    assert int((counts > 0).sum()) == 2


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
    found = top_matches(queries, gallery, 4, mirrored=mirrored)
    best, flipped = _brute_mirror(queries, gallery, mirrored, None)
    order = np.argsort(-best, axis=1, kind="stable")[:, :4]
    assert np.array_equal(found.indices.numpy(), order)
    assert np.allclose(found.scores.numpy(), np.take_along_axis(best, order, 1), atol=1e-5)
    assert np.array_equal(found.mirrored.numpy(), np.take_along_axis(flipped, order, 1))
    assert found.indices[4, 0] == 5 and bool(found.mirrored[4, 0])
    assert found.scores[4, 0] == pytest.approx(1.0, abs=1e-5)
    # every row listed once even though it is in the search twice (as itself and as its mirror)
    assert all(len(set(row)) == 4 for row in found.indices.tolist())


def test_mirror_aware_baseline_leaves_out_own_mirror() -> None:
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(6, 5, generator=generator)
    mirrored = features.clone()  # symmetric images: each one's mirror is itself
    mirrored[2] = features[4]  # the mirror of image 2 looks like image 4
    own = torch.arange(6)
    result = top_matches(features, features, 3, mirrored=mirrored, query_rows=own, own_rows=own)
    best, _ = _brute_mirror(features, features, mirrored, list(range(6)))
    assert np.allclose(result.scores.numpy(), -np.sort(-best, axis=1)[:, :3], atol=1e-5)
    assert (result.indices != torch.arange(6)[:, None]).all()
    assert result.indices[4, 0] == 2 and result.scores[4, 0] == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(self_similarity_baseline(features, mirrored=mirrored), result.scores[:, 0])
    small = top_matches(features[:2], features[:2], 1, mirrored=mirrored[:2], query_rows=own[:2], own_rows=own[:2])
    assert small.indices.tolist() == [[1], [0]]  # only the other image remains, through either twin


def test_self_similarity_needs_two_images() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        self_similarity_baseline(torch.randn(1, 4))


def test_sampled_baseline_is_the_exact_one_on_its_rows() -> None:
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(30, 6, generator=generator)
    sample = baseline_rows(30, 7, seed=5)
    assert not sample.exact and sample.label == "sampled: 7 of 30 training images (seed 5)"
    assert baseline_rows(30, None).label == "exact: all 30 training images"
    sampled = self_similarity_baseline(features, sample.rows)
    sims = cosine_scores(features, features)
    np.fill_diagonal(sims, -np.inf)
    assert np.allclose(sampled.numpy(), sims.max(axis=1)[sample.rows.numpy()], atol=1e-5)


def test_duplicate_counts_are_exhaustive_and_mirror_aware() -> None:
    """A group of 15 copies: each has 14 duplicates, whatever k a search would use; mirror-aware
    counts match a numpy reference; blocks and query chunks do not change the counts."""
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(40, 8, generator=generator)
    features[10:25] = features[10] * torch.linspace(1.0, 2.0, 15)[:, None]  # 15 copies (cosine 1)
    mirrored = torch.randn(40, 8, generator=generator)
    mirrored[3] = features[30] * 1.5  # image 3 mirrored looks like image 30
    rows = torch.arange(40)
    reference = (cosine_scores(features, features) > 0.95)
    np.fill_diagonal(reference, False)
    counts = duplicate_counts(features, rows, threshold=0.95)
    assert counts.tolist() == reference.sum(axis=1).tolist()
    assert counts[10:25].tolist() == [14] * 15
    best, _ = _brute_mirror(features, features, mirrored, list(range(40)))
    mirror_counts = duplicate_counts(features, rows, mirrored=mirrored, threshold=0.95)
    assert mirror_counts.tolist() == (best > 0.95).sum(axis=1).tolist()
    assert mirror_counts[30] == 1 + counts[30]  # image 30 duplicates image 3's mirror
    small = SearchSettings(block_rows=7, chunk_bytes=4 * 8 * 3)
    assert torch.equal(duplicate_counts(features, rows, mirrored=mirrored, threshold=0.95, settings=small),
                       mirror_counts)
    tokens = torch.randn(12, 3, 4, generator=generator)
    tokens[5] = tokens[2] * 3.0
    q = tokens.double() / tokens.double().norm(dim=-1, keepdim=True)
    split = (q[:, None] * q[None, :]).sum(-1).max(dim=-1).values  # split-product with token normalisation
    split.fill_diagonal_(float("-inf"))
    assert duplicate_counts(tokens, torch.arange(12), threshold=0.95).tolist() == (split > 0.95).sum(dim=1).tolist()


def test_top_matches_over_blocks_and_chunks_equals_one_pass() -> None:
    """A row source read in blocks and queries searched in chunks give the one-pass lists."""
    generator = torch.Generator().manual_seed(7)
    training = torch.randn(23, 6, generator=generator)
    mirrored = torch.randn(23, 6, generator=generator)
    queries = torch.randn(9, 6, generator=generator)
    whole = top_matches(queries, training, 4, mirrored=mirrored)
    pieces = top_matches(TensorRows(queries), TensorRows(training), 4, mirrored=TensorRows(mirrored),
                         settings=SearchSettings(block_rows=5, chunk_bytes=4 * 6 * 2))
    for name in ("scores", "indices", "mirrored"):
        assert torch.equal(getattr(whole, name), getattr(pieces, name)), name
    both = MirroredRows(TensorRows(training), TensorRows(mirrored))
    assert both.num_rows == 46 and torch.equal(torch.as_tensor(both.rows(np.array([24, 1]))),
                                               torch.stack([mirrored[1], training[1]]))
    with pytest.raises(ValueError, match="row for row"):
        MirroredRows(TensorRows(training), TensorRows(mirrored[:5]))


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


# ------------------------------------------------------------- moved from tests/test_scan_analysis.py


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
