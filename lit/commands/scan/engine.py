"""The scan's engine: each generation's top-k training rows, the self-similarity baseline, duplicate
counts, the per-class analysis and the background normalisation, over feature sources (stores or
tensors), in bounded memory. Every replication statistic is :mod:`lit.replication`'s (the monitor's)."""


from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from lit.commands.scan.analysis import (
    ClassSimilarity,
    background_bias,
    class_similarity,
    normalize_scores,
    within_class_top1,
)
from lit.commands.scan.approx import approximate_search, open_index
from lit.commands.scan.sources import FeatureSource
from lit.commands.scan.types import ScanOptions, ScanResult, SourceMatches
from lit.errors import UserError
from lit.replication import (
    Matches,
    SearchSettings,
    baseline_rows,
    duplicate_counts,
    paired_similarity,
    query_chunks,
    self_similarity_baseline,
    top_matches,
)
from lit.search import RowSource, TensorRows

# ----------------------------------------------------------------------------- the scan


def run_scan(generations: FeatureSource, training: FeatureSource, options: ScanOptions,
             background: FeatureSource | None = None, mirrored: FeatureSource | None = None,
             source_rows: Tensor | None = None) -> ScanResult:
    """Search, baseline, duplicates, per-class and normalisation: the numbers of a scan.

    ``mirrored``: the features of the horizontally flipped training images, row for row (needed,
    and used, only with ``options.match_mirrors``). ``source_rows``: each generation's
    caption-source training row (-1: none; ``lit generate``'s source keys): adds each generation's
    similarity to it and its duplicate count (counted in the same pass as the top matches')."""
    if training.num_rows < 2:
        raise UserError(f"--training: need at least 2 training images, got {training.num_rows}")
    if generations.num_rows < 1:
        raise UserError("--generations: no generation could be embedded")
    if generations.feature_shape != training.feature_shape:
        raise UserError(f"generations have features of shape {generations.feature_shape}, the training set "
                        f"{training.feature_shape}: they were not made by the same descriptor")
    flips = None
    if options.match_mirrors:
        if mirrored is None:
            raise UserError("--match_mirrors needs the features of the mirrored training images")
        if mirrored.num_rows != training.num_rows or mirrored.feature_shape != training.feature_shape:
            raise UserError(f"the mirrored training set has {mirrored.num_rows} rows of {mirrored.feature_shape}, "
                            f"the training set {training.num_rows} of {training.feature_shape}: not row for row")
        if options.index is not None:
            raise UserError("--index searches the training store only, not its mirror: use exact search "
                            "(--index null) with --match_mirrors")
        flips = mirrored.row_source
    # the similarity follows the features (lit.replication): (D,) cosine, (T, D) split-product
    settings = SearchSettings(normalization=options.token_normalization, block_rows=options.block_rows,
                              device=options.device, progress=options.progress)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    k = min(options.k, training.num_rows)
    search_record: dict[str, Any] = {"method": "exact"}
    if options.index is None:
        top = top_matches(generations.row_source, training.row_source, k, mirrored=flips, settings=settings)
    else:
        ann, search_record = open_index(training.row_source, options.index, progress=options.progress)
        timings["index_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        found = [approximate_search(ann, generations.rows(chunk), training.row_source, k, search_record,
                                    progress=options.progress)
                 for chunk in query_chunks(torch.arange(generations.num_rows), generations.feature_shape)]
        indices = torch.cat([f.indices for f in found])
        top = Matches(torch.cat([f.scores for f in found]), indices, torch.zeros_like(indices, dtype=torch.bool))
    timings["search_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    sample = baseline_rows(training.num_rows, options.baseline_sample, options.seed)
    baseline = self_similarity_baseline(training.row_source, sample.rows, mirrored=flips, settings=settings)
    timings["baseline_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    matched = top.indices[:, 0]
    random = baseline_rows(training.num_rows, options.random_sample, options.seed + 1)
    unique = torch.unique(matched)
    known = torch.zeros(0, dtype=torch.int64)
    if source_rows is not None:
        if source_rows.shape != (generations.num_rows,):
            raise ValueError(f"source_rows must name one training row per generation ({generations.num_rows}), "
                             f"got {tuple(source_rows.shape)}")
        known = torch.unique(source_rows[source_rows >= 0])
    counts = duplicate_counts(training.row_source, torch.cat([unique, random.rows, known]), mirrored=flips,
                              threshold=options.duplicate_threshold, settings=settings)
    per_unique = dict(zip(unique.tolist(), counts[: unique.numel()].tolist()))
    match_duplicates = torch.tensor([per_unique[int(r)] for r in matched], dtype=torch.int64)
    random_duplicates = counts[unique.numel():unique.numel() + random.rows.numel()]
    sources = None
    if source_rows is not None:
        per_source = dict(zip(known.tolist(), counts[unique.numel() + random.rows.numel():].tolist()))
        sources = _source_matches(generations, training, source_rows, per_source, flips, settings)
    timings["duplicates_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    classes, class_source = _class_analysis(generations, training, top, options, mirrored if flips else None)
    timings["classes_s"] = time.perf_counter() - clock

    normalized, normalization = None, None
    if background is not None:
        clock = time.perf_counter()
        if background.num_rows < options.norm_k:
            raise UserError(f"--background has {background.num_rows} images, fewer than --norm_k {options.norm_k}")
        near = top_matches(generations.row_source, background.row_source, options.norm_k, settings=settings)
        bias = background_bias(near.scores, options.norm_k)
        normalized = normalize_scores(top.scores.double(), bias, options.norm_beta).float()
        normalization = {"method": "sscd", "beta": options.norm_beta, "k": options.norm_k,
                         "background": background.manifest.get("extra", {}).get("input")
                         or background.manifest.get("root", background.name),
                         "background_rows": background.num_rows,
                         "note": "score - beta * mean similarity of the generation to its k nearest background items"}
        timings["normalization_s"] = time.perf_counter() - clock
    return ScanResult(top, normalized, baseline, sample, match_duplicates, random, random_duplicates,
                      classes, class_source, normalization, timings, search_record, sources)


def _source_matches(generations: FeatureSource, training: FeatureSource, source_rows: Tensor,
                    per_source: dict[int, int], flips: RowSource | None,
                    settings: SearchSettings) -> SourceMatches:
    """Each generation's similarity to its caption-source row and that row's duplicates (NaN / -1: none)."""
    rows = source_rows.to(torch.int64)
    known = rows >= 0
    similarity = torch.full((rows.numel(),), float("nan"))
    similarity[known] = paired_similarity(generations.row_source, training.row_source,
                                          torch.nonzero(known).flatten(), rows[known], mirrored=flips,
                                          settings=settings)
    duplicates = torch.tensor([per_source.get(int(r), -1) for r in rows], dtype=torch.int64)
    return SourceMatches(rows, similarity, duplicates)


def _class_analysis(generations: FeatureSource, training: FeatureSource, top: Matches, options: ScanOptions,
                    mirrored: FeatureSource | None) -> tuple[ClassSimilarity | None, str | None]:
    """Fig. 6 when the training set has labels: generation classes are their own labels when known,
    else the label of their top-1 training match (said in ``class_source``). The within-class
    self-similarity is :func:`lit.replication.self_similarity_baseline` over the class's images."""
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
    settings = SearchSettings(normalization=options.token_normalization, block_rows=options.block_rows,
                              device=options.device)
    for number, (label, rows) in enumerate(sorted(by_class.items())):
        chosen = torch.tensor(rows, dtype=torch.int64)
        if chosen.numel() > options.class_sample:
            pick = baseline_rows(chosen.numel(), options.class_sample, options.seed + 2 + number).rows
            chosen = chosen[pick]
        if chosen.numel() < 2:
            continue
        flips = None if mirrored is None else TensorRows(mirrored.rows(chosen))
        scores = self_similarity_baseline(TensorRows(training.rows(chosen)), mirrored=flips, settings=settings)
        within_scores += scores.tolist()
        within_labels += [label] * chosen.numel()
    mean_within = within_class_top1(torch.tensor(within_scores, dtype=torch.float64), within_labels)
    return class_similarity(top.scores[:, 0], generation_classes, mean_within), source
