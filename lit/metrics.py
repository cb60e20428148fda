"""Retrieval metrics on ranked lists: mAP, Recall@k, HitRate@k, P@k, MRR.

Every function takes a boolean ``relevance`` matrix ``(Q, K)``: row ``q`` is the
ranked list of query ``q`` (best first) and ``relevance[q, i]`` says whether its
``i``-th item is a positive. ``num_positives[q]`` is the number of positives of
query ``q`` in the ground truth (not only those retrieved), so positives that
never made it into the list count as misses. Optional ``junk`` marks items that
are removed from the list before ranks are counted (revisited Oxford/Paris);
``num_positives`` excludes junk.

Definitions, with ``r_i`` the 1-based rank of the
``i``-th retrieved positive after junk removal and ``R = num_positives``:

- AP (standard, non-interpolated) = ``(1/R) * sum_i i / r_i``;
- revisited AP (Oxford/Paris ``compute_ap``, trapezoid) =
  ``(1/R) * sum_i (p0_i + p1_i) / 2`` with ``p0_i = (i-1)/(r_i-1)`` (1 when
  ``r_i = 1``) and ``p1_i = i / r_i``;
- Recall@k = positives in the top k / R; HitRate@k = 1 if any positive is in
  the top k; P@k = positives in the top k / k; RR = 1 / rank of the first
  positive (0 if none in the list).

Ties in scores are resolved by the search (ascending gallery row), so the
metrics take the order as given. The math is vectorised over queries and works
on the retrieved positives only: one ``nonzero`` scan of ``relevance`` and then
``O(P)`` work for ``P`` positives, whatever the list length. Scores are
float64 so that means over many queries stay exact to ~1e-12.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from lit.distributed import dedupe_by_index

APKind = Literal["standard", "revisited"]
_AP_KINDS = ("standard", "revisited")
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_BLOCK_ITEMS = 1 << 22  # ranked items per block in ranking_relevance (bounds temporaries to ~32 MiB each)


# ----------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------


def _check_relevance(relevance: Tensor, name: str = "relevance") -> None:
    if not isinstance(relevance, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(relevance).__name__}")
    if relevance.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (Q, K), got dtype {relevance.dtype}")
    if relevance.ndim != 2:
        raise ValueError(f"{name} must have shape (Q, K), got {tuple(relevance.shape)}")


def _check_junk(relevance: Tensor, junk: Tensor | None) -> None:
    if junk is None:
        return
    _check_relevance(junk, "junk")
    if junk.shape != relevance.shape:
        raise ValueError(
            f"junk shape {tuple(junk.shape)} does not match relevance shape {tuple(relevance.shape)}"
        )


def _check_disjoint(pos: _Positives, junk: Tensor | None) -> None:
    """Junk must not mark a positive (checked on the positives only)."""
    if junk is None:
        return
    clash = pos.query[junk.reshape(-1)[pos.keys]].unique()
    if clash.numel():
        raise ValueError(
            f"{clash.numel()} of {pos.count.shape[0]} queries mark an item both positive and junk "
            f"(first: query {int(clash[0])}); junk must exclude the positives"
        )


def _check_num_positives(num_positives: Tensor, num_queries: int) -> None:
    if not isinstance(num_positives, Tensor):
        raise TypeError(f"num_positives must be a torch.Tensor, got {type(num_positives).__name__}")
    if num_positives.dtype not in _INT_DTYPES:
        raise TypeError(f"num_positives must be an integer tensor, got dtype {num_positives.dtype}")
    if num_positives.shape != (num_queries,):
        raise ValueError(
            f"num_positives must have shape ({num_queries},) to match relevance, "
            f"got {tuple(num_positives.shape)}"
        )
    empty = num_positives < 1
    if empty.any():
        first = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"every query needs at least one positive: {int(empty.sum())} of {num_queries} queries "
            f"have num_positives < 1 (first: query {first})"
        )


def _check_retrieved_count(retrieved: Tensor, num_positives: Tensor) -> None:
    excess = retrieved > num_positives
    if excess.any():
        first = int(excess.nonzero()[0, 0])
        raise ValueError(
            f"relevance marks more positives than num_positives for {int(excess.sum())} of "
            f"{num_positives.shape[0]} queries (first: query {first}: {int(retrieved[first])} > "
            f"{int(num_positives[first])})"
        )


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return k


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one cut-off k")
    return tuple(_check_k(k) for k in ks)


def _check_ap(ap: str) -> APKind:
    if ap not in _AP_KINDS:
        raise ValueError(f"ap must be one of {_AP_KINDS}, got {ap!r}")
    return ap  # type: ignore[return-value]


# ----------------------------------------------------------------------------
# retrieved positives: the sparse core every metric uses
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Positives:
    """Retrieved positives of all queries, grouped by query in rank order."""

    keys: Tensor  # (P,) int64 flat position ``query * K + column`` in relevance
    query: Tensor  # (P,) int64 query row of each retrieved positive
    rank: Tensor  # (P,) int64 1-based rank after junk removal
    hits: Tensor  # (P,) int64 positives at or above this one (1 for the first)
    count: Tensor  # (Q,) int64 retrieved positives per query


def _retrieved_positives(relevance: Tensor, junk: Tensor | None) -> _Positives:
    """Ranks of the retrieved positives; junk items above a positive lower its rank."""
    num_queries, length = relevance.shape
    keys = relevance.reshape(-1).nonzero().squeeze(1)  # row-major: by query, then rank
    query = torch.div(keys, length, rounding_mode="floor")
    rank = keys - query * length + 1
    if junk is not None and bool(junk.any()):
        junk_keys = junk.reshape(-1).nonzero().squeeze(1)
        if junk_keys.numel():
            row_start = query * length
            junk_above = torch.searchsorted(junk_keys, keys) - torch.searchsorted(junk_keys, row_start)
            rank = rank - junk_above
    count = torch.bincount(query, minlength=num_queries)
    first = torch.cumsum(count, 0) - count  # position of each query's first positive in `keys`
    hits = torch.arange(keys.numel(), device=keys.device) - first[query] + 1
    return _Positives(keys=keys, query=query, rank=rank, hits=hits, count=count)


def _positives(
    relevance: Tensor, num_positives: Tensor | None, junk: Tensor | None
) -> _Positives:
    """Validate the inputs and extract the retrieved positives."""
    _check_relevance(relevance)
    _check_junk(relevance, junk)
    if num_positives is not None:
        _check_num_positives(num_positives, relevance.shape[0])
    pos = _retrieved_positives(relevance, junk)
    _check_disjoint(pos, junk)
    if num_positives is not None:
        _check_retrieved_count(pos.count, num_positives.to(pos.count.device))
    return pos


def _per_query_sum(pos: _Positives, values: Tensor) -> Tensor:
    out = torch.zeros(pos.count.shape[0], dtype=torch.float64, device=values.device)
    return out.index_add_(0, pos.query, values)


def _hits_at_k(pos: _Positives, k: int) -> Tensor:
    return torch.bincount(pos.query[pos.rank <= k], minlength=pos.count.shape[0])


def _standard_ap(pos: _Positives, num_positives: Tensor) -> Tensor:
    precision = pos.hits.double() / pos.rank.double()
    return _per_query_sum(pos, precision) / num_positives.double()


def _revisited_ap(pos: _Positives, num_positives: Tensor) -> Tensor:
    rank0 = (pos.rank - 1).double()  # revisitop's 0-based rank
    before = (pos.hits - 1).double()  # revisitop's j: positives above this one
    precision_0 = torch.where(rank0 > 0, before / rank0.clamp(min=1.0), torch.ones_like(rank0))
    precision_1 = pos.hits.double() / pos.rank.double()
    return _per_query_sum(pos, (precision_0 + precision_1) / 2.0) / num_positives.double()


def _reciprocal_rank(pos: _Positives) -> Tensor:
    first = pos.hits == 1
    out = torch.zeros(pos.count.shape[0], dtype=torch.float64, device=pos.rank.device)
    out[pos.query[first]] = 1.0 / pos.rank[first].double()
    return out


# ----------------------------------------------------------------------------
# public per-query metrics
# ----------------------------------------------------------------------------


def ranking_relevance(ranked: Tensor, targets: Sequence[Sequence[int]]) -> Tensor:
    """``(Q, K)`` bool: whether ``ranked[q, i]`` is in ``targets[q]``; ``-1`` slots are False.

    ``ranked`` holds gallery ids in rank order (e.g. ``SearchResult.indices``).
    No loop over queries: when a ``(Q, max id)`` bool table is no larger than
    ``ranked`` itself, targets are scattered into it and looked up with
    ``gather``; otherwise ``q * width + id`` keys are matched with one sorted
    ``searchsorted``. Rows are processed in blocks to bound temporary memory.
    """
    if not isinstance(ranked, Tensor) or ranked.dtype not in _INT_DTYPES or ranked.ndim != 2:
        raise TypeError(
            "ranked must be an integer tensor (Q, K) of gallery ids, got "
            f"{type(ranked).__name__} {getattr(ranked, 'dtype', '')} {tuple(getattr(ranked, 'shape', ()))}"
        )
    num_queries, length = ranked.shape
    if len(targets) != num_queries:
        raise ValueError(f"targets has {len(targets)} lists for {num_queries} ranked queries")
    if ranked.numel() and int(ranked.min()) < -1:
        raise ValueError(f"ranked holds {int(ranked.min())}; gallery ids are >= 0 and -1 marks an empty slot")
    lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    ids = torch.tensor(list(itertools.chain.from_iterable(targets)), dtype=torch.long)
    out = torch.zeros(ranked.shape, dtype=torch.bool, device=ranked.device)
    if ids.numel() == 0 or ranked.numel() == 0:
        return out
    if int(ids.min()) < 0:
        raise ValueError(f"targets hold a negative gallery id {int(ids.min())}")
    width = max(int(ranked.max()), int(ids.max())) + 1
    rows = torch.repeat_interleave(torch.arange(num_queries), lengths).to(ranked.device)
    ids = ids.to(ranked.device)
    block = max(1, _BLOCK_ITEMS // max(length, 1))
    if num_queries * width <= ranked.numel() * ranked.element_size():
        table = torch.zeros(num_queries, width, dtype=torch.bool, device=ranked.device)
        table[rows, ids] = True
        for start in range(0, num_queries, block):
            part = ranked[start : start + block].long()
            found = table[start : start + block].gather(1, part.clamp(min=0))
            out[start : start + block] = found & (part >= 0)
        return out
    target_keys = torch.unique(rows * width + ids)  # sorted
    for start in range(0, num_queries, block):
        part = ranked[start : start + block].long()
        query = torch.arange(start, start + part.shape[0], device=ranked.device).unsqueeze(1)
        keys = query * width + part
        slot = torch.searchsorted(target_keys, keys).clamp(max=target_keys.numel() - 1)
        out[start : start + block] = (target_keys[slot] == keys) & (part >= 0)
    return out


def average_precision(relevance: Tensor, num_positives: Tensor, junk: Tensor | None = None) -> Tensor:
    """Standard non-interpolated AP per query, ``(Q,)`` float64; unretrieved positives count zero."""
    pos = _positives(relevance, num_positives, junk)
    return _standard_ap(pos, num_positives.to(relevance.device))


def revisited_average_precision(
    relevance: Tensor, num_positives: Tensor, junk: Tensor | None = None
) -> Tensor:
    """Revisited Oxford/Paris AP (trapezoid ``compute_ap``) per query, ``(Q,)`` float64."""
    pos = _positives(relevance, num_positives, junk)
    return _revisited_ap(pos, num_positives.to(relevance.device))


def recall_at_k(relevance: Tensor, num_positives: Tensor, k: int, junk: Tensor | None = None) -> Tensor:
    """Fraction of each query's positives found in its top k, ``(Q,)`` float64."""
    _check_k(k)
    pos = _positives(relevance, num_positives, junk)
    return _hits_at_k(pos, k).double() / num_positives.to(relevance.device).double()


def hit_rate_at_k(relevance: Tensor, k: int, junk: Tensor | None = None) -> Tensor:
    """1.0 where the top k hold at least one positive, else 0.0, ``(Q,)`` float64."""
    _check_k(k)
    pos = _positives(relevance, None, junk)
    return (_hits_at_k(pos, k) > 0).double()


def precision_at_k(relevance: Tensor, k: int, junk: Tensor | None = None) -> Tensor:
    """Positives in the top k divided by k, ``(Q,)`` float64."""
    _check_k(k)
    pos = _positives(relevance, None, junk)
    return _hits_at_k(pos, k).double() / k


def reciprocal_rank(relevance: Tensor, junk: Tensor | None = None) -> Tensor:
    """1 / rank of the first positive (0 if none in the list), ``(Q,)`` float64."""
    return _reciprocal_rank(_positives(relevance, None, junk))


def _per_query_metrics(
    relevance: Tensor,
    num_positives: Tensor,
    junk: Tensor | None,
    ks: tuple[int, ...],
    ap: APKind,
) -> dict[str, Tensor]:
    """All metrics per query from one extraction of the retrieved positives."""
    _check_relevance(relevance)
    if relevance.shape[0] == 0:
        raise ValueError("retrieval metrics need at least one query, got relevance with 0 rows")
    pos = _positives(relevance, num_positives, junk)
    num_positives = num_positives.to(relevance.device)
    average = _standard_ap if ap == "standard" else _revisited_ap
    out = {"mAP": average(pos, num_positives), "MRR": _reciprocal_rank(pos)}
    hits = {k: _hits_at_k(pos, k) for k in ks}
    out.update({f"recall@{k}": hits[k].double() / num_positives.double() for k in ks})
    out.update({f"hit_rate@{k}": (hits[k] > 0).double() for k in ks})
    out.update({f"precision@{k}": hits[k].double() / k for k in ks})
    return out


def retrieval_metrics(
    relevance: Tensor,
    num_positives: Tensor,
    junk: Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    ap: APKind = "standard",
) -> dict[str, float]:
    """Means over queries: ``mAP``, ``MRR``, ``recall@k``, ``hit_rate@k``, ``precision@k``.

    ``ap="revisited"`` uses the Oxford/Paris trapezoid AP for ``mAP``.
    """
    per_query = _per_query_metrics(relevance, num_positives, junk, _check_ks(ks), _check_ap(ap))
    return {name: float(values.mean()) for name, values in per_query.items()}


# ----------------------------------------------------------------------------
# torchmetrics accumulator (DDP-safe)
# ----------------------------------------------------------------------------

# state name -> dtype; relevance and junk are stored flattened (uint8, gloo has no bool)
# with the list length of every row, so ranks and updates may use different K.
_STATE_DTYPES = {
    "query_index": torch.long,
    "num_positives": torch.long,
    "list_length": torch.long,
    "relevance": torch.uint8,
    "junk": torch.uint8,
}


def _unflatten(flat: Tensor, lengths: Tensor) -> Tensor:
    """Rows of different lengths -> ``(N, max length)`` bool, padded with False.

    A non-relevant, non-junk tail changes no metric, so padding is exact.
    """
    flat = flat.view(torch.bool)  # uint8 state, 0/1 only: reinterpret without a copy
    if flat.numel() != int(lengths.sum()):
        raise RuntimeError(
            f"corrupt metric state: {flat.numel()} items for row lengths summing to {int(lengths.sum())}"
        )
    width = int(lengths.max()) if lengths.numel() else 0
    if lengths.numel() and bool((lengths == width).all()):
        return flat.reshape(lengths.numel(), width)
    mask = torch.arange(width, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    out = torch.zeros(mask.shape, dtype=torch.bool, device=flat.device)
    out[mask] = flat
    return out


class RetrievalMetrics(Metric):
    """Accumulates ranked-list relevance per query and scores it once, DDP-safe.

    ``update`` takes the global ``query_index`` of every row; ``compute`` gathers
    all ranks (torchmetrics ``cat``), drops the duplicates that
    ``DistributedSampler`` padding adds, orders by index and returns the means of
    :func:`retrieval_metrics` as 0-d float64 tensors. Ranks without data and
    lists of different lengths K (padded with non-relevant items) are handled.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10), ap: APKind = "standard", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = _check_ks(ks)
        self.ap: APKind = _check_ap(ap)
        for name in _STATE_DTYPES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        query_index: Tensor,
        relevance: Tensor,
        num_positives: Tensor,
        junk: Tensor | None = None,
    ) -> None:
        """Add ``Q`` queries: global ids ``(Q,)``, relevance ``(Q, K)`` bool, positives ``(Q,)``."""
        _positives(relevance, num_positives, junk)  # same checks as retrieval_metrics, at update time
        if not isinstance(query_index, Tensor) or query_index.dtype not in _INT_DTYPES:
            raise TypeError("query_index must be an integer tensor (Q,) of global query ids")
        if query_index.shape != (relevance.shape[0],):
            raise ValueError(
                f"query_index shape {tuple(query_index.shape)} does not match "
                f"{relevance.shape[0]} relevance rows"
            )
        num_queries, length = relevance.shape
        device = self.device
        self.query_index.append(query_index.to(device, torch.long))
        self.num_positives.append(num_positives.to(device, torch.long))
        self.list_length.append(torch.full((num_queries,), length, dtype=torch.long, device=device))
        self.relevance.append(relevance.reshape(-1).to(device, torch.uint8))
        if junk is None:
            self.junk.append(torch.zeros(relevance.numel(), dtype=torch.uint8, device=device))
        else:
            self.junk.append(junk.reshape(-1).to(device, torch.uint8))

    def _sync_dist(
        self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None
    ) -> None:
        """Give a rank without updates typed empty states before the gather.

        torchmetrics would substitute a float32 tensor, which does not match the
        int64 / uint8 tensors of the other ranks in ``all_gather``.
        """
        for name, dtype in _STATE_DTYPES.items():
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                setattr(self, name, [torch.empty(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group=process_group)

    def compute(self) -> dict[str, Tensor]:
        """Gathered, deduplicated, index-ordered means of every metric."""
        states = {name: getattr(self, name) for name in _STATE_DTYPES}
        if any(isinstance(s, list) and not s for s in states.values()):
            raise ValueError("RetrievalMetrics.compute() needs at least one update with queries")
        index, num_positives, lengths, flat_relevance, flat_junk = (dim_zero_cat(s) for s in states.values())
        if index.numel() == 0:
            raise ValueError("RetrievalMetrics.compute() needs at least one update with queries")
        relevance = _unflatten(flat_relevance, lengths)
        junk = _unflatten(flat_junk, lengths)
        if index.numel() > 1 and bool((index[1:] <= index[:-1]).any()):  # padded or out of order
            index, relevance, junk, num_positives = dedupe_by_index(index, relevance, junk, num_positives)
        per_query = _per_query_metrics(relevance, num_positives, junk, self.ks, self.ap)
        return {name: values.mean() for name, values in per_query.items()}
