"""The scan's engine: each generation's top-k training rows, the self-similarity baseline, duplicate
counts and the per-class analysis, over feature sources (stores or tensors), in bounded memory."""


from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lit.commands.scan.analysis import (
    ClassSimilarity,
    background_bias,
    baseline_rows,
    class_similarity,
    count_above,
    normalize_scores,
    within_class_top1,
)
from lit.commands.scan.approx import approximate_search, open_index
from lit.commands.scan.sources import FeatureSource
from lit.commands.scan.types import ScanOptions, ScanResult
from lit.errors import UserError
from lit.search import SearchResult, search, similarity_for
from lit.similarity import (
    SimilarityKind,
    TokenNormalization,
    cosine_similarity,
    split_product,
)

#: Float32 bytes of query features held at once (token features of many queries are searched in chunks).
QUERY_CHUNK_BYTES = 2**30


def pairwise(queries: Tensor, block: Tensor, similarity: SimilarityKind, normalization: TokenNormalization) -> Tensor:
    """(Q, B) similarity of queries to a block of gallery rows, on the scan's similarity."""
    if similarity == "cosine":
        return cosine_similarity(queries, block)
    return split_product(queries, block, normalization)


def query_chunks(rows: Tensor, feature_shape: tuple[int, ...], chunk_bytes: int | None = None) -> list[Tensor]:
    """``rows`` cut so that each chunk's float32 features take at most ``chunk_bytes`` (default
    :data:`QUERY_CHUNK_BYTES`; token features of thousands of queries do not fit in memory at once)."""
    row_bytes = 4 * int(np.prod(feature_shape))
    size = max(1, (QUERY_CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // row_bytes)
    return [rows[start:start + size] for start in range(0, rows.numel(), size)]


def search_source(queries: FeatureSource, query_rows: Tensor, source: FeatureSource, k: int, *,
                  normalization: TokenNormalization, exclude: Tensor | None = None, block_rows: int = 65536,
                  device: str = "cpu", progress: bool = False) -> SearchResult:
    """Exact top-``k`` rows of ``source`` for the given rows of ``queries``: :func:`lit.search.search`
    over the source's blocks on ``device`` (faiss on the CPU, matrix products + ``topk`` on a GPU),
    one chunk of query rows at a time (:func:`query_chunks`)."""
    scores, indices, done = [], [], 0
    for chunk in query_chunks(query_rows, queries.feature_shape):
        part = None if exclude is None else exclude[done:done + chunk.numel()]
        found = search(queries.rows(chunk).to(device), source.row_source, k,
                       similarity=similarity_for(source.feature_shape), normalization=normalization,
                       exclude=part, gallery_block=block_rows, progress=progress, device=device)
        scores.append(found.scores)
        indices.append(found.indices)
        done += chunk.numel()
    return SearchResult(torch.cat(scores), torch.cat(indices))


def count_duplicates(query_rows: Tensor, source: FeatureSource, *, threshold: float,
                     similarity: SimilarityKind, normalization: TokenNormalization, block_rows: int = 65536,
                     device: str = "cpu", progress: bool = False, desc: str = "duplicates") -> Tensor:
    """Per given row of ``source``, the other rows of ``source`` with similarity > ``threshold``
    (scores computed block by block on ``device``; counts are summed on the CPU)."""
    counts = []
    total = math.ceil(source.num_rows / block_rows)
    for chunk in query_chunks(query_rows, source.feature_shape):
        queries = source.rows(chunk).to(device)
        found = torch.zeros(chunk.numel(), dtype=torch.int64)
        for start, block in tqdm(source.iter_blocks(block_rows), total=total, desc=desc, unit="block",
                                 disable=not progress or total < 2):
            scores = pairwise(queries, block.to(device), similarity, normalization).cpu()
            found += count_above(scores, threshold, chunk, start)
        counts.append(found)
    return torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int64)


# ----------------------------------------------------------------------------- the scan


def run_scan(generations: FeatureSource, training: FeatureSource, options: ScanOptions,
             background: FeatureSource | None = None) -> ScanResult:
    """Search, baseline, duplicates, per-class and normalisation: the numbers of a scan."""
    if training.num_rows < 2:
        raise UserError(f"--training: need at least 2 training images, got {training.num_rows}")
    if generations.num_rows < 1:
        raise UserError("--generations: no generation could be embedded")
    search_kw: dict[str, Any] = {"normalization": options.token_normalization, "block_rows": options.block_rows,
                                 "device": options.device, "progress": options.progress}
    if generations.feature_shape != training.feature_shape:
        raise UserError(f"generations have features of shape {generations.feature_shape}, the training set "
                        f"{training.feature_shape}: they were not made by the same descriptor")
    # the similarity follows the features (lit.search.similarity_for): (D,) cosine, (T, D) split-product
    options = replace(options, similarity="cosine" if len(training.feature_shape) == 1 else "split_product")
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    k = min(options.k, training.num_rows)
    all_generations = torch.arange(generations.num_rows)
    search_record: dict[str, Any] = {"method": "exact"}
    if options.index is None:
        top = search_source(generations, all_generations, training, k, **search_kw)
    else:
        ann, search_record = open_index(training.row_source, options.index, progress=options.progress)
        timings["index_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        found = [approximate_search(ann, generations.rows(chunk), training.row_source, k, search_record,
                                    progress=options.progress)
                 for chunk in query_chunks(all_generations, generations.feature_shape)]
        top = SearchResult(torch.cat([f.scores for f in found]), torch.cat([f.indices for f in found]))
    timings["search_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    sample = baseline_rows(training.num_rows, options.baseline_sample, options.seed)
    own = sample.rows
    baseline = search_source(training, own, training, 1, exclude=own, **search_kw).scores[:, 0]
    timings["baseline_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    matched = top.indices[:, 0]
    random = baseline_rows(training.num_rows, options.random_sample, options.seed + 1)
    unique = torch.unique(matched)
    query_rows = torch.cat([unique, random.rows])
    counts = count_duplicates(query_rows, training,
                              threshold=options.duplicate_threshold, similarity=options.similarity,
                              normalization=options.token_normalization, block_rows=options.block_rows,
                              device=options.device, progress=options.progress)
    per_unique = dict(zip(unique.tolist(), counts[: unique.numel()].tolist()))
    match_duplicates = torch.tensor([per_unique[int(r)] for r in matched], dtype=torch.int64)
    random_duplicates = counts[unique.numel():]
    timings["duplicates_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    classes, class_source = _class_analysis(generations, training, top, options)
    timings["classes_s"] = time.perf_counter() - clock

    normalized, normalization = None, None
    if background is not None:
        clock = time.perf_counter()
        if background.num_rows < options.norm_k:
            raise UserError(f"--background has {background.num_rows} images, fewer than --norm_k {options.norm_k}")
        near = search_source(generations, all_generations, background, options.norm_k, **search_kw)
        bias = background_bias(near.scores, options.norm_k)
        normalized = normalize_scores(top.scores.double(), bias, options.norm_beta).float()
        normalization = {"method": "sscd", "beta": options.norm_beta, "k": options.norm_k,
                         "background": background.manifest.get("extra", {}).get("input")
                         or background.manifest.get("root", background.name),
                         "background_rows": background.num_rows,
                         "note": "score - beta * mean similarity of the generation to its k nearest background items"}
        timings["normalization_s"] = time.perf_counter() - clock
    return ScanResult(top, normalized, baseline, sample, match_duplicates, random, random_duplicates,
                      classes, class_source, normalization, timings, search_record)


def _class_analysis(generations: FeatureSource, training: FeatureSource, top: SearchResult,
                    options: ScanOptions) -> tuple[ClassSimilarity | None, str | None]:
    """Fig. 6 when the training set has labels: generation classes are their own labels when known,
    else the label of their top-1 training match (said in ``class_source``)."""
    labels = training.labels
    if labels is None or all(label is None for label in labels):
        return None, None
    gen_labels = generations.labels
    if gen_labels is not None and all(label is not None for label in gen_labels):
        generation_classes, source = [str(label) for label in gen_labels], "generation labels"
    else:
        generation_classes = [str(labels[int(r)]) for r in top.indices[:, 0]]
        source = "label of the top-1 training match"
    by_class: dict[str, list[int]] = {}
    for row, label in enumerate(labels):
        if label is not None:
            by_class.setdefault(str(label), []).append(row)
    within_scores: list[float] = []
    within_labels: list[str] = []
    for number, (label, rows) in enumerate(sorted(by_class.items())):
        chosen = torch.tensor(rows, dtype=torch.int64)
        if chosen.numel() > options.class_sample:
            pick = baseline_rows(chosen.numel(), options.class_sample, options.seed + 2 + number).rows
            chosen = chosen[pick]
        if chosen.numel() < 2:
            continue
        features = training.rows(chosen)
        found = search(features, features, k=1, similarity=options.similarity,
                       normalization=options.token_normalization, exclude=torch.arange(chosen.numel()))
        within_scores += found.scores[:, 0].tolist()
        within_labels += [label] * chosen.numel()
    mean_within = within_class_top1(torch.tensor(within_scores, dtype=torch.float64), within_labels)
    return class_similarity(top.scores[:, 0], generation_classes, mean_within), source


