"""Replication statistics (paper Sec. 5 and 7): one definition each, for the monitor, the scan and
every report.

- **top-1 similarity** of a generation: its largest similarity to any training image
  (:func:`top_matches`, column 0);
- **self-similarity baseline**: for each training image, its largest similarity to any
  *other* training image (:func:`self_similarity_baseline`); on every training image by
  default, on a seeded sample of rows only when asked (:func:`baseline_rows`, whose
  :attr:`RowSample.label` every output prints beside the numbers);
- **replication rate at t**: share of generations whose top-1 similarity *exceeds* t
  (strictly; :func:`replication_rates`, :func:`replication_stats`; the paper reports
  t = 0.5 with SSCD);
- **similarity to a named training image** (a generation's caption-source image,
  :func:`paired_similarity`), by the same similarity as the search;
- **duplicates of a training image**: the other training images with similarity
  > ``threshold`` (:data:`lit.choices.DUPLICATE_THRESHOLD` = 0.95, paper Sec. 7), counted
  exhaustively over the whole training set, block by block (:func:`duplicate_counts`),
  never read off a top-k list (which would miss the members of large groups).

**Mirror-aware matching** is one option of all of them, off by default
(:data:`lit.choices.MATCH_MIRRORS`, the paper's definition): given the features of the
horizontally flipped training images (``mirrored``, row for row), a training image
scores ``max(s(q, g), s(q, mirror(g)))``; in the baseline and the duplicate counts an
image's own mirror is left out with the image. A DDPM trained with random flips copies
mirrored images as often as not, and a flip-sensitive descriptor (raw pixels, most CNN
features) misses those copies without it; it doubles the search.

Features are a :class:`lit.search.RowSource` (a feature store, read in blocks) or a tensor,
so the same function serves the monitor's few thousand in-memory rows and a scan's store
of millions. The similarity follows the features: ``(N, D)`` cosine, ``(N, T, D)``
split-product (``normalization`` per token by default). Summaries use linear-interpolation
quantiles (numpy's default), so the median of an even count is the mean of the two middle
values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lit.choices import DEFAULT_THRESHOLDS, DUPLICATE_THRESHOLD, TokenNormalization
from lit.search import RowSource, TensorRows, search, similarity_for
from lit.similarity import cosine_similarity, split_product

#: Float32 bytes of query features held at once (token features of many queries are searched in chunks).
QUERY_CHUNK_BYTES = 2**30

Features = Tensor | RowSource


# ----------------------------------------------------------------------------- rates and summaries


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

    def record(self) -> dict[str, Any]:
        """JSON-able: ``count``, ``rates`` (``{"0.5": ...}``), ``mean``, ``median``, ``p95``, ``max``."""
        return {"count": self.count, "rates": {format_threshold(t): rate for t, rate in self.rates.items()},
                "mean": self.mean, "median": self.median, "p95": self.p95, "max": self.max}


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


def score_summary(scores: Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """:func:`replication_stats` as JSON (:meth:`ReplicationStats.record`)."""
    return replication_stats(scores, thresholds).record()


def top_copies(scores: Tensor, count: int) -> Tensor:
    """Rows of the ``count`` highest top-1 scores, highest first (ties: lower row first)."""
    scores = _check_scores(scores)
    return torch.sort(scores, descending=True, stable=True).indices[:count]


# ----------------------------------------------------------------------------- which training rows


@dataclass(frozen=True)
class RowSample:
    """Rows chosen from ``population`` rows: all of them (``exact``) or a seeded sample of ``len(rows)``."""

    rows: Tensor  # (n,) int64, ascending
    population: int
    exact: bool
    seed: int | None

    @property
    def label(self) -> str:
        """How the rows were chosen, in words, for every output that shows numbers over them."""
        if self.exact:
            return f"exact: all {self.population} training images"
        return f"sampled: {int(self.rows.numel())} of {self.population} training images (seed {self.seed})"

    def record(self) -> dict[str, Any]:
        """What was sampled (summary.json and the monitor's record add :attr:`label`)."""
        return {"exact": self.exact, "sample_size": int(self.rows.numel()), "population": self.population,
                "seed": self.seed}


def baseline_rows(num_rows: int, sample_size: int | None, seed: int = 0) -> RowSample:
    """Every row when ``sample_size`` is ``None`` or covers ``num_rows``; else ``sample_size``
    distinct rows drawn with ``torch.Generator().manual_seed(seed)`` (same seed, same rows), ascending."""
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    if sample_size is None or sample_size >= num_rows:
        return RowSample(torch.arange(num_rows, dtype=torch.int64), num_rows, True, None)
    if sample_size < 1:
        raise ValueError(f"sample_size must be >= 1, got {sample_size}")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(num_rows, generator=generator)[:sample_size]
    return RowSample(torch.sort(rows).values, num_rows, False, seed)


# ----------------------------------------------------------------------------- features


@dataclass(frozen=True)
class SearchSettings:
    """How the features are compared and streamed (never what is computed).

    ``normalization``: split-product token normalisation (``lit.similarity``); ``block_rows``:
    training rows scored at a time; ``device``: where (faiss on the CPU, matrix products on a
    GPU); ``chunk_bytes``: float32 bytes of query features held at once (default
    :data:`QUERY_CHUNK_BYTES`).
    """

    normalization: TokenNormalization = "token"
    block_rows: int = 65536
    device: str = "cpu"
    progress: bool = False
    chunk_bytes: int | None = None


def as_rows(features: Features) -> RowSource:
    """A tensor as a :class:`lit.search.TensorRows`; a row source as it is."""
    return TensorRows(features) if isinstance(features, Tensor) else features


def read_rows(source: RowSource, rows: Tensor) -> Tensor:
    """Features of ``rows`` as a float32 CPU tensor."""
    found = source.rows(rows.to(torch.int64).cpu().numpy())
    return (found if isinstance(found, Tensor) else torch.from_numpy(np.ascontiguousarray(found))).float().cpu()


def _as_tensor(block: np.ndarray | Tensor) -> Tensor:
    """A block from a :class:`lit.search.RowSource` as a tensor (read-only arrays are copied)."""
    if isinstance(block, Tensor):
        return block
    array = np.asarray(block)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def query_chunks(rows: Tensor, feature_shape: tuple[int, ...], chunk_bytes: int | None = None) -> list[Tensor]:
    """``rows`` cut so that each chunk's float32 features take at most ``chunk_bytes`` (default
    :data:`QUERY_CHUNK_BYTES`; token features of thousands of queries do not fit in memory at once)."""
    row_bytes = 4 * int(np.prod(feature_shape))
    size = max(1, (QUERY_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // row_bytes)
    return [rows[start:start + size] for start in range(0, rows.numel(), size)]


def pairwise(queries: Tensor, block: Tensor, normalization: TokenNormalization = "token") -> Tensor:
    """(Q, B) similarity of queries to a block of rows: cosine for (N, D), split-product for (N, T, D)."""
    if queries.ndim == 2:
        return cosine_similarity(queries, block)
    return split_product(queries, block, normalization)


class MirroredRows:
    """A :class:`lit.search.RowSource` of ``2N`` rows: the training rows ``0 .. N-1``, then their
    mirrors ``N .. 2N-1`` (what :func:`top_matches` searches when matching is mirror-aware)."""

    def __init__(self, training: RowSource, mirrored: RowSource) -> None:
        if mirrored.num_rows != training.num_rows or tuple(mirrored.feature_shape) != tuple(training.feature_shape):
            raise ValueError(f"mirrored features ({mirrored.num_rows}, {tuple(mirrored.feature_shape)}) must match "
                             f"the training features ({training.num_rows}, {tuple(training.feature_shape)}) row for row")
        self.training, self.mirrored = training, mirrored

    @property
    def num_rows(self) -> int:
        return 2 * self.training.num_rows

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.training.feature_shape)

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray | Tensor]]:
        yield from self.training.iter_blocks(block_rows)
        for start, block in self.mirrored.iter_blocks(block_rows):
            yield start + self.training.num_rows, block

    def rows(self, indices: np.ndarray) -> Tensor:
        indices = np.asarray(indices, dtype=np.int64)
        n = self.training.num_rows
        own = indices < n
        out = torch.empty((indices.size, *self.feature_shape), dtype=torch.float32)
        out[torch.from_numpy(own)] = read_rows(self.training, torch.from_numpy(indices[own]))
        out[torch.from_numpy(~own)] = read_rows(self.mirrored, torch.from_numpy(indices[~own] - n))
        return out


# ----------------------------------------------------------------------------- the statistics


@dataclass(frozen=True)
class Matches:
    """Top-k training rows per query: ``scores`` (Q, k) float32 (-inf padding), ``indices`` (Q, k)
    int64 training rows (-1 padding), ``mirrored`` (Q, k) bool (the match was the flipped image)."""

    scores: Tensor
    indices: Tensor
    mirrored: Tensor

    @property
    def top1(self) -> Tensor:
        """Each query's top-1 similarity (Q,)."""
        return self.scores[:, 0]


def top_matches(queries: Features, training: Features, k: int, *, mirrored: Features | None = None,
                query_rows: Tensor | None = None, own_rows: Tensor | None = None,
                settings: SearchSettings = SearchSettings()) -> Matches:
    """The ``k`` most similar training rows of each query (column 0: its top-1 similarity).

    Exact (``lit.search.search``: ties by ascending row, the image before its mirror).
    ``query_rows`` picks rows of ``queries`` (default all), searched a chunk at a time;
    ``own_rows`` (one per query, -1 for none) leaves out a training row per query, with its
    mirror: the self-match of the baseline. With ``mirrored`` a row scores through the better
    of itself and its mirror and is listed once.
    """
    source, gallery = as_rows(queries), as_rows(training)
    rows = torch.arange(source.num_rows) if query_rows is None else query_rows.to(torch.int64)
    if own_rows is not None and own_rows.shape != rows.shape:
        raise ValueError(f"own_rows must name one row per query ({rows.numel()}), got {tuple(own_rows.shape)}")
    total = gallery.num_rows
    searched: RowSource = gallery if mirrored is None else MirroredRows(gallery, as_rows(mirrored))
    width = k if mirrored is None else min(2 * k + (0 if own_rows is None else 2), 2 * total)
    parts: list[Matches] = []
    done = 0
    for chunk in query_chunks(rows, tuple(source.feature_shape), settings.chunk_bytes):
        own = None if own_rows is None else own_rows[done:done + chunk.numel()].to(torch.int64)
        done += chunk.numel()
        found = search(read_rows(source, chunk).to(settings.device), searched, width,
                       similarity=similarity_for(tuple(searched.feature_shape)), normalization=settings.normalization,
                       exclude=own if mirrored is None else None, gallery_block=settings.block_rows,
                       progress=settings.progress, device=settings.device)
        scores, indices = found.scores.cpu(), found.indices.cpu()
        if mirrored is None:
            parts.append(Matches(scores, indices, torch.zeros_like(indices, dtype=torch.bool)))
        else:
            parts.append(_fold_mirrors(scores, indices, total, k, own))
    if not parts:
        return Matches(torch.empty(0, k), torch.empty(0, k, dtype=torch.int64), torch.empty(0, k, dtype=torch.bool))
    return Matches(*(torch.cat([getattr(p, name) for p in parts]) for name in ("scores", "indices", "mirrored")))


def _fold_mirrors(scores: Tensor, indices: Tensor, total: int, k: int, own: Tensor | None) -> Matches:
    """Top-``k`` training rows from a search over :class:`MirroredRows`: each row once (through the
    better of itself and its mirror), own rows and their mirrors dropped, padded like ``lit.search``."""
    rows = torch.where(indices >= 0, indices % total, indices)
    flipped = indices >= total
    drop = rows < 0
    if own is not None:
        drop |= rows == own[:, None]
    width = rows.shape[1]
    earlier = torch.ones(width, width, dtype=torch.bool).tril(diagonal=-1)  # [i, j]: j before i
    repeated = ((rows[:, :, None] == rows[:, None, :]) & earlier & ~drop[:, None, :]).any(dim=2)
    drop |= repeated  # a row already listed through its better-scoring twin
    order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)[:, :k]  # kept entries first, in score order
    scores = torch.where(drop, torch.tensor(float("-inf")), scores).gather(1, order)
    rows = torch.where(drop, torch.tensor(-1), rows).gather(1, order)
    flipped = (flipped & ~drop).gather(1, order)
    if scores.shape[1] < k:  # fewer candidates than k: pad like lit.search
        pad = k - scores.shape[1]
        scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], dim=1)
        rows = torch.cat([rows, rows.new_full((rows.shape[0], pad), -1)], dim=1)
        flipped = torch.cat([flipped, flipped.new_zeros((flipped.shape[0], pad))], dim=1)
    return Matches(scores, rows, flipped)


def self_similarity_baseline(training: Features, rows: Tensor | None = None, *, mirrored: Features | None = None,
                             settings: SearchSettings = SearchSettings()) -> Tensor:
    """Each training row of ``rows`` (default all, see :func:`baseline_rows`): its largest similarity
    to any *other* training image (mirror-aware with ``mirrored``; its own mirror left out), (n,) float32."""
    source = as_rows(training)
    if source.num_rows < 2:
        raise ValueError(f"the self-similarity baseline needs at least 2 training images, got {source.num_rows}")
    rows = torch.arange(source.num_rows) if rows is None else rows.to(torch.int64)
    return top_matches(source, source, 1, mirrored=mirrored, query_rows=rows, own_rows=rows,
                       settings=settings).scores[:, 0]


def paired_similarity(queries: Features, training: Features, query_rows: Tensor, training_rows: Tensor, *,
                      mirrored: Features | None = None, settings: SearchSettings = SearchSettings(),
                      pairs_per_block: int = 64) -> Tensor:
    """The similarity of query row ``query_rows[i]`` to training row ``training_rows[i]``, (n,) float32:
    a generation against one named training image (its caption-source image, Fig. 11 centre), by
    the search's own similarity (:func:`pairwise`), mirror-aware with ``mirrored`` (the better of
    the image and its mirror)."""
    source, gallery = as_rows(queries), as_rows(training)
    if query_rows.shape != training_rows.shape or query_rows.ndim != 1:
        raise ValueError(f"need one training row per query row, got {tuple(query_rows.shape)} and "
                         f"{tuple(training_rows.shape)}")
    flips = None if mirrored is None else as_rows(mirrored)
    parts = []
    for start in range(0, query_rows.numel(), pairs_per_block):
        rows = training_rows[start:start + pairs_per_block]
        q = read_rows(source, query_rows[start:start + pairs_per_block]).to(settings.device)
        scores = pairwise(q, read_rows(gallery, rows).to(settings.device), settings.normalization).diagonal()
        if flips is not None:
            flipped = pairwise(q, read_rows(flips, rows).to(settings.device), settings.normalization).diagonal()
            scores = torch.maximum(scores, flipped)
        parts.append(scores.float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0)


def count_above(similarities: Tensor, threshold: float, own_rows: Tensor | None = None,
                block_start: int = 0) -> Tensor:
    """Per query, the gallery columns of one block with similarity strictly above ``threshold``.

    ``similarities`` (Q, B) scores a block of gallery rows ``block_start .. block_start + B``;
    ``own_rows`` (Q,) names each query's own global gallery row (not counted; -1 for none).
    Summing the counts of every block gives the count over the whole gallery.
    """
    if similarities.ndim != 2:
        raise ValueError(f"similarities must be (Q, B), got shape {tuple(similarities.shape)}")
    above = similarities > threshold
    if own_rows is not None:
        if own_rows.shape != (similarities.shape[0],):
            raise ValueError(f"own_rows must be ({similarities.shape[0]},), got {tuple(own_rows.shape)}")
        local = own_rows.to(torch.int64) - block_start
        inside = (local >= 0) & (local < similarities.shape[1])
        columns = torch.arange(similarities.shape[1])[None, :]
        above &= ~((columns == local[:, None]) & inside[:, None])
    return above.sum(dim=1).to(torch.int64)


def duplicate_counts(training: Features, rows: Tensor, *, mirrored: Features | None = None,
                     threshold: float = DUPLICATE_THRESHOLD, settings: SearchSettings = SearchSettings()) -> Tensor:
    """Per training row of ``rows``: how many *other* training images score above ``threshold``
    against it (mirror-aware with ``mirrored``: through the better of the image and its mirror;
    its own mirror not counted). Exhaustive: every training row is scored, ``block_rows`` at a time."""
    source = as_rows(training)
    flips = None if mirrored is None else as_rows(mirrored)
    if flips is not None:
        MirroredRows(source, flips)  # the same shape, row for row
    rows = rows.to(torch.int64)
    counts = []
    blocks = -(-source.num_rows // settings.block_rows)
    for chunk in query_chunks(rows, tuple(source.feature_shape), settings.chunk_bytes):
        queries = read_rows(source, chunk).to(settings.device)
        found = torch.zeros(chunk.numel(), dtype=torch.int64)
        for start, block in tqdm(source.iter_blocks(settings.block_rows), total=blocks, desc="duplicates",
                                 unit="block", disable=not settings.progress or blocks < 2):
            scores = pairwise(queries, _as_tensor(block).float().to(settings.device), settings.normalization)
            if flips is not None:
                flipped = read_rows(flips, torch.arange(start, start + block.shape[0]))
                scores = torch.maximum(scores, pairwise(queries, flipped.to(settings.device), settings.normalization))
            found += count_above(scores.cpu(), threshold, chunk, start)
        counts.append(found)
    return torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int64)


def describe_counts(counts: Tensor) -> dict[str, Any]:
    """Duplicate counts of some training images (one per generation or sampled row) as JSON:
    ``count``, ``mean``, ``median`` (the lower middle value, as ``torch.median``), ``max`` and
    ``share_with_duplicates`` (share with at least one)."""
    if counts.numel() == 0:
        raise ValueError("describe_counts needs at least one count")
    values = counts.double()
    return {"count": int(values.numel()), "mean": float(values.mean()), "median": float(values.median()),
            "max": int(counts.max()), "share_with_duplicates": float((counts > 0).double().mean())}


def duplicate_comparison(match_counts: Tensor, training_counts: Tensor,
                         threshold: float = DUPLICATE_THRESHOLD) -> dict[str, Any]:
    """Fig. 11 right: duplicates (> ``threshold``) of each generation's top match (``top_matches``)
    vs of training images (``random_training``: the sampled, or all, training rows)."""
    if match_counts.numel() == 0 or training_counts.numel() == 0:
        raise ValueError("duplicate_comparison needs at least one top match and one training image")
    return {"threshold": threshold, "top_matches": describe_counts(match_counts),
            "random_training": describe_counts(training_counts)}
