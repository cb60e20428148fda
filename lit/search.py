"""Exact top-k search of queries against a gallery, streamed in gallery blocks.

* Global features ``(N, D)`` with ``similarity="cosine"``: features are
  L2-normalised to float32 and searched with ``faiss.IndexFlatIP``, one gallery
  block at a time (add, search, merge into the running top-k, reset).
* Token features ``(N, T, D)`` with ``similarity="split_product"``:
  :func:`lit.similarity.split_product` per (query block, gallery chunk) tile,
  then the same merge.

Ordering is total and deterministic: scores descending, equal scores by
ascending gallery row, also at the k-th place, whatever the block sizes.
faiss is asked for spare candidates, which are rescored in a fixed summation
order (faiss's BLAS kernels can score identical vectors an ulp apart by
position); where a tie may reach past the candidates, faiss is asked again
with more (see :func:`_block_topk`). Ties are equal float32 scores as
returned; identical gallery vectors always tie.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, get_args

import faiss
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from lit.similarity import (
    SimilarityKind,
    TokenNormalization,
    _check_mode,
    l2_normalize,
    split_product,
)

#: Score elements per split-product tile (query block x gallery chunk) before its sort.
TILE_ELEMENTS = 2**22
#: Candidate slots per faiss call when ties force a wider search (12 bytes each).
RESULT_ELEMENTS = 2**23
#: Float32 elements of gathered candidate vectors per rescoring step.
RESCORE_ELEMENTS = 2**22


@dataclass(frozen=True)
class SearchResult:
    """Top-k lists: ``scores`` (Q, k) float32 descending, ``indices`` (Q, k) int64 gallery rows.

    Equal scores are ordered by ascending gallery row. Slots beyond the
    available gallery rows hold index -1 and score -inf.
    """

    scores: Tensor
    indices: Tensor


def search(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    *,
    similarity: SimilarityKind = "cosine",
    normalization: TokenNormalization = "token",
    exclude: Tensor | None = None,
    gallery_block: int = 65536,
    query_block: int = 4096,
    progress: bool = False,
) -> SearchResult:
    """Exact top-``k`` gallery rows for every query.

    ``exclude`` (Q,) int64 names one gallery row per query to leave out (its
    self-match), -1 for none. The gallery is streamed in blocks of
    ``gallery_block`` rows (token features: smaller chunks so that one tile
    of scores holds at most ``TILE_ELEMENTS``), so ``Q x G`` scores never need
    to fit in memory. ``normalization`` applies to split-product only.
    """
    _validate(queries, gallery, k, similarity, normalization, gallery_block, query_block)
    excluded = _validate_exclude(exclude, queries.shape[0], gallery.shape[0])
    if similarity == "cosine":
        return _search_global(queries, gallery, k, excluded, gallery_block, query_block, progress)
    return _search_tokens(
        queries, gallery, k, normalization, excluded, gallery_block, query_block, progress
    )


def self_search(features: Tensor, k: int, **kw: Any) -> SearchResult:
    """Search ``features`` against themselves, each row's own match excluded."""
    if "exclude" in kw:
        raise TypeError("self_search excludes each row itself; do not pass exclude")
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    own = torch.arange(features.shape[0] if features.ndim else 0, dtype=torch.int64)
    return search(features, features, k, exclude=own, **kw)


# ----------------------------------------------------------------------------- global


def _search_global(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    exclude: np.ndarray | None,
    gallery_block: int,
    query_block: int,
    progress: bool,
) -> SearchResult:
    """faiss IndexFlatIP over one gallery block at a time, merged into a running top-k."""
    num_q, dim = queries.shape
    num_g = gallery.shape[0]
    scores, rows = _empty_topk(num_q, k)
    index = faiss.IndexFlatIP(dim)
    query_starts = range(0, num_q, query_block)
    normalized = [_normalized(queries[q0 : q0 + query_block], "queries", q0) for q0 in query_starts]
    starts = range(0, num_g, gallery_block)
    for g0 in tqdm(starts, desc="search", unit="block", disable=not progress):
        block = _normalized(gallery[g0 : g0 + gallery_block], "gallery", g0)
        index.add(block)
        for q0, xq in zip(query_starts, normalized):
            q1 = min(num_q, q0 + query_block)
            excl = None if exclude is None else exclude[q0:q1]
            s, i = _block_topk(index, block, xq, k, g0, excl)
            scores[q0:q1], rows[q0:q1] = _merge(scores[q0:q1], rows[q0:q1], s, i, k)
        index.reset()
        del block
    return SearchResult(torch.from_numpy(scores), torch.from_numpy(rows))


def _block_topk(
    index: faiss.IndexFlatIP,
    xb: np.ndarray,
    xq: np.ndarray,
    k: int,
    offset: int,
    exclude: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one gallery block ``xb`` (in ``index``), ordered by (score desc, row asc).

    faiss selects ``kc > k`` candidates; :func:`_canonical` rescores and orders
    them and flags queries whose k-th place could still tie with a row faiss
    left out. Those queries are searched again with twice as many candidates
    (the whole block at most).
    """
    nb = index.ntotal
    spare = 1 if exclude is not None else 0
    kc = min(nb, k + spare + max(8, k // 4))
    s, i = index.search(xq, kc)
    scores, rows, unsure = _canonical(xq, xb, s, i, k, offset, exclude, kc < nb)
    while unsure.any():
        kc = min(nb, 2 * kc)
        todo = np.flatnonzero(unsure)
        step = max(1, RESULT_ELEMENTS // kc)
        for c0 in range(0, todo.size, step):
            sel = todo[c0 : c0 + step]
            sub = xq[sel]
            s, i = index.search(sub, kc)
            sub_exclude = None if exclude is None else exclude[sel]
            sc, ro, still = _canonical(sub, xb, s, i, k, offset, sub_exclude, kc < nb)
            scores[sel], rows[sel], unsure[sel] = sc, ro, still
    return scores, rows


def _canonical(
    xq: np.ndarray,
    xb: np.ndarray,
    s: np.ndarray,
    i: np.ndarray,
    k: int,
    offset: int,
    exclude: np.ndarray | None,
    partial: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rescore faiss candidates, drop excluded rows, order by (score desc, row asc), keep k.

    faiss's BLAS kernels may give identical gallery vectors scores an ulp
    apart depending on their position, so candidates are rescored with
    :func:`_rescore`, where they tie exactly. Returns scores (n, k), global
    rows (n, k) and the queries whose k-th place is uncertain: ``partial``
    (faiss returned part of the block) and the k-th score not clearly above
    the lowest faiss score returned (every row left out scored at most that
    in faiss, so at most that plus the rounding slack here).
    """
    missing = i < 0
    last = np.where(missing, np.inf, s).min(axis=1)
    scores = np.where(missing, -np.inf, _rescore(xq, xb, i)).astype(np.float32)
    rows = np.where(missing, -1, i + offset)
    if exclude is not None:
        dropped = rows == exclude[:, None]
        scores[dropped] = -np.inf
        rows[dropped] = -1
    order = np.lexsort((rows, -scores))[:, :k]  # by -score, then row; -inf slots last
    scores, rows = _pad_to_k(
        np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1), k
    )
    unsure = (scores[:, k - 1] <= last + _rounding_slack(xq.shape[1])) & partial
    return scores, rows, unsure


def _rescore(xq: np.ndarray, xb: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Inner products of every query with its candidate rows, as ``(q * g).sum(-1)``.

    An elementwise product summed along D reduces every pair in the same
    order, so identical gallery vectors get bitwise identical scores.
    """
    n, kc = local.shape
    dim = xq.shape[1]
    out = np.empty((n, kc), dtype=np.float32)
    step = max(1, RESCORE_ELEMENTS // max(1, kc * dim))
    buf = np.empty((min(n, step), kc, dim), dtype=np.float32)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        cand = buf[: r1 - r0]
        np.take(xb, local[r0:r1], axis=0, out=cand, mode="clip")  # -1 (missing) -> row 0
        np.multiply(cand, xq[r0:r1, None, :], out=cand)
        cand.sum(axis=-1, out=out[r0:r1])
    return out


def _rounding_slack(dim: int) -> float:
    """Bound on |faiss score - rescored score| for unit vectors: twice the float32
    dot-product error bound ``dim * 2**-24`` (any summation order), doubled for margin."""
    return 4.0 * (dim + 1) * 2.0**-24


def _normalized(x: Tensor, name: str, offset: int) -> np.ndarray:
    """L2-normalised float32 C-contiguous copy of a block, for faiss; rejects NaN/inf."""
    out = l2_normalize(x.detach().to("cpu", torch.float32)).contiguous().numpy()
    if not np.isfinite(out).all():
        bad = offset + int(np.nonzero(~np.isfinite(out).all(axis=1))[0][0])
        raise ValueError(f"{name} row {bad} contains NaN or inf")
    return out


# ----------------------------------------------------------------------------- tokens


def _search_tokens(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    normalization: TokenNormalization,
    exclude: np.ndarray | None,
    gallery_block: int,
    query_block: int,
    progress: bool,
) -> SearchResult:
    """Split-product scores tile by tile, each tile stably sorted, merged into a running top-k."""
    num_q, num_g = queries.shape[0], gallery.shape[0]
    scores, rows = _empty_topk(num_q, k)
    chunk = max(1, min(gallery_block, TILE_ELEMENTS // min(query_block, max(num_q, 1))))
    starts = range(0, num_g, chunk)
    for g0 in tqdm(starts, desc="search", unit="block", disable=not progress):
        g_block = gallery[g0 : g0 + chunk].detach()
        for q0 in range(0, num_q, query_block):
            q1 = min(num_q, q0 + query_block)
            tile = split_product(queries[q0:q1].detach(), g_block, normalization).cpu()
            if not torch.isfinite(tile).all():
                raise ValueError(
                    f"split-product scores of queries {q0}..{q1 - 1} x gallery rows "
                    f"{g0}..{g0 + tile.shape[1] - 1} are NaN or inf (NaN/inf features, or overflow)"
                )
            if exclude is not None:
                cols = torch.from_numpy(exclude[q0:q1] - g0)
                hit = ((cols >= 0) & (cols < tile.shape[1])).nonzero().flatten()
                tile[hit, cols[hit]] = -math.inf
            # column order is gallery row order, so a stable sort breaks ties by row
            s, order = torch.sort(tile, dim=1, descending=True, stable=True)
            s, r = s[:, :k].numpy(), order[:, :k].numpy() + g0
            r[s == -np.inf] = -1  # excluded rows (real scores are finite)
            s, r = _pad_to_k(s, r, k)
            scores[q0:q1], rows[q0:q1] = _merge(scores[q0:q1], rows[q0:q1], s, r, k)
    return SearchResult(torch.from_numpy(scores), torch.from_numpy(rows))


# ----------------------------------------------------------------------------- shared


def _empty_topk(num_q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((num_q, k), -np.inf, dtype=np.float32), np.full((num_q, k), -1, dtype=np.int64)


def _pad_to_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut or pad (with -inf / -1) to exactly k columns."""
    if scores.shape[1] >= k:
        return scores[:, :k], rows[:, :k]
    pad_s, pad_r = _empty_topk(scores.shape[0], k - scores.shape[1])
    return np.concatenate([scores, pad_s], 1), np.concatenate([rows, pad_r], 1)


def _merge(
    best_s: np.ndarray, best_i: np.ndarray, new_s: np.ndarray, new_i: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Merge two (n, k) lists, each in (score desc, row asc) order, ``best`` from earlier rows.

    Every row of ``best`` precedes every row of ``new``, so a stable sort on
    the scores of ``[best, new]`` keeps ties in row order.
    """
    s = np.concatenate([best_s, new_s], axis=1)
    i = np.concatenate([best_i, new_i], axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def _validate(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    similarity: str,
    normalization: str,
    gallery_block: int,
    query_block: int,
) -> None:
    """One-line errors for bad arguments, before any work."""
    for name, x in (("queries", queries), ("gallery", gallery)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    for name, v in (("k", k), ("gallery_block", gallery_block), ("query_block", query_block)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    _check_mode(normalization)
    if similarity not in get_args(SimilarityKind):
        raise ValueError(
            f"similarity must be one of {get_args(SimilarityKind)}, got {similarity!r}"
        )
    expected = {"cosine": 2, "split_product": 3}
    ndim = expected[similarity]
    for name, x in (("queries", queries), ("gallery", gallery)):
        if x.ndim != ndim:
            hint = (
                "token features (N, T, D) need similarity='split_product'"
                if x.ndim == 3 and similarity == "cosine"
                else "global features (N, D) need similarity='cosine'"
                if x.ndim == 2
                else f"expected {'(N, D)' if ndim == 2 else '(N, T, D)'}"
            )
            raise ValueError(
                f"similarity={similarity!r} got {name} of shape {tuple(x.shape)}: {hint}"
            )
    if queries.shape[1:] != gallery.shape[1:]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} differ in "
            f"feature shape {tuple(queries.shape[1:])} vs {tuple(gallery.shape[1:])}"
        )


def _validate_exclude(exclude: Tensor | None, num_q: int, num_g: int) -> np.ndarray | None:
    """``exclude`` as an int64 (Q,) array with values in [-1, G)."""
    if exclude is None:
        return None
    if not isinstance(exclude, Tensor):
        raise TypeError(f"exclude must be a torch.Tensor, got {type(exclude).__name__}")
    if exclude.dtype.is_floating_point or exclude.dtype.is_complex or exclude.dtype == torch.bool:
        raise TypeError(f"exclude must hold integer gallery rows, got {exclude.dtype}")
    if exclude.shape != (num_q,):
        raise ValueError(
            f"exclude must have shape ({num_q},) (one row per query), got {tuple(exclude.shape)}"
        )
    rows = exclude.detach().to("cpu", torch.int64).numpy()
    if num_q and (rows.min() < -1 or rows.max() >= num_g):
        raise ValueError(
            f"exclude values must be gallery rows in [0, {num_g}) or -1, "
            f"got range [{int(rows.min())}, {int(rows.max())}]"
        )
    return rows
