"""Reference tests for lit.metrics.

Independent references: scikit-learn (AP with every positive retrieved), a
plain-Python brute force per query (partial retrieval, junk), a direct port of
revisitop's ``compute_map``/``compute_ap`` (revisited AP), torchmetrics'
retrieval metrics (per query, via an identity aggregation), and hand-computed
cases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score
from torchmetrics.retrieval import (
    RetrievalHitRate,
    RetrievalMAP,
    RetrievalMRR,
    RetrievalPrecision,
    RetrievalRecall,
)

from lit.metrics import (
    RetrievalMetrics,
    average_precision,
    hit_rate_at_k,
    precision_at_k,
    ranking_relevance,
    recall_at_k,
    reciprocal_rank,
    retrieval_metrics,
    revisited_average_precision,
)

KS = (1, 3, 5, 10)


# ----------------------------------------------------------------------------
# random retrieval problems and independent references
# ----------------------------------------------------------------------------


@dataclass
class Problem:
    ranked: torch.Tensor  # (Q, K) gallery ids, -1 = empty slot
    positives: list[list[int]]
    junk: list[list[int]]

    @property
    def relevance(self) -> torch.Tensor:
        return ranking_relevance(self.ranked, self.positives)

    @property
    def junk_mask(self) -> torch.Tensor:
        return ranking_relevance(self.ranked, self.junk)

    @property
    def num_positives(self) -> torch.Tensor:
        return torch.tensor([len(p) for p in self.positives])


def make_problem(
    seed: int,
    num_queries: int = 40,
    gallery: int = 30,
    length: int = 20,
    max_positives: int = 5,
    max_junk: int = 3,
    empty_slots: int = 0,
) -> Problem:
    """Random rankings; some positives fall outside the top ``length`` (never retrieved)."""
    rng = random.Random(seed)
    ranked, positives, junk = [], [], []
    for _ in range(num_queries):
        order = rng.sample(range(gallery), gallery)
        chosen = rng.sample(range(gallery), rng.randint(1, max_positives) + rng.randint(0, max_junk))
        n_pos = max(1, len(chosen) - rng.randint(0, max_junk))
        positives.append(sorted(chosen[:n_pos]))
        junk.append(sorted(chosen[n_pos:]))
        row = order[: length - empty_slots] + [-1] * empty_slots
        ranked.append(row)
    return Problem(torch.tensor(ranked), positives, junk)


def brute_force(row: list[int], positives: list[int], junk: list[int], ks=KS) -> dict[str, float]:
    """Per-query metrics straight from the definitions, one item at a time."""
    kept = [g for g in row if g not in junk]
    R = len(positives)
    hits, ap, rr = 0, 0.0, 0.0
    for rank, g in enumerate(kept, start=1):
        if g in positives:
            hits += 1
            ap += hits / rank
            if rr == 0.0:
                rr = 1.0 / rank
    out = {"mAP": ap / R, "MRR": rr}
    for k in ks:
        found = sum(g in positives for g in kept[:k])
        out[f"recall@{k}"] = found / R
        out[f"hit_rate@{k}"] = float(found > 0)
        out[f"precision@{k}"] = found / k
    return out


def revisitop_compute_ap(ranks: np.ndarray, nres: int) -> float:
    """Port of revisitop ``compute_ap``: ranks are 0-based positions of the positives."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j in range(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def revisitop_query_ap(row: list[int], positives: list[int], junk: list[int]) -> float:
    """Port of the per-query body of revisitop ``compute_map`` (junk shifts positive positions)."""
    row_np = np.array(row)
    pos = np.arange(row_np.shape[0])[np.isin(row_np, positives)]
    junk_pos = np.arange(row_np.shape[0])[np.isin(row_np, junk)]
    k, ij = 0, 0
    if len(junk_pos):
        ip = 0
        while ip < len(pos):
            while ij < len(junk_pos) and pos[ip] > junk_pos[ij]:
                k += 1
                ij += 1
            pos[ip] = pos[ip] - k
            ip += 1
    return revisitop_compute_ap(pos, len(positives))


# ----------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------


def test_ap_matches_sklearn_when_all_positives_retrieved() -> None:
    gen = torch.Generator().manual_seed(0)
    relevance = torch.rand(50, 30, generator=gen) < 0.2
    relevance[:, 17] |= ~relevance.any(dim=1)  # every query has a positive
    num_positives = relevance.sum(dim=1)
    ours = average_precision(relevance, num_positives)
    scores = np.arange(30, 0, -1, dtype=np.float64)  # strictly descending: the given order
    expected = [average_precision_score(row.numpy(), scores) for row in relevance]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("with_junk", [False, True])
@pytest.mark.parametrize("empty_slots", [0, 4])
def test_metrics_match_brute_force_with_missing_positives(with_junk: bool, empty_slots: int) -> None:
    p = make_problem(seed=1 + empty_slots, empty_slots=empty_slots)
    junk = p.junk_mask if with_junk else None
    junk_lists = p.junk if with_junk else [[] for _ in p.positives]
    relevance, num_positives = p.relevance, p.num_positives
    assert (relevance.sum(1) < num_positives).any(), "test data must miss some positives"
    refs = [brute_force(r, pos, j) for r, pos, j in zip(p.ranked.tolist(), p.positives, junk_lists)]
    ours = {
        "mAP": average_precision(relevance, num_positives, junk),
        "MRR": reciprocal_rank(relevance, junk),
    }
    for k in KS:
        ours[f"recall@{k}"] = recall_at_k(relevance, num_positives, k, junk)
        ours[f"hit_rate@{k}"] = hit_rate_at_k(relevance, k, junk)
        ours[f"precision@{k}"] = precision_at_k(relevance, k, junk)
    for name, values in ours.items():
        expected = [ref[name] for ref in refs]
        np.testing.assert_allclose(values.numpy(), expected, atol=1e-12, err_msg=name)
    means = retrieval_metrics(relevance, num_positives, junk, ks=KS)
    assert set(means) == set(ours)
    for name, value in means.items():
        assert value == pytest.approx(float(np.mean([ref[name] for ref in refs])), abs=1e-12)


@pytest.mark.parametrize("with_junk", [False, True])
def test_revisited_ap_matches_revisitop_port(with_junk: bool) -> None:
    p = make_problem(seed=7, num_queries=60, max_junk=4)
    junk_lists = p.junk if with_junk else [[] for _ in p.positives]
    ours = revisited_average_precision(p.relevance, p.num_positives, p.junk_mask if with_junk else None)
    lists = zip(p.ranked.tolist(), p.positives, junk_lists)
    expected = [revisitop_query_ap(row, pos, junk) for row, pos, junk in lists]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-12)
    mean = retrieval_metrics(p.relevance, p.num_positives, p.junk_mask if with_junk else None, ap="revisited")
    assert mean["mAP"] == pytest.approx(float(np.mean(expected)), abs=1e-12)


def _identity(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """torchmetrics aggregation that returns the per-query values (in index order)."""
    return values


def _torchmetrics_inputs(p: Problem, append_missing: bool) -> tuple[torch.Tensor, ...]:
    """Flattened (preds, target, indexes) in torchmetrics' format.

    preds = K - rank (strictly positive, descending: torchmetrics >= 1.8 ignores
    items with preds <= 0). Junk items get target -100 (``ignore_index``), so
    torchmetrics drops them from the list, as the revisited protocol does.
    With ``append_missing``, positives outside the list are added with preds 0:
    they count in torchmetrics' recall denominator but are never retrieved.
    """
    ranked = p.ranked.tolist()
    length = p.ranked.shape[1]
    preds, target, indexes = [], [], []
    for q, (row, pos, junk) in enumerate(zip(ranked, p.positives, p.junk)):
        for rank, g in enumerate(row):
            preds.append(float(length - rank))
            target.append(-100 if g in junk else int(g in pos))
            indexes.append(q)
        if append_missing:
            for g in set(pos) - set(row):
                preds.append(0.0)
                target.append(1)
                indexes.append(q)
    return torch.tensor(preds), torch.tensor(target), torch.tensor(indexes)


def _per_query(metric, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    preds, target, indexes = inputs
    metric.update(preds, target, indexes=indexes)
    return metric.compute().double().numpy()


def test_metrics_match_torchmetrics_per_query() -> None:
    # ks <= K - max junk, so appended (missing) positives never enter a top k in any torchmetrics version
    p = make_problem(seed=3, num_queries=60, gallery=40, length=25, max_positives=6, max_junk=3)
    ks = (1, 5, 10, 20)
    relevance, num_positives, junk = p.relevance, p.num_positives, p.junk_mask
    retrieved = relevance.sum(1)
    assert (retrieved < num_positives).any() and (retrieved == 0).any()
    listed = _torchmetrics_inputs(p, append_missing=False)
    with_missing = _torchmetrics_inputs(p, append_missing=True)
    kw = dict(ignore_index=-100, aggregation=_identity)

    # MRR, HitRate@k, P@k: only the ranked list matters
    np.testing.assert_allclose(
        reciprocal_rank(relevance, junk).numpy(), _per_query(RetrievalMRR(**kw), listed), atol=1e-6
    )
    for k in ks:
        np.testing.assert_allclose(
            hit_rate_at_k(relevance, k, junk).numpy(),
            _per_query(RetrievalHitRate(top_k=k, **kw), listed),
            atol=1e-6,
        )
        np.testing.assert_allclose(
            precision_at_k(relevance, k, junk).numpy(),
            _per_query(RetrievalPrecision(top_k=k, **kw), listed),
            atol=1e-6,
        )
        # Recall@k divides by all positives: torchmetrics does so once the missing ones are in its input
        np.testing.assert_allclose(
            recall_at_k(relevance, num_positives, k, junk).numpy(),
            _per_query(RetrievalRecall(top_k=k, **kw), with_missing),
            atol=1e-6,
        )
    # torchmetrics' AP averages over the positives in its list (retrieved ones);
    # ours divides by all R positives, so ours = theirs * retrieved / R.
    theirs = _per_query(RetrievalMAP(**kw), listed)
    ours = average_precision(relevance, num_positives, junk).numpy()
    np.testing.assert_allclose(ours, theirs * retrieved.numpy() / num_positives.numpy(), atol=1e-6)
    assert not np.allclose(ours, theirs), "the difference must be exercised"


def test_map_equals_torchmetrics_mean_when_all_positives_retrieved() -> None:
    p = make_problem(seed=5, num_queries=80, gallery=25, length=25, max_junk=0)  # full ranked lists
    assert torch.equal(p.relevance.sum(1), p.num_positives)
    preds, target, indexes = _torchmetrics_inputs(p, append_missing=False)
    theirs = RetrievalMAP()
    theirs.update(preds, target, indexes=indexes)
    ours = retrieval_metrics(p.relevance, p.num_positives)["mAP"]
    assert ours == pytest.approx(float(theirs.compute()), abs=1e-6)


# ----------------------------------------------------------------------------
# hand-computed cases
# ----------------------------------------------------------------------------


def test_hand_computed_list() -> None:
    # positives at ranks 2 and 4, a third positive never retrieved
    relevance = torch.tensor([[False, True, False, True]])
    three = torch.tensor([3])
    assert average_precision(relevance, three).item() == pytest.approx((1 / 2 + 2 / 4) / 3)
    assert average_precision(relevance, torch.tensor([2])).item() == pytest.approx(0.5)
    # revisited: j=0, rank0=1 -> (0/1 + 1/2)/2 ; j=1, rank0=3 -> (1/3 + 2/4)/2 ; each times 1/R
    expected_rev = ((0 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2
    assert revisited_average_precision(relevance, torch.tensor([2])).item() == pytest.approx(expected_rev)
    assert reciprocal_rank(relevance).item() == pytest.approx(0.5)
    assert recall_at_k(relevance, three, 2).item() == pytest.approx(1 / 3)
    assert recall_at_k(relevance, three, 4).item() == pytest.approx(2 / 3)
    assert precision_at_k(relevance, 4).item() == pytest.approx(0.5)
    assert precision_at_k(relevance, 10).item() == pytest.approx(0.2)  # divides by k, not by the list length


def test_first_positive_beyond_k() -> None:
    relevance = torch.tensor([[False, False, False, True, False]])
    one = torch.tensor([1])
    assert hit_rate_at_k(relevance, 3).item() == 0.0
    assert recall_at_k(relevance, one, 3).item() == 0.0
    assert precision_at_k(relevance, 3).item() == 0.0
    assert hit_rate_at_k(relevance, 4).item() == 1.0
    assert reciprocal_rank(relevance).item() == pytest.approx(1 / 4)
    assert average_precision(relevance, one).item() == pytest.approx(1 / 4)


def test_positives_never_retrieved_score_zero() -> None:
    relevance = torch.zeros(2, 5, dtype=torch.bool)
    relevance[1, 0] = True
    num_positives = torch.tensor([2, 1])
    metrics = retrieval_metrics(relevance, num_positives, ks=(1,))
    assert metrics["mAP"] == pytest.approx(0.5)
    assert metrics["MRR"] == pytest.approx(0.5)
    assert metrics["recall@1"] == pytest.approx(0.5)
    assert average_precision(relevance, num_positives)[0].item() == 0.0


def test_junk_in_the_middle_is_removed_before_ranking() -> None:
    # ranked: miss, junk, positive, junk, positive
    relevance = torch.tensor([[False, False, True, False, True]])
    junk = torch.tensor([[False, True, False, True, False]])
    two = torch.tensor([2])
    # after junk removal: miss, positive, positive -> ranks 2 and 3
    assert average_precision(relevance, two, junk).item() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert reciprocal_rank(relevance, junk).item() == pytest.approx(1 / 2)
    assert recall_at_k(relevance, two, 2, junk).item() == pytest.approx(1 / 2)
    assert recall_at_k(relevance, two, 3, junk).item() == pytest.approx(1.0)
    assert hit_rate_at_k(relevance, 1, junk).item() == 0.0
    assert precision_at_k(relevance, 3, junk).item() == pytest.approx(2 / 3)
    # without the junk mask the same list scores lower
    assert average_precision(relevance, two).item() == pytest.approx((1 / 3 + 2 / 5) / 2)
    expected_rev = revisitop_compute_ap(np.array([1, 2]), 2)
    assert revisited_average_precision(relevance, two, junk).item() == pytest.approx(expected_rev)


def test_ties_are_taken_in_the_given_order() -> None:
    # gallery rows 1 and 2 tie; the search breaks ties by ascending row, so row 1 ranks first
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9]])
    order = torch.sort(-scores, dim=1, stable=True).indices  # rows [3, 1, 2, 0]
    assert order.tolist() == [[3, 1, 2, 0]]
    relevance = ranking_relevance(order, [[2]])
    assert average_precision(relevance, torch.tensor([1])).item() == pytest.approx(1 / 3)
    swapped = ranking_relevance(torch.tensor([[3, 2, 1, 0]]), [[2]])
    assert average_precision(swapped, torch.tensor([1])).item() == pytest.approx(1 / 2)


@pytest.mark.parametrize("scale", [1, 100_000])  # dense lookup table / sorted-key path
@pytest.mark.parametrize("block_items", [1 << 22, 50])  # one block / many row blocks
def test_ranking_relevance_matches_set_membership(scale: int, block_items: int, monkeypatch) -> None:
    monkeypatch.setattr("lit.metrics._BLOCK_ITEMS", block_items)
    p = make_problem(seed=11, empty_slots=3)
    ranked = torch.where(p.ranked >= 0, p.ranked * scale, -1)
    positives = [[g * scale for g in pos] for pos in p.positives]
    relevance = ranking_relevance(ranked, positives)
    expected = [[g in set(pos) for g in row] for row, pos in zip(ranked.tolist(), positives)]
    assert relevance.tolist() == expected
    assert relevance.any() and not relevance[:, -3:].any()  # -1 slots never match
    empty = ranking_relevance(ranked, [[] for _ in positives])
    assert empty.shape == ranked.shape and not empty.any()


# ----------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------

REL = torch.tensor([[True, False], [False, True], [False, False]])
NPOS = torch.tensor([1, 1, 1])


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: average_precision(REL, torch.tensor([1, 1])), ValueError, "shape"),
        (lambda: average_precision(REL, torch.tensor([1, 0, 0])), ValueError, "2 of 3 queries"),
        (lambda: average_precision(REL, torch.tensor([1, 1, 1.0])), TypeError, "integer"),
        (lambda: average_precision(REL.int(), NPOS), TypeError, "bool"),
        (lambda: average_precision(REL[0], NPOS), ValueError, r"\(Q, K\)"),
        (lambda: average_precision(torch.ones(3, 2, dtype=torch.bool), NPOS), ValueError, "more positives"),
        (lambda: average_precision(REL, NPOS, torch.zeros(3, 3, dtype=torch.bool)), ValueError, "junk shape"),
        (lambda: average_precision(REL, NPOS, REL.clone()), ValueError, "both positive and junk"),
        (lambda: recall_at_k(REL, NPOS, 0), ValueError, "k must be"),
        (lambda: hit_rate_at_k(REL, -1), ValueError, "k must be"),
        (lambda: precision_at_k(REL, 0), ValueError, "k must be"),
        (lambda: retrieval_metrics(REL, NPOS, ks=()), ValueError, "at least one"),
        (lambda: retrieval_metrics(REL, NPOS, ks=(1, 0)), ValueError, "k must be"),
        (lambda: retrieval_metrics(REL, NPOS, ap="interpolated"), ValueError, "ap must be"),
        (lambda: retrieval_metrics(REL[:0], NPOS[:0]), ValueError, "at least one query"),
        (lambda: ranking_relevance(torch.tensor([[0, 1]]), [[0], [1]]), ValueError, "2 lists for 1"),
        (lambda: ranking_relevance(torch.tensor([[0, -2]]), [[0]]), ValueError, "-1 marks"),
        (lambda: ranking_relevance(torch.tensor([[0.0, 1.0]]), [[0]]), TypeError, "integer tensor"),
        (lambda: ranking_relevance(torch.tensor([[0, 1]]), [[-3]]), ValueError, "negative"),
        (lambda: RetrievalMetrics(ks=(0,)), ValueError, "k must be"),
    ],
)
def test_bad_input_raises_clear_error(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------
# RetrievalMetrics accumulator
# ----------------------------------------------------------------------------


def _accumulate(metric: RetrievalMetrics, order: torch.Tensor, p: Problem, batch: int) -> dict[str, float]:
    relevance, num_positives, junk = p.relevance, p.num_positives, p.junk_mask
    for start in range(0, order.numel(), batch):
        rows = order[start : start + batch]
        metric.update(rows, relevance[rows], num_positives[rows], junk[rows])
    return {name: float(value) for name, value in metric.compute().items()}


@pytest.mark.parametrize("ap", ["standard", "revisited"])
def test_accumulator_ignores_padding_duplicates_and_order(ap: str) -> None:
    p = make_problem(seed=13, num_queries=23)
    expected = retrieval_metrics(p.relevance, p.num_positives, p.junk_mask, ks=KS, ap=ap)
    clean = _accumulate(RetrievalMetrics(ks=KS, ap=ap), torch.arange(23), p, batch=5)
    gen = torch.Generator().manual_seed(0)
    repeats = torch.tensor([4, 0, 4, 22])  # DistributedSampler-style padding
    padded = torch.cat([torch.randperm(23, generator=gen), repeats])
    messy = _accumulate(RetrievalMetrics(ks=KS, ap=ap), padded, p, batch=4)
    assert clean.keys() == expected.keys() == messy.keys()
    for name in expected:
        assert clean[name] == pytest.approx(expected[name], abs=1e-12), name
        assert messy[name] == pytest.approx(expected[name], abs=1e-12), name


def test_accumulator_accepts_lists_of_different_length() -> None:
    p = make_problem(seed=17, num_queries=10)
    expected = retrieval_metrics(p.relevance, p.num_positives, p.junk_mask, ks=KS)
    metric = RetrievalMetrics(ks=KS)
    metric.update(torch.arange(5), p.relevance[:5], p.num_positives[:5], p.junk_mask[:5])
    pad = torch.zeros(5, 7, dtype=torch.bool)  # longer lists: a non-relevant tail changes nothing
    metric.update(
        torch.arange(5, 10),
        torch.cat([p.relevance[5:], pad], 1),
        p.num_positives[5:],
        torch.cat([p.junk_mask[5:], pad], 1),
    )
    result = metric.compute()
    for name, value in expected.items():
        assert float(result[name]) == pytest.approx(value, abs=1e-12), name


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric RetrievalMetrics was called before")
def test_accumulator_without_junk_and_reset() -> None:
    p = make_problem(seed=19, num_queries=9, max_junk=0)
    metric = RetrievalMetrics(ks=(1, 5))
    metric.update(torch.arange(9), p.relevance, p.num_positives)
    assert float(metric.compute()["mAP"]) == pytest.approx(
        retrieval_metrics(p.relevance, p.num_positives, ks=(1, 5))["mAP"], abs=1e-12
    )
    metric.reset()
    with pytest.raises(ValueError, match="at least one update"):
        metric.compute()


def test_accumulator_rejects_bad_update() -> None:
    metric = RetrievalMetrics()
    with pytest.raises(ValueError, match="query_index shape"):
        metric.update(torch.arange(2), REL, NPOS)
    with pytest.raises(TypeError, match="query_index"):
        metric.update(torch.zeros(3), REL, NPOS)
    with pytest.raises(ValueError, match="num_positives < 1"):
        metric.update(torch.arange(3), REL, torch.tensor([1, 1, 0]))
