"""Exact top-k search of queries against a gallery, streamed in gallery blocks.

One entry point, :func:`search` ``(queries, gallery, k, ...)``: the gallery is a
tensor ``(G, D)`` / ``(G, T, D)`` held in memory or any :class:`RowSource` (a
memory-mapped ``lit.store.FeatureStore``, :class:`TensorRows`), read
``gallery_block`` rows at a time and never held whole, so peak memory is a few
blocks plus the top-k lists. :func:`self_search` searches features against
themselves without the self-matches.

Two engines give the same lists (same rows; scores equal within float32 rounding):

* ``backend="faiss"`` (global features ``(N, D)``, cosine, CPU): features are
  L2-normalised to float32 and searched with faiss's exact inner-product kNN
  (``faiss.knn``, the kernel of ``IndexFlatIP.search``, on the block where it
  lies), one gallery block at a time, merged into the running top-k. The
  faster engine on a CPU. faiss returns a few spare candidates per query; only
  those that can still enter the top k (within :func:`score_slack` of its k-th
  place or of the running k-th score) are rescored (:func:`_rescore_pairs`).
* ``backend="torch"`` (both kinds, any device): on the device that holds the
  queries (or ``device=``), each gallery block is moved there and scored
  against each query block with one matrix product (cosine) or
  :func:`lit.similarity.split_product` (tokens, ``similarity="split_product"``);
  ``topk`` keeps a shortlist of ``k + margin`` candidates per query, merged on
  the device, with no per-tile copies to the CPU. ``precision="tf32"`` or
  ``"bf16"`` computes these products in reduced precision. At the end the
  shortlist is rescored in float32 in a fixed summation order
  (:func:`rerank`) and ordered; a query whose k-th score could tie with
  a row the shortlist left out (within a proven bound on the product's
  rounding error, :func:`score_slack`) is scanned again with a longer shortlist.
  One code path for CPU and CUDA tensors.

``backend="auto"`` picks torch for tensors on an accelerator, for token
features and for reduced precision, and faiss otherwise.

Ordering is total and deterministic: scores descending, equal scores by
ascending gallery row, also at the k-th place, whatever the block sizes or the
engine. Ties are equal float32 scores as returned; identical gallery vectors
always tie. faiss's and BLAS's kernels can score identical vectors an ulp apart
by position, so both engines rescore their candidates in a fixed order (an
elementwise product summed along D); where a tie may reach past the
candidates, they search again with more.

The pieces other engines build on (:mod:`lit.ann` re-ranks an approximate
shortlist with them): :func:`rerank` (exact float32 scores of given candidate
rows, in the canonical order), :func:`normalized_rows` (faiss input),
:func:`as_tensor` (a :class:`RowSource` block as a tensor), :func:`check_exclude`
and :func:`score_slack`; :func:`similarity_for` says which similarity a
feature shape takes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import faiss
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from lit.choices import SimilarityKind, TokenNormalization
from lit.similarity import (
    _check_mode,
    l2_normalize,
    normalize_tokens,
    split_product,
)

Backend = Literal["auto", "faiss", "torch"]
Precision = Literal["float32", "tf32", "bf16"]

#: Candidate slots per faiss call when ties force a wider search (12 bytes each).
RESULT_ELEMENTS = 2**23
#: Float32 elements of gathered candidate vectors per rescoring step (faiss engine).
RESCORE_ELEMENTS = 2**22
#: Candidate pairs below which the faiss engine rescores in one thread (a thread costs more than it saves).
PAIRS_PER_THREAD = 32768
#: The same for the torch engine on an accelerator (64 MB a step; on a CPU, RESCORE_ELEMENTS).
DEVICE_RESCORE_ELEMENTS = 2**24
#: Score elements per (query block x gallery chunk) tile of the torch engine on a CPU (float32: 256 MB).
TILE_ELEMENTS = 2**26
#: The same on an accelerator (1 GB): fewer, larger products and ``topk`` calls.
DEVICE_TILE_ELEMENTS = 2**28
#: Elements of per-token products per step of the reduced-precision token tile (bf16: 128 MB).
TOKEN_CHUNK_ELEMENTS = 2**26


@dataclass(frozen=True)
class SearchResult:
    """Top-k lists: ``scores`` (Q, k) float32 descending, ``indices`` (Q, k) int64 gallery rows.

    Both on the CPU. Equal scores are ordered by ascending gallery row. Slots
    beyond the available gallery rows hold index -1 and score -inf.
    """

    scores: Tensor
    indices: Tensor


class RowSource(Protocol):
    """A gallery that can be scanned in blocks and gathered by row (a feature store, a tensor)."""

    @property
    def num_rows(self) -> int: ...

    @property
    def feature_shape(self) -> tuple[int, ...]: ...

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray | Tensor]]:
        """``(first_row, rows)`` blocks of at most ``block_rows`` rows, in row order."""
        ...

    def rows(self, indices: np.ndarray) -> np.ndarray | Tensor:
        """The given rows (int64, any order), in that order."""
        ...


class TensorRows:
    """:class:`RowSource` over an in-memory tensor or array ``(N, *feature_shape)`` (no copy)."""

    def __init__(self, features: Tensor | np.ndarray) -> None:
        self.features = features

    @property
    def num_rows(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.features.shape[1:])

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray | Tensor]]:
        for start in range(0, self.num_rows, block_rows):
            yield start, self.features[start : start + block_rows]

    def rows(self, indices: np.ndarray) -> np.ndarray | Tensor:
        if isinstance(self.features, Tensor):
            idx = torch.from_numpy(np.asarray(indices, dtype=np.int64)).to(self.features.device)
            return self.features[idx]  # advanced indexing: ~10x faster than index_select on CPU
        return self.features[np.asarray(indices, dtype=np.int64)]


def search(
    queries: Tensor,
    gallery: Tensor | RowSource,
    k: int,
    *,
    similarity: SimilarityKind = "cosine",
    normalization: TokenNormalization = "token",
    exclude: Tensor | None = None,
    gallery_block: int = 65536,
    query_block: int = 4096,
    progress: bool = False,
    backend: Backend = "auto",
    precision: Precision = "float32",
    device: str | torch.device | None = None,
) -> SearchResult:
    """Exact top-``k`` gallery rows for every query.

    ``gallery``: a tensor with the queries' feature shape, or a
    :class:`RowSource` (e.g. ``lit.store.FeatureStore``) read ``gallery_block``
    rows at a time. ``similarity``: ``"cosine"`` for global features ``(N, D)``,
    ``"split_product"`` for token features ``(N, T, D)`` (see
    :func:`similarity_for`); ``normalization`` applies to split-product only.
    ``exclude`` (Q,) int64 names one gallery row per query to leave out (its
    self-match), -1 for none. The gallery is streamed in blocks of
    ``gallery_block`` rows (smaller tiles inside, see ``TILE_ELEMENTS``), so
    ``Q x G`` scores never need to fit in memory; ``query_block`` queries are
    scored (torch engine) or normalised (faiss engine, which tiles the queries
    itself) at a time. ``backend``, ``precision``
    (products of the torch engine; the returned scores are always float32
    rescored) and ``device`` (where the torch engine computes; default the
    queries' device): see the module docstring.
    """
    _validate(queries, gallery, k, similarity, normalization, gallery_block, query_block)
    source = TensorRows(gallery) if isinstance(gallery, Tensor) else gallery
    excluded = check_exclude(exclude, queries.shape[0], source.num_rows)
    engine = _resolve_backend(backend, precision, similarity, queries, device)
    if engine == "faiss":
        return _search_global(queries, source, k, excluded, gallery_block, query_block, progress)
    return _search_torch(
        queries, source, k, similarity, normalization, excluded, gallery_block, query_block,
        precision, torch.device(device) if device is not None else queries.device, progress,
    )


def self_search(features: Tensor, k: int, **kw: Any) -> SearchResult:
    """Search ``features`` against themselves, each row's own match excluded."""
    if "exclude" in kw:
        raise TypeError("self_search excludes each row itself; do not pass exclude")
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    own = torch.arange(features.shape[0] if features.ndim else 0, dtype=torch.int64)
    return search(features, features, k, exclude=own, **kw)


def similarity_for(feature_shape: tuple[int, ...]) -> SimilarityKind:
    """The similarity that rows of ``feature_shape`` take: ``(D,)`` cosine, ``(T, D)`` split-product."""
    if len(feature_shape) not in (1, 2):
        raise ValueError(f"features must be global (D,) or tokens (T, D), got rows of shape {tuple(feature_shape)}")
    return "cosine" if len(feature_shape) == 1 else "split_product"


def rerank(
    queries: Tensor,
    candidates: Tensor,
    source: RowSource,
    k: int,
    *,
    similarity: SimilarityKind = "cosine",
    normalization: TokenNormalization = "token",
    device: str | torch.device | None = None,
) -> SearchResult:
    """Exact top-``k`` of given candidate rows: every candidate rescored in float32 in a fixed order.

    ``candidates`` (Q, c) int64 distinct rows of ``source`` per query (-1:
    none). The rows are gathered from ``source``, normalised like
    the queries, scored as an elementwise product summed along D (tokens: then
    the max over tokens), and ordered by (score desc, row asc), padded with
    -inf / -1 to ``k``: the same scores as the torch engine of :func:`search`
    gives those rows. Computed on ``device`` (default the queries' device);
    the result is on the CPU.
    """
    where = torch.device(device) if device is not None else queries.device
    q = _prepare_queries(queries, similarity, normalization, "float32", where)
    scores, rows = _rescore_rows(q, candidates.to(where), source, similarity, normalization, where)
    scores, rows = _order(scores, rows, k)
    return SearchResult(scores.cpu(), rows.cpu())


def score_slack(dim: int, precision: str = "float32") -> float:
    """Bound on |product score - rescored score| for unit-scale vectors, with a 2x margin.

    The products round their inputs (unit roundoff ``u_in``: 0 for
    float32, 2**-11 for TF32, 2**-8 for bf16: relative error ``2 u_in + u_in**2``
    of every term, so of the sum of ``|q_i g_i| <= 1``), may round their output
    (bf16: ``2**-8``) and accumulate in float32 in any order (``dim * 2**-24``);
    the rescoring accumulates in float32 too. For float32 (faiss's products):
    ``4 (dim + 1) 2**-24``.
    """
    u_in = {"float32": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}[precision]
    u_out = 2.0**-8 if precision == "bf16" else 0.0
    return 2.0 * (2 * u_in + u_in**2 + u_out + 2.0 * (dim + 1) * 2.0**-24)


def as_tensor(block: np.ndarray | Tensor) -> Tensor:
    """A block from a :class:`RowSource` as a tensor (read-only arrays are copied)."""
    if isinstance(block, Tensor):
        return block
    array = np.asarray(block)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def normalized_rows(x: Tensor, name: str = "rows", offset: int = 0) -> np.ndarray:
    """L2-normalised float32 C-contiguous copy of ``(N, D)`` rows on the CPU, for faiss.

    A row with NaN or inf raises a one-line ``ValueError`` naming it as
    ``{name} row {offset + i}``.
    """
    out = l2_normalize(x.detach().to("cpu", torch.float32)).contiguous()
    # normalised entries lie in [-1, 1], so a row sum is non-finite exactly when the row holds NaN or inf
    finite = torch.isfinite(out.sum(dim=1))
    if not bool(finite.all()):
        bad = offset + int((~finite).nonzero()[0, 0])
        raise ValueError(f"{name} row {bad} contains NaN or inf")
    return out.numpy()


def check_exclude(exclude: Tensor | None, num_queries: int, num_rows: int) -> np.ndarray | None:
    """``exclude`` (one gallery row per query to leave out, -1: none) as an int64 (Q,) array,
    checked: integer dtype, shape ``(num_queries,)``, values in ``[-1, num_rows)``."""
    if exclude is None:
        return None
    if not isinstance(exclude, Tensor):
        raise TypeError(f"exclude must be a torch.Tensor, got {type(exclude).__name__}")
    if exclude.dtype.is_floating_point or exclude.dtype.is_complex or exclude.dtype == torch.bool:
        raise TypeError(f"exclude must hold integer gallery rows, got {exclude.dtype}")
    if exclude.shape != (num_queries,):
        raise ValueError(
            f"exclude must have shape ({num_queries},) (one row per query), got {tuple(exclude.shape)}"
        )
    rows = exclude.detach().to("cpu", torch.int64).numpy()
    if num_queries and (rows.min() < -1 or rows.max() >= num_rows):
        raise ValueError(
            f"exclude values must be gallery rows in [0, {num_rows}) or -1, "
            f"got range [{int(rows.min())}, {int(rows.max())}]"
        )
    return rows


def _resolve_backend(
    backend: str, precision: str, similarity: str, queries: Tensor, device: str | torch.device | None
) -> str:
    """``"faiss"`` or ``"torch"``: auto = torch on an accelerator, for tokens and reduced precision."""
    if backend not in get_args(Backend):
        raise ValueError(f"backend must be one of {get_args(Backend)}, got {backend!r}")
    if precision not in get_args(Precision):
        raise ValueError(f"precision must be one of {get_args(Precision)}, got {precision!r}")
    where = torch.device(device) if device is not None else queries.device
    if backend == "faiss":
        if similarity != "cosine":
            raise ValueError("backend='faiss' searches global features (cosine) only; use backend='torch' "
                             "or 'auto' for split_product")
        if precision != "float32":
            raise ValueError(f"backend='faiss' computes in float32; precision={precision!r} needs "
                             "backend='torch' or 'auto'")
        return "faiss"
    if backend == "torch":
        return "torch"
    on_cpu = where.type == "cpu"
    return "faiss" if on_cpu and similarity == "cosine" and precision == "float32" else "torch"


# ----------------------------------------------------------------------------- faiss engine


def _search_global(
    queries: Tensor,
    source: RowSource,
    k: int,
    exclude: np.ndarray | None,
    gallery_block: int,
    query_block: int,
    progress: bool,
) -> SearchResult:
    """faiss's exact inner-product kNN over one gallery block at a time, merged into a running top-k.

    ``faiss.knn`` runs the kernel of ``IndexFlatIP.search`` (BLAS products, heap
    selection) on the normalised block where it lies, without copying it into an index.
    """
    num_q = queries.shape[0]
    scores = np.full((num_q, k), -np.inf, dtype=np.float32)
    rows = np.full((num_q, k), -1, dtype=np.int64)
    # one faiss call per gallery block for all queries: faiss tiles the queries itself (query_block
    # bounds the normalising copies), and every call leaves its threads spinning for a while
    xq = np.empty((num_q, queries.shape[1]), dtype=np.float32)
    for q0 in range(0, num_q, query_block):
        xq[q0 : q0 + query_block] = normalized_rows(queries[q0 : q0 + query_block], "queries", q0)
    blocks = source.iter_blocks(gallery_block)
    total = math.ceil(source.num_rows / gallery_block)
    for g0, raw in tqdm(blocks, total=total, desc="search", unit="block", disable=not progress):
        block = normalized_rows(as_tensor(raw), "gallery", g0)
        scores, rows = _add_block(block, xq, scores, rows, g0, exclude)
        del block
    return SearchResult(torch.from_numpy(scores), torch.from_numpy(rows))


def _add_block(
    xb: np.ndarray,
    xq: np.ndarray,
    best_s: np.ndarray,
    best_i: np.ndarray,
    offset: int,
    exclude: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The running top-k lists ``(best_s, best_i)`` (rows before ``offset``, canonical order)
    merged with gallery block ``xb`` (rows from ``offset``).

    faiss selects ``kc > k`` candidates per query; :func:`_merge_candidates`
    rescores those that can still enter the top k and flags queries whose
    k-th place could tie with a row faiss left out. Those queries are searched
    again with twice as many candidates (the whole block at most).
    """
    nb = len(xb)
    k = best_s.shape[1]
    spare = 1 if exclude is not None else 0
    kc = min(nb, k + spare + max(8, k // 4))
    out_s, out_i = best_s.copy(), best_i.copy()
    todo = np.arange(len(xq))
    while todo.size:
        step = max(1, RESULT_ELEMENTS // kc)
        unsure = []
        for c0 in range(0, todo.size, step):
            sel = todo[c0 : c0 + step]
            sub = xq if sel.size == len(xq) else xq[sel]  # the first pass: no copy of the queries
            f, i = faiss.knn(sub, xb, kc, metric=faiss.METRIC_INNER_PRODUCT)
            sub_exclude = None if exclude is None else exclude[sel]
            s, r, still = _merge_candidates(sub, xb, f, i, best_s[sel], best_i[sel], offset, sub_exclude, kc < nb)
            out_s[sel], out_i[sel] = s, r
            unsure.append(sel[still])
        todo = np.concatenate(unsure)
        kc = min(nb, 2 * kc)
    return out_s, out_i


def _merge_candidates(
    xq: np.ndarray,
    xb: np.ndarray,
    f: np.ndarray,
    i: np.ndarray,
    best_s: np.ndarray,
    best_i: np.ndarray,
    offset: int,
    exclude: np.ndarray | None,
    partial: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge faiss's candidates ``(f, i)`` of one block into the running lists, exactly.

    faiss's BLAS kernels may give identical gallery vectors scores an ulp
    apart depending on their position, so candidates are rescored with
    :func:`_rescore_pairs`, where they tie exactly. Every exact score lies
    within ``slack`` (:func:`score_slack`) of faiss's, so a candidate is
    rescored only when it can still enter the top k: its faiss score is at
    least the k-th faiss score of the block minus ``2 slack`` (else k rows of
    the block beat it) and above the running k-th score minus ``slack`` (else
    k earlier rows beat it or tie with it from a lower row). The merged lists
    are ordered by (score desc, row asc). Returns them and the queries whose
    k-th place is uncertain: ``partial`` (faiss returned part of the block) and
    the k-th score not clearly above the lowest faiss score returned (every
    row left out scored at most that in faiss, so at most that plus ``slack``).
    """
    k = best_s.shape[1]
    slack = score_slack(xq.shape[1])
    missing = i < 0
    last = np.where(missing, np.inf, f).min(axis=1)
    rows = np.where(missing, -1, i + offset)
    valid = ~missing if exclude is None else ~missing & (rows != exclude[:, None])
    fv = np.where(valid, f, -np.inf)
    kth = -np.partition(-fv, k - 1, axis=1)[:, k - 1] if fv.shape[1] >= k else np.full(len(fv), -np.inf)
    live = valid & (fv >= (kth - 2 * slack)[:, None]) & (fv > (best_s[:, k - 1] - slack)[:, None])
    pairs = np.nonzero(live)
    exact = np.full(f.shape, -np.inf, dtype=np.float32)
    exact[pairs] = _rescore_pairs(xq, xb, pairs[0], i[pairs])
    scores = np.concatenate([best_s, exact], axis=1)
    rows = np.concatenate([best_i, np.where(live, rows, -1)], axis=1)
    order = np.lexsort((rows, -scores))[:, :k]  # by -score, then row; -inf slots last
    scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
    unsure = (scores[:, k - 1] <= last + slack) & partial
    return scores, rows, unsure


def _rescore_pairs(xq: np.ndarray, xb: np.ndarray, query: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Inner products of query ``query[p]`` with block row ``local[p]``, as ``(q * g).sum(-1)``.

    An elementwise product summed along D reduces every pair in the same
    order, so identical gallery vectors get bitwise identical scores. Long
    lists are split between faiss's threads (numpy releases the GIL; each
    pair is computed alike whichever thread takes it).
    """
    count = local.size
    out = np.empty(count, dtype=np.float32)
    workers = min(faiss.omp_get_max_threads(), count // PAIRS_PER_THREAD)
    if workers <= 1:
        _rescore_range(xq, xb, query, local, out)
        return out
    bounds = np.linspace(0, count, workers + 1).astype(int)
    with ThreadPoolExecutor(workers) as pool:
        for done in [pool.submit(_rescore_range, xq, xb, query[a:b], local[a:b], out[a:b])
                     for a, b in zip(bounds[:-1], bounds[1:])]:
            done.result()
    return out


def _rescore_range(xq: np.ndarray, xb: np.ndarray, query: np.ndarray, local: np.ndarray, out: np.ndarray) -> None:
    """:func:`_rescore_pairs` of some pairs, into ``out``, in steps of ``RESCORE_ELEMENTS``."""
    count, dim = local.size, xq.shape[1]
    step = max(1, RESCORE_ELEMENTS // max(1, dim))
    cand = np.empty((min(count, step), dim), dtype=np.float32)
    qs = np.empty_like(cand)
    for p0 in range(0, count, step):
        p1 = min(count, p0 + step)
        g, q = cand[: p1 - p0], qs[: p1 - p0]
        np.take(xb, local[p0:p1], axis=0, out=g, mode="clip")  # "clip": no temporary copy (rows are valid)
        np.take(xq, query[p0:p1], axis=0, out=q, mode="clip")
        np.multiply(g, q, out=g)
        g.sum(axis=-1, out=out[p0:p1])


# ----------------------------------------------------------------------------- torch engine


@contextmanager
def _matmul_precision(precision: str) -> Iterator[None]:
    """float32 products exactly as asked: TF32 only for ``"tf32"``, never by a global setting;
    bf16 products reduced in float32 (no reduced-precision reductions in cuBLAS)."""
    old = torch.get_float32_matmul_precision()
    old_bf16 = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = old_bf16


def _margin(k: int, precision: str) -> int:
    """Spare shortlist slots beyond k, so that one scan usually suffices: every row within
    :func:`score_slack` of the k-th score must be in the shortlist, and bf16's bound (~0.024) is wide."""
    return {"float32": max(8, k // 4), "tf32": max(32, k), "bf16": max(128, 4 * k)}[precision]


def _search_torch(
    queries: Tensor,
    source: RowSource,
    k: int,
    similarity: str,
    normalization: str,
    exclude: np.ndarray | None,
    gallery_block: int,
    query_block: int,
    precision: str,
    device: torch.device,
    progress: bool,
) -> SearchResult:
    """Shortlist scan on ``device``, float32 rescoring, wider scans for the queries that need them."""
    num_q, num_g = queries.shape[0], source.num_rows
    out_s = torch.full((num_q, k), -math.inf, dtype=torch.float32, device=device)
    out_i = torch.full((num_q, k), -1, dtype=torch.int64, device=device)
    if num_q == 0 or num_g == 0:
        return SearchResult(out_s.cpu(), out_i.cpu())
    q = _prepare_queries(queries, similarity, normalization, precision, device)
    excl = None if exclude is None else torch.from_numpy(exclude).to(device)
    dim = int(queries.shape[-1])
    kc = min(num_g, k + _margin(k, precision))
    todo: Tensor | None = None  # None: every query (no copy of the queries on the first scan)
    with torch.no_grad(), _matmul_precision(precision):
        while True:
            sub_q = q if todo is None else _take(q, todo)
            sub_x = excl if excl is None or todo is None else excl[todo]
            cand_s, cand_i, g_scale = _scan(
                sub_q, sub_x, source, kc, similarity, normalization, gallery_block,
                query_block, precision, device, progress,
            )
            scores, rows = _rescore_rows(sub_q, cand_i, source, similarity, normalization, device)
            scores, rows = _order(scores, rows, k)
            # rows the shortlist left out scored at most its last product score
            last = cand_s[:, -1]
            scale = _query_scale(sub_q, similarity, normalization) * g_scale
            unsure = (
                (kc < num_g)
                & torch.isfinite(last)
                & (scores[:, k - 1] <= last + score_slack(dim, precision) * scale)
            )
            where = torch.arange(num_q, device=device) if todo is None else todo
            out_s[where], out_i[where] = scores, rows
            if not bool(unsure.any()):
                break
            todo = where[unsure]
            kc = min(num_g, 4 * kc)
    return SearchResult(out_s.cpu(), out_i.cpu())


def _take(q: tuple[Tensor, ...], rows: Tensor) -> tuple[Tensor, ...]:
    """The prepared query tensors of some queries (empty placeholders stay empty)."""
    return tuple(x[rows] if x.numel() else x for x in q)


def _prepare_queries(
    queries: Tensor, similarity: str, normalization: str, precision: str, device: torch.device
) -> tuple[Tensor, ...]:
    """``(exact, product)`` query tensors on ``device``.

    Cosine: L2-normalised float32, and a bf16 copy for bf16 products. Tokens:
    the raw features (split-product normalises them itself; the rescoring
    normalises chunks), and for bf16 products a normalised bf16 copy.
    """
    x = queries.detach().to(device)
    if similarity == "cosine":
        xn = l2_normalize(x.float())
        _check_finite(xn, "queries", 0)
        low = xn.to(torch.bfloat16) if precision == "bf16" else xn.new_empty(0)
        return xn, low
    _check_finite(x, "queries", 0)
    low = x.new_empty(0)
    if precision == "bf16":
        low = torch.cat([normalize_tokens(x[i : i + 256].float(), normalization).to(torch.bfloat16)  # type: ignore[arg-type]
                         for i in range(0, x.shape[0], 256)]) if x.shape[0] else x.to(torch.bfloat16)
    return x, low


def _check_finite(x: Tensor, name: str, offset: int) -> None:
    """One-line error naming the first row with NaN or inf.

    Checks per-row float32 sums (NaN or inf anywhere makes a row's sum non-finite):
    one reduction pass, no full-size boolean copy.
    """
    if x.shape[0] == 0:
        return
    finite = torch.isfinite(x.reshape(x.shape[0], -1).sum(dim=1, dtype=torch.float32))
    if not bool(finite.all()):
        bad = offset + int((~finite).nonzero()[0, 0])
        raise ValueError(f"{name} row {bad} contains NaN or inf")


def _query_scale(q: tuple[Tensor, ...], similarity: str, normalization: str) -> Tensor | float:
    """Per-query scale of the score error bound: 1 for normalised features, else max token norm."""
    if similarity == "cosine" or normalization != "none":
        return 1.0
    return torch.linalg.vector_norm(q[0].float(), dim=-1).amax(dim=1)


def _scan(
    q: tuple[Tensor, ...],
    exclude: Tensor | None,
    source: RowSource,
    kc: int,
    similarity: str,
    normalization: str,
    gallery_block: int,
    query_block: int,
    precision: str,
    device: torch.device,
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor | float]:
    """Product scores of every query against the whole source, keeping the top ``kc`` per query.

    Returns the shortlist's product scores ``(n, kc)`` descending, its rows
    (-1 where the score is -inf: excluded rows, or fewer than kc rows), and the
    gallery's largest token norm (error-bound scale for unnormalised tokens).
    """
    n = q[0].shape[0]
    best_s = torch.full((n, kc), -math.inf, dtype=torch.float32, device=device)
    best_i = torch.full((n, kc), -1, dtype=torch.int64, device=device)
    g_scale = torch.zeros((), device=device)
    total = math.ceil(source.num_rows / gallery_block)
    blocks = source.iter_blocks(gallery_block)
    for g0, raw in tqdm(blocks, total=total, desc="search", unit="block", disable=not progress):
        block = as_tensor(raw).to(device, non_blocking=True)
        if similarity == "cosine":
            gn = l2_normalize(block.float())
            _check_finite(gn, "gallery", g0)
            if precision == "bf16":
                gn = gn.to(torch.bfloat16)
        else:
            _check_finite(block, "gallery", g0)
            if normalization == "none":
                g_scale = torch.maximum(g_scale, torch.linalg.vector_norm(block.float(), dim=-1).max())
            gn = block
            if precision == "bf16":
                gn = normalize_tokens(block.float(), normalization).to(torch.bfloat16)  # type: ignore[arg-type]
        for q0 in range(0, n, query_block):
            q1 = min(n, q0 + query_block)
            chunk = max(1, (TILE_ELEMENTS if device.type == "cpu" else DEVICE_TILE_ELEMENTS) // (q1 - q0))
            for c0 in range(0, gn.shape[0], chunk):
                tile = _tile(q, q0, q1, gn[c0 : c0 + chunk], similarity, normalization, precision)
                first = g0 + c0
                if exclude is not None:
                    _mask_excluded(tile, exclude[q0:q1] - first)
                vals, idx = tile.topk(min(kc, tile.shape[1]), dim=1)
                s = torch.cat([best_s[q0:q1], vals.float()], dim=1)
                i = torch.cat([best_i[q0:q1], idx + first], dim=1)
                top = s.topk(kc, dim=1)
                best_s[q0:q1] = top.values
                best_i[q0:q1] = i.gather(1, top.indices)
    best_i[torch.isneginf(best_s)] = -1
    scale: Tensor | float = g_scale if (similarity != "cosine" and normalization == "none") else 1.0
    return best_s, best_i, scale


def _tile(
    q: tuple[Tensor, ...],
    q0: int,
    q1: int,
    g: Tensor,
    similarity: str,
    normalization: str,
    precision: str,
) -> Tensor:
    """Product scores ``(q1 - q0, len(g))`` of one query block and gallery chunk."""
    exact, low = q
    if similarity == "cosine":
        return (low if precision == "bf16" else exact)[q0:q1] @ g.T
    if precision == "bf16":
        return _token_tile_bf16(low[q0:q1], g)
    return split_product(exact[q0:q1], g, normalization)  # type: ignore[arg-type]


def _token_tile_bf16(q: Tensor, g: Tensor) -> Tensor:
    """``max_t <q_t, g_t>`` of normalised bf16 tokens: one bf16 ``bmm`` per token chunk, running max."""
    num_q, num_t, _ = q.shape
    t_chunk = max(1, min(num_t, TOKEN_CHUNK_ELEMENTS // max(1, num_q * g.shape[0])))
    best: Tensor | None = None
    for t0 in range(0, num_t, t_chunk):
        prod = torch.bmm(q[:, t0 : t0 + t_chunk].transpose(0, 1), g[:, t0 : t0 + t_chunk].permute(1, 2, 0))
        m = prod.amax(dim=0)
        best = m if best is None else torch.maximum(best, m)
    assert best is not None
    return best


def _mask_excluded(tile: Tensor, cols: Tensor) -> None:
    """Set ``tile[r, cols[r]]`` to -inf where ``cols[r]`` falls in the tile (no host sync)."""
    inside = (cols >= 0) & (cols < tile.shape[1])
    at = cols.clamp(0, tile.shape[1] - 1)[:, None]
    kept = tile.gather(1, at)
    tile.scatter_(1, at, torch.where(inside[:, None], torch.full_like(kept, -math.inf), kept))


def _rescore_rows(
    q: tuple[Tensor, ...],
    rows: Tensor,
    source: RowSource,
    similarity: str,
    normalization: str,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Float32 scores of every query with its candidate rows (-1: none, score -inf).

    Candidates are gathered from the source (sorted unique rows per step),
    normalised, and scored as an elementwise product summed along D
    (tokens: then the max over tokens): every pair is reduced in the same
    order, so identical gallery vectors get identical scores wherever they are.
    """
    exact = q[0]
    n, kc = rows.shape
    out = torch.full((n, kc), -math.inf, dtype=torch.float32, device=device)
    per_query = kc * max(1, math.prod(exact.shape[1:]))
    budget = RESCORE_ELEMENTS if device.type == "cpu" else DEVICE_RESCORE_ELEMENTS  # CPU: cache-sized steps
    step = max(1, budget // per_query)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        sel = rows[r0:r1]
        valid = sel >= 0
        uniq, inverse = torch.unique(sel.clamp(min=0), return_inverse=True)
        g = as_tensor(source.rows(uniq.cpu().numpy())).to(device).float()
        if similarity == "cosine":
            gn = l2_normalize(g)[inverse]  # (m, kc, D)
            s = gn.mul_(exact[r0:r1, None, :]).sum(dim=-1)
        else:
            gn = normalize_tokens(g, normalization)[inverse]  # type: ignore[arg-type]
            qn = normalize_tokens(exact[r0:r1].float(), normalization)  # type: ignore[arg-type]
            s = gn.mul_(qn[:, None]).sum(dim=-1).amax(dim=-1)
        out[r0:r1] = torch.where(valid, s, torch.full_like(s, -math.inf))
    return out, torch.where(torch.isneginf(out), torch.full_like(rows, -1), rows)


def _order(scores: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Sort each row's candidates by (score desc, gallery row asc), keep k, pad with -inf / -1."""
    n, kc = scores.shape
    key = torch.where(rows < 0, torch.full_like(rows, torch.iinfo(torch.int64).max), rows)
    by_row = key.argsort(dim=1, stable=True)
    scores, rows = scores.gather(1, by_row), rows.gather(1, by_row)
    by_score = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    scores, rows = scores.gather(1, by_score), rows.gather(1, by_score)
    if kc < k:
        scores = torch.cat([scores, scores.new_full((n, k - kc), -math.inf)], dim=1)
        rows = torch.cat([rows, rows.new_full((n, k - kc), -1)], dim=1)
    return scores, rows


# ----------------------------------------------------------------------------- checks


def _validate(
    queries: Tensor,
    gallery: Tensor | RowSource,
    k: int,
    similarity: str,
    normalization: str,
    gallery_block: int,
    query_block: int,
) -> None:
    """One-line errors for bad arguments, before any work."""
    named: list[tuple[str, Any]] = [("queries", queries)]
    if isinstance(gallery, Tensor) or not _is_row_source(gallery):
        named.append(("gallery", gallery))
    for name, x in named:
        if not isinstance(x, Tensor):
            kinds = "a torch.Tensor" if name == "queries" else "a torch.Tensor or a RowSource (e.g. a FeatureStore)"
            raise TypeError(f"{name} must be {kinds}, got {type(x).__name__}")
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
    gallery_shape = (
        tuple(gallery.shape) if isinstance(gallery, Tensor)
        else (int(gallery.num_rows), *(int(s) for s in gallery.feature_shape))
    )
    expected = {"cosine": 2, "split_product": 3}
    ndim = expected[similarity]
    for name, shape in (("queries", tuple(queries.shape)), ("gallery", gallery_shape)):
        if len(shape) != ndim:
            hint = (
                "token features (N, T, D) need similarity='split_product'"
                if len(shape) == 3 and similarity == "cosine"
                else "global features (N, D) need similarity='cosine'"
                if len(shape) == 2
                else f"expected {'(N, D)' if ndim == 2 else '(N, T, D)'}"
            )
            raise ValueError(
                f"similarity={similarity!r} got {name} of shape {shape}: {hint}"
            )
    if queries.shape[1:] != gallery_shape[1:]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and gallery {gallery_shape} differ in "
            f"feature shape {tuple(queries.shape[1:])} vs {gallery_shape[1:]}"
        )


def _is_row_source(x: object) -> bool:
    """Whether ``x`` has what :class:`RowSource` promises (a structural check)."""
    return all(hasattr(x, name) for name in ("num_rows", "feature_shape", "iter_blocks", "rows"))


__all__ = [
    "Backend",
    "Precision",
    "RowSource",
    "SearchResult",
    "TensorRows",
    "as_tensor",
    "check_exclude",
    "normalized_rows",
    "rerank",
    "score_slack",
    "search",
    "self_search",
    "similarity_for",
]
