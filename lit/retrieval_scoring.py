"""Queries + gallery features + a retrieval set -> ranked lists and their relevance.

The one scoring path of ``lit test`` (:class:`models.retrieval.RetrievalEvaluator`)
and of the retrieval-metrics callback (:class:`callbacks.retrieval.RetrievalMetricsCallback`):
search with :func:`lit.search.search` (a query's own gallery row excluded, from
``RetrievalSet.exclude``), map gallery rows back to the set's gallery ids (rows
shift when an image failed to load), drop positives that failed to load from the
ground truth, and mark positives and junk in each ranked list. The result feeds
:class:`lit.metrics.RetrievalMetrics` directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit.choices import SimilarityKind, TokenNormalization
from lit.metrics import ranking_relevance
from lit.search import search


@dataclass(frozen=True)
class ScoredQueries:
    """Per-query ranked lists of the queries that have at least one loaded positive (CPU tensors).

    ``query_ids`` (Q,) global query ids; ``ranked`` (Q, k) gallery ids best first, -1 for
    an empty slot; ``relevance`` / ``junk`` (Q, k) bool; ``num_positives`` (Q,) int64.
    """

    query_ids: Tensor
    ranked: Tensor
    relevance: Tensor
    num_positives: Tensor
    junk: Tensor | None

    def __len__(self) -> int:
        return int(self.query_ids.numel())


def score_queries(
    query_ids: Tensor,
    query_features: Tensor,
    gallery_ids: Tensor,
    gallery_features: Tensor,
    retrieval_set: Any,
    *,
    k: int,
    similarity: SimilarityKind,
    normalization: TokenNormalization = "token",
) -> ScoredQueries:
    """Search ``query_features`` against the gallery and mark each ranked list's positives.

    ``gallery_ids`` must be ascending (as :func:`lit.distributed.gather_by_index`
    returns them); ``k`` is clipped to the gallery size. Queries none of whose
    positives could be loaded are left out (a descriptor cannot find them).
    """
    query_ids, gallery_ids = query_ids.cpu(), gallery_ids.cpu()
    exclude = None
    if retrieval_set.query_in_gallery is not None:
        exclude = rows_of(retrieval_set.exclude[query_ids], gallery_ids)
    result = search(
        query_features.cpu(),
        gallery_features.cpu(),
        min(k, int(gallery_ids.numel())),
        similarity=similarity,
        normalization=normalization,
        exclude=exclude,
    )
    # gallery rows -> the dataset's gallery ids (rows shift when an image was skipped)
    valid = result.indices >= 0
    ranked = torch.where(valid, gallery_ids[result.indices.clamp(min=0)], -1)
    # a positive that failed to load cannot be found: drop it from the ground
    # truth (counted in the report) rather than charge it to the descriptor
    loaded = set(gallery_ids.tolist())
    positives = [[g for g in retrieval_set.positives[q] if g in loaded] for q in query_ids.tolist()]
    keep = torch.tensor([len(p) > 0 for p in positives], dtype=torch.bool)
    positives = [p for p in positives if p]
    ranked, kept_ids = ranked[keep], query_ids[keep]
    relevance = ranking_relevance(ranked, positives)
    junk = None
    if retrieval_set.junk is not None:
        junk = ranking_relevance(ranked, [retrieval_set.junk[q] for q in kept_ids.tolist()])
    num_positives = torch.tensor([len(p) for p in positives], dtype=torch.long)
    return ScoredQueries(kept_ids, ranked, relevance, num_positives, junk)


def rows_of(ids: Tensor, sorted_ids: Tensor) -> Tensor:
    """Row of each id in ``sorted_ids`` (ascending), or -1 where it is absent."""
    rows = torch.searchsorted(sorted_ids, ids.clamp(min=0))
    rows = rows.clamp(max=max(sorted_ids.numel() - 1, 0))
    found = (ids >= 0) & (sorted_ids[rows] == ids)
    return torch.where(found, rows, torch.full_like(rows, -1))
