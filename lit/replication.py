"""Replication statistics (paper Sec. 5 and 7): pure functions of similarity scores.

Definitions:

- **top-1 similarity** of a generation: its largest similarity to any training image;
- **self-similarity baseline**: for each training image, its largest similarity
  to any *other* training image (what "similar" means inside the data itself);
- **replication rate at t**: fraction of generations whose top-1 similarity
  *exceeds* t (strictly; the paper reports t = 0.5 with SSCD);
- **duplicates**: pairs of training images with similarity > 0.95 (Sec. 7).

Mirror-aware matching (:func:`mirror_aware_search`): a DDPM trained with random
horizontal flips reproduces training images mirrored as often as not, and a
flip-sensitive descriptor (raw pixels, most CNN features) misses those copies.
With the mirrored training features given, a training image scores the larger of
its similarity and its mirror's similarity to the query.

Summaries use linear-interpolation quantiles (numpy's default), so the median of
an even count is the mean of the two middle values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lit.search import SearchResult, search
from lit.similarity import SimilarityKind, TokenNormalization

DUPLICATE_THRESHOLD = 0.95


@dataclass(frozen=True)
class ReplicationStats:
    """Rates at thresholds and the summary of a set of top-1 similarities."""

    count: int
    rates: dict[float, float]
    mean: float
    median: float
    p95: float
    max: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat scalars: ``{prefix}rate@{t}`` and ``{prefix}top1_{mean,median,p95,max}``."""
        values = [*self.rates.values(), self.mean, self.median, self.p95, self.max]
        return dict(zip(stat_names(self.rates, prefix), values))


def stat_names(thresholds: Sequence[float], prefix: str = "") -> list[str]:
    """Names of :meth:`ReplicationStats.as_dict`'s scalars, in order, for these thresholds."""
    return [f"{prefix}rate@{format_threshold(t)}" for t in thresholds] + [
        f"{prefix}top1_{name}" for name in ("mean", "median", "p95", "max")]


def format_threshold(threshold: float) -> str:
    """``0.5`` -> ``"0.5"``, ``0.95`` -> ``"0.95"`` (stable metric names)."""
    return f"{threshold:g}"


def _check_scores(scores: Tensor) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a Tensor, got {type(scores).__name__}")
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D (one top-1 similarity per item), got shape {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError("scores is empty: no generations or training images to summarise")
    scores = scores.detach().double()
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf (e.g. a gallery with a single image has no self-match)")
    return scores


def replication_rates(scores: Tensor, thresholds: Sequence[float]) -> dict[float, float]:
    """Fraction of ``scores`` strictly above each threshold."""
    return _rates(_check_scores(scores), thresholds)


def _rates(checked: Tensor, thresholds: Sequence[float]) -> dict[float, float]:
    return {float(t): float((checked > t).double().mean()) for t in thresholds}


def replication_stats(scores: Tensor, thresholds: Sequence[float]) -> ReplicationStats:
    """Rates at ``thresholds`` plus mean / median / 95th percentile / max of ``scores``."""
    scores = _check_scores(scores)
    median, p95 = torch.quantile(scores, torch.tensor([0.5, 0.95], dtype=scores.dtype)).tolist()
    return ReplicationStats(
        count=int(scores.numel()),
        rates=_rates(scores, thresholds),
        mean=float(scores.mean()),
        median=float(median),
        p95=float(p95),
        max=float(scores.max()),
    )


def self_similarity(
    features: Tensor,
    k: int = 1,
    similarity: SimilarityKind = "cosine",
    normalization: TokenNormalization = "token",
    mirrored: Tensor | None = None,
) -> SearchResult:
    """Each training item's top-``k`` matches among the *other* items (``lit.search.self_search``).

    ``scores[:, 0]`` is the self-similarity baseline. With ``mirrored`` (features of
    the horizontally flipped items) matching is mirror-aware (:func:`mirror_aware_search`;
    an item's own mirror is left out too).
    """
    if features.shape[0] < 2:
        raise ValueError(f"the self-similarity baseline needs at least 2 training images, got {features.shape[0]}")
    k = min(k, features.shape[0] - 1)
    return mirror_aware_search(features, features, mirrored, k, own_rows=torch.arange(features.shape[0]),
                               similarity=similarity, normalization=normalization).result


@dataclass(frozen=True)
class MirrorAwareResult:
    """Top-k training rows (``result``) and whether each match was the mirrored image."""

    result: SearchResult
    mirrored: Tensor  # (Q, k) bool


def mirror_aware_search(
    queries: Tensor,
    gallery: Tensor,
    mirrored: Tensor | None,
    k: int,
    *,
    own_rows: Tensor | None = None,
    similarity: SimilarityKind = "cosine",
    normalization: TokenNormalization = "token",
) -> MirrorAwareResult:
    """Top-``k`` gallery rows where row g scores ``max(s(q, g), s(q, mirror(g)))``.

    ``mirrored`` holds the features of the horizontally flipped gallery images, row
    for row; ``None`` searches the gallery alone (no match is mirrored). ``own_rows``
    (Q,) names a gallery row to leave out per query (with its mirror): the
    self-match of a self-similarity search; -1 for none. Ties keep ``lit.search``'s
    order (ascending row, the original before its mirror).
    """
    if mirrored is None:
        found = search(queries, gallery, k=k, similarity=similarity, normalization=normalization, exclude=own_rows)
        return MirrorAwareResult(found, torch.zeros_like(found.indices, dtype=torch.bool))
    if mirrored.shape != gallery.shape:
        raise ValueError(f"mirrored features {tuple(mirrored.shape)} must match the gallery {tuple(gallery.shape)}")
    rows_total = gallery.shape[0]
    extra = 0 if own_rows is None else 2
    found = search(queries, torch.cat([gallery, mirrored]), k=min(2 * k + extra, 2 * rows_total),
                   similarity=similarity, normalization=normalization)
    rows = torch.where(found.indices >= 0, found.indices % rows_total, found.indices)
    flipped = found.indices >= rows_total
    drop = rows < 0
    if own_rows is not None:
        drop |= rows == own_rows.to(rows.dtype)[:, None]
    width = rows.shape[1]
    earlier = torch.ones(width, width, dtype=torch.bool).tril(diagonal=-1)  # [i, j]: j before i
    repeated = ((rows[:, :, None] == rows[:, None, :]) & earlier & ~drop[:, None, :]).any(dim=2)
    drop |= repeated  # a row already listed through its better-scoring twin
    order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)[:, :k]  # kept entries first, in score order
    scores = torch.where(drop, torch.tensor(float("-inf")), found.scores).gather(1, order)
    rows = torch.where(drop, torch.tensor(-1), rows).gather(1, order)
    flipped = (flipped & ~drop).gather(1, order)
    if scores.shape[1] < k:  # fewer candidates than k: pad like lit.search
        pad = k - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], dim=1)
        rows = torch.cat([rows, rows.new_full((rows.shape[0], pad), -1)], dim=1)
        flipped = torch.cat([flipped, flipped.new_zeros((flipped.shape[0], pad))], dim=1)
    return MirrorAwareResult(SearchResult(scores, rows), flipped)


def duplicate_pairs(result: SearchResult, threshold: float = DUPLICATE_THRESHOLD) -> list[tuple[int, int, float]]:
    """Unordered pairs ``(i, j, score)`` with ``i < j`` and similarity > ``threshold``, from a self-search.

    Pairs beyond each row's top-k are not seen: use a ``k`` at least as large as
    the biggest duplicate group (``images_with_duplicates`` is exact for any k).
    """
    rows, cols = torch.nonzero(result.scores > threshold, as_tuple=True)
    pairs: dict[tuple[int, int], float] = {}
    for r, c in zip(rows.tolist(), cols.tolist()):
        j = int(result.indices[r, c])
        if j < 0:
            continue
        key = (min(r, j), max(r, j))
        pairs[key] = max(pairs.get(key, float("-inf")), float(result.scores[r, c]))
    return [(i, j, s) for (i, j), s in sorted(pairs.items())]


def images_with_duplicates(baseline: Tensor, threshold: float = DUPLICATE_THRESHOLD) -> int:
    """Training images whose nearest other image scores above ``threshold``."""
    return int((_check_scores(baseline) > threshold).sum())


def top_copies(scores: Tensor, count: int) -> Tensor:
    """Rows of the ``count`` highest top-1 scores, highest first (ties: lower row first)."""
    scores = _check_scores(scores)
    return torch.sort(scores, descending=True, stable=True).indices[:count]
