"""``lit scan``: search generated images against a training set and report what was copied.

    lit scan --generations G --training T --descriptor NAME [--weights FILE] --out OUT

``G`` and ``T`` are image folders (recursive; ``root/<class>/<image>`` gives class
labels), ``.txt`` / ``.tsv`` file lists (with captions / labels), webdataset tar
shards (img2dataset / LAION layout) or feature stores; all but stores are extracted
to stores first (:mod:`lit.scan.sources`) and reused by the next scan. The scan
(paper Sec. 6-7) finds every generation's top-k training images, the training set's
self-similarity baseline (exact, or on a seeded sample of ``--baseline_sample``
rows), how many training images duplicate each generation's top match against
random training images (Fig. 11 right), per class the best generation score
against the within-class self-similarity (Fig. 6), and optionally SSCD-style
normalised scores. It writes ``matches.csv``, ``summary.json``, PNG plots and one
self-contained ``report.html`` into ``OUT`` (a folder it creates, or one it
created before: it never writes into someone else's folder).

The search streams the training set in blocks of ``--block_rows`` rows, so memory
stays bounded by the block and the top-k lists, whatever the training set's size.
It is exact by default; ``--index FACTORY`` (e.g. ``IVF4096,Flat``, ``IVF4096,PQ64np``)
searches the generations through an approximate faiss index built once over the
training store and saved beside it (:mod:`lit.scan.approx`), visiting ``--nprobe``
lists and re-ranking a shortlist of ``k x --rerank_factor`` rows exactly from the
store. The self-similarity baseline and the duplicate counts stay exact.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch import Tensor
from tqdm.auto import tqdm

from datamodules.scan_inputs import ImageSource
from lit.errors import UserError
from lit.replication import DUPLICATE_THRESHOLD
from lit.report import write_json, write_text_atomic
from lit.scan.analysis import (
    DEFAULT_THRESHOLDS,
    ClassSimilarity,
    RowSample,
    background_bias,
    baseline_rows,
    class_similarity,
    count_above,
    duplicate_comparison,
    normalize_scores,
    score_summary,
    within_class_top1,
)
from lit.scan.approx import IndexOptions, approximate_search, open_index
from lit.scan.sources import FeatureSource, StoreSource, extract_input
from lit.store import DTYPES, FeatureStore, is_store
from lit.search import SearchResult, search, search_store
from lit.similarity import SimilarityKind, TokenNormalization, cosine_similarity, split_product
from models.descriptor_config import DescriptorConfig

#: Float32 bytes of query features held at once (token features of many queries are searched in chunks).
QUERY_CHUNK_BYTES = 2**30
#: File that marks an output folder as made by ``lit scan`` (only such folders are written into again).
MARKER = ".lit-scan"


@dataclass(frozen=True)
class ScanOptions:
    """The knobs of the analysis (everything but where the features come from)."""

    k: int = 5
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    similarity: SimilarityKind = "cosine"
    token_normalization: TokenNormalization = "token"
    baseline_sample: int | None = 10000
    random_sample: int = 1000
    class_sample: int = 1000
    duplicate_threshold: float = DUPLICATE_THRESHOLD
    seed: int = 0
    block_rows: int = 65536
    device: str = "cpu"
    norm_k: int = 10
    norm_beta: float = 1.0
    progress: bool = True
    index: IndexOptions | None = None  # None: exact generation search


@dataclass
class ScanResult:
    """Everything a scan found, in training rows / generation rows (files are written from it)."""

    top: SearchResult  # (G, k) raw scores, training rows
    normalized: Tensor | None  # (G, k) SSCD-normalised scores, or None
    baseline: Tensor  # (n,) top-1 self-similarity of the sampled training rows
    baseline_sample: RowSample
    match_duplicates: Tensor  # (G,) duplicates of each generation's top match
    random_rows: RowSample
    random_duplicates: Tensor  # (n,) duplicates of random training rows
    classes: ClassSimilarity | None
    class_source: str | None
    normalization: dict[str, Any] | None
    timings: dict[str, float] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=lambda: {"method": "exact"})

    @property
    def ranking_scores(self) -> Tensor:
        """Scores that order the report (normalised when asked), (G, k)."""
        return self.top.scores if self.normalized is None else self.normalized


# ----------------------------------------------------------------------------- search over sources


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
    """Exact top-``k`` rows of ``source`` for the given rows of ``queries``: :func:`lit.search.search_store`
    over the source's blocks on ``device`` (faiss on the CPU, matrix products + ``topk`` on a GPU),
    one chunk of query rows at a time (:func:`query_chunks`)."""
    scores, indices, done = [], [], 0
    for chunk in query_chunks(query_rows, queries.feature_shape):
        part = None if exclude is None else exclude[done:done + chunk.numel()]
        found = search_store(queries.rows(chunk).to(device), source.row_source, k, normalization=normalization,
                             exclude=part, block_rows=block_rows, progress=progress, device=device)
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
    # the similarity follows the features, as in lit.search.search_store: (D,) cosine, (T, D) split-product
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


# ----------------------------------------------------------------------------- outputs


def prepare_out(out: Path) -> None:
    """Create ``out`` (marked as the scan's own) or accept one a scan made; refuse any other non-empty folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(f"--out {out} is not empty and was not made by lit scan: choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()


def matches_rows(result: ScanResult, generations: FeatureSource, training: FeatureSource) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of matches.csv: one row per (generation, rank), generations in row order."""
    header = ["generation", "rank", "training", "score"]
    normalized = result.normalized is not None
    if normalized:
        header.append("score_normalized")
    scores, indices = result.top.scores, result.top.indices
    gen_rows = list(range(scores.shape[0]))
    train_rows = sorted({int(t) for t in indices.flatten().tolist() if t >= 0})
    position = {t: i for i, t in enumerate(train_rows)}
    columns = {  # name -> (values, generation side?); only what the inputs know
        "generation_caption": (generations.captions_of(gen_rows), True),
        "generation_label": (generations.labels_of(gen_rows), True),
        "training_caption": (training.captions_of(train_rows), False),
        "training_label": (training.labels_of(train_rows), False),
    }
    extras = [(name, values, gen_side) for name, (values, gen_side) in columns.items()
              if values is not None and any(v is not None for v in values)]
    header += [name for name, _, _ in extras]
    gen_keys, train_keys = generations.keys_of(gen_rows), training.keys_of(train_rows)
    rows: list[list[Any]] = []
    for g in gen_rows:
        for rank in range(scores.shape[1]):
            t = int(indices[g, rank])
            if t < 0:
                continue
            row: list[Any] = [gen_keys[g], rank + 1, train_keys[position[t]], f"{float(scores[g, rank]):.6f}"]
            if normalized:
                row.append(f"{float(result.normalized[g, rank]):.6f}")  # type: ignore[index]
            for _, values, gen_side in extras:
                value = values[g] if gen_side else values[position[t]]
                row.append("" if value is None else value)
            rows.append(row)
    return header, rows


def write_matches(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    """matches.csv, atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def build_summary(result: ScanResult, generations: FeatureSource, training: FeatureSource,
                  options: ScanOptions, descriptor: dict[str, Any], wall_s: float | None = None) -> dict[str, Any]:
    """summary.json's content."""
    top1 = result.top.scores[:, 0]
    summary: dict[str, Any] = {
        "generations": {"count": generations.num_rows, "skipped": len(generations.skipped),
                        "skipped_files": generations.skipped},
        "training": {"count": training.num_rows, "skipped": len(training.skipped),
                     "skipped_files": training.skipped},
        "k": int(result.top.scores.shape[1]),
        "search": result.search,
        "thresholds": list(options.thresholds),
        "similarity": "cosine" if len(training.feature_shape) == 1 else "split_product",
        "token_normalization": options.token_normalization if len(training.feature_shape) == 2 else None,
        "top1": score_summary(top1, options.thresholds),
        "baseline": {**score_summary(result.baseline, options.thresholds), **result.baseline_sample.record()},
        "normalization": result.normalization or {"method": "none"},
        "duplicates": {**duplicate_comparison(result.match_duplicates, result.random_duplicates,
                                              options.duplicate_threshold),
                       "random_sample": result.random_rows.record()},
        "classes": None if result.classes is None else {**result.classes.record(), "generation_classes": result.class_source,
                                                        "class_sample": options.class_sample},
        "descriptor": descriptor,
        "stores": {"generations": generations.manifest, "training": training.manifest},
        "timings_s": {**result.timings, **({"wall": wall_s} if wall_s is not None else {})},
    }
    if result.normalized is not None:
        summary["top1_normalized"] = score_summary(result.normalized[:, 0].double(), options.thresholds)
    return summary


def write_outputs(out: Path, result: ScanResult, generations: FeatureSource, training: FeatureSource,
                  options: ScanOptions, descriptor: dict[str, Any], report_rows: int = 20, thumb: int = 96,
                  wall_s: float | None = None) -> dict[str, Path]:
    """matches.csv, summary.json, the plots and report.html in ``out``."""
    from lit.scan.report import write_plots, write_report  # matplotlib/PIL only when writing

    header, rows = matches_rows(result, generations, training)
    paths = {"matches": write_matches(out / "matches.csv", header, rows)}
    summary = build_summary(result, generations, training, options, descriptor, wall_s)
    paths["summary"] = write_json(out / "summary.json", summary)
    paths.update(write_plots(out, result, options))
    paths["report"] = write_report(out, result, summary, generations, training, report_rows=report_rows,
                                   thumb=thumb, plots={k: v for k, v in paths.items() if k.startswith("plot_")})
    return paths


# ----------------------------------------------------------------------------- sources and the command


def open_source(role: str, spec: str, record: dict[str, Any], config: DescriptorConfig, *, store_dir: Path,
                device: torch.device, batch_size: int, num_workers: int, dtype: str,
                progress: bool = True) -> FeatureSource:
    """The features of one input: a feature store as it is, or an image folder, file list or
    webdataset tars extracted to a store under ``store_dir`` (reused when the input and the
    descriptor are unchanged)."""
    path = Path(spec).expanduser()
    if is_store(path):
        store = FeatureStore.open(path)
        store.check_compatible(record, what=f"the descriptor of this scan ({record.get('display_name')})")
        print(f"{role}: feature store {path} ({store.num_rows} rows)")
        return StoreSource(role, store)
    try:
        store, reused = extract_input(role, spec, store_dir, config, record,
                                      accelerator="gpu" if device.type == "cuda" else "cpu",
                                      device_index=device.index if device.type == "cuda" else None,
                                      batch_size=batch_size, num_workers=num_workers, dtype=dtype, progress=progress)
    except UserError as error:
        raise UserError(f"--{role} {spec}: {error}") from None
    print(f"{role}: {'reused' if reused else 'extracted'} feature store {store.root} ({store.num_rows} rows, "
          f"{len(store.skipped)} unreadable images skipped)")
    return StoreSource(role, store)


def build_parser() -> ArgumentParser:
    """The options of ``lit scan`` (also readable from a YAML file with ``--config``)."""
    parser = ArgumentParser(prog="lit scan", description=__doc__.splitlines()[0], exit_on_error=False,
                            allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of these options")
    parser.add_argument("--generations", type=str, required=True, help="image folder or feature store of the generations")
    parser.add_argument("--training", type=str, required=True, help="image folder or feature store of the training set")
    parser.add_argument("--out", type=str, required=True, help="output folder (new, empty, or made by lit scan)")
    parser.add_argument("--descriptor", type=str, default="pixel", help="descriptor registry name")
    parser.add_argument("--weights", type=str | None, default=None, help="local weights file of the descriptor")
    parser.add_argument("--random_init", type=bool, default=False, help="random weights (tests; labelled in reports)")
    parser.add_argument("--input_size", type=int | None, default=None, help="descriptor input size override")
    parser.add_argument("--similarity", type=str, default="auto", help="auto, cosine or split_product")
    parser.add_argument("--token_normalization", type=str, default="token", help="token, global or none")
    parser.add_argument("--background", type=str | None, default=None,
                        help="image folder / store for SSCD score normalisation (off when not given)")
    parser.add_argument("--norm_k", type=int, default=10, help="background neighbours averaged for normalisation")
    parser.add_argument("--norm_beta", type=float, default=1.0, help="weight of the background mean")
    parser.add_argument("--k", type=int, default=5, help="training matches per generation")
    parser.add_argument("--thresholds", type=list[float], default=list(DEFAULT_THRESHOLDS), help="replication thresholds")
    parser.add_argument("--baseline_sample", type=int | None, default=10000,
                        help="training rows for the self-similarity baseline (all when the set is not larger; null: all)")
    parser.add_argument("--random_sample", type=int, default=1000, help="random training rows for the duplicate comparison")
    parser.add_argument("--class_sample", type=int, default=1000, help="training rows per class for within-class similarity")
    parser.add_argument("--duplicate_threshold", type=float, default=DUPLICATE_THRESHOLD, help="duplicate similarity")
    parser.add_argument("--seed", type=int, default=0, help="seed of every sample")
    parser.add_argument("--block_rows", type=int, default=65536, help="training rows searched at a time")
    parser.add_argument("--index", type=str | None, default=None,
                        help="faiss factory string of an approximate index over the training store for the "
                             "generation search, e.g. IVF4096,Flat or IVF4096,PQ64np (null: exact search; "
                             "global features only; built once, saved beside the store, reused)")
    parser.add_argument("--nprobe", type=int | None, default=None,
                        help="IVF lists visited per generation (null: 16, the index's default)")
    parser.add_argument("--rerank_factor", type=int, default=10,
                        help="shortlist of k x this many rows from the index, re-ranked exactly from the store")
    parser.add_argument("--index_train_size", type=int | None, default=None,
                        help="training rows sampled (--seed) to train the index (null: max(50000, 40 x lists))")
    parser.add_argument("--report_rows", type=int, default=20, help="generations shown in report.html")
    parser.add_argument("--thumb", type=int, default=96, help="thumbnail side in report.html (pixels)")
    parser.add_argument("--device", type=str, default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--batch_size", type=int, default=64, help="images per embedding batch")
    parser.add_argument("--num_workers", type=int, default=0, help="image loading workers")
    parser.add_argument("--store_dir", type=str | None, default=None, help="where folders are extracted (default OUT/stores)")
    parser.add_argument("--dtype", type=str, default="float16", help="dtype of extracted stores: float16 or float32")
    parser.add_argument("--progress", type=bool, default=True, help="progress bars")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parsed options; mistakes become one-line :class:`UserError`s."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except argparse.ArgumentError as error:
        raise UserError(f"lit scan: {error}".replace("\n", " ")) from None
    for name in ("k", "norm_k", "batch_size", "block_rows", "random_sample", "class_sample", "thumb",
                 "rerank_factor"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.report_rows < 0:
        raise UserError(f"--report_rows must be >= 0, got {args.report_rows}")
    if args.baseline_sample is not None and args.baseline_sample < 1:
        raise UserError(f"--baseline_sample must be >= 1 or null, got {args.baseline_sample}")
    for name in ("nprobe", "index_train_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1 or null, got {getattr(args, name)}")
    if args.index is not None and not args.index.strip():
        raise UserError("--index must be a faiss factory string such as IVF1024,Flat, or null for exact search")
    if args.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.similarity not in ("auto", "cosine", "split_product"):
        raise UserError(f"--similarity must be auto, cosine or split_product, got {args.similarity!r}")
    if args.token_normalization not in ("token", "global", "none"):
        raise UserError(f"--token_normalization must be token, global or none, got {args.token_normalization!r}")
    return args


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError as error:
        raise UserError(f"--device {choice!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {choice}: CUDA is not available here (use --device cpu)")
    return device


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """``lit scan``: parse, embed or open the inputs, scan, write the outputs, print where they are."""
    start = time.perf_counter()
    args = parse_args([] if argv is None else argv)
    out = Path(args.out).expanduser()
    config = DescriptorConfig(name=args.descriptor, weights=args.weights, random_init=args.random_init,
                              input_size=args.input_size, similarity=args.similarity,
                              token_normalization=args.token_normalization)
    device = _device(args.device)
    try:
        record = config.record()
    except (KeyError, ValueError, FileNotFoundError, OSError) as error:
        raise UserError(f"--descriptor {args.descriptor}: {error}") from None
    inputs = {"generations": args.generations, "training": args.training, "background": args.background}
    for role, spec in inputs.items():  # every input readable before anything is extracted
        if spec is not None and not is_store(Path(spec).expanduser()):
            try:
                ImageSource.resolve(spec)
            except UserError as error:
                raise UserError(f"--{role} {spec}: {error}") from None
    prepare_out(out)
    store_dir = Path(args.store_dir).expanduser() if args.store_dir else out / "stores"
    common = {"store_dir": store_dir, "device": device, "batch_size": args.batch_size,
              "num_workers": args.num_workers, "dtype": args.dtype, "progress": args.progress}
    generations = open_source("generations", args.generations, record, config, **common)
    training = open_source("training", args.training, record, config, **common)
    background = None if args.background is None else open_source("background", args.background, record,
                                                                   config, **common)
    options = ScanOptions(k=args.k, thresholds=tuple(args.thresholds), similarity=record["similarity"],
                          token_normalization=args.token_normalization, baseline_sample=args.baseline_sample,
                          random_sample=args.random_sample, class_sample=args.class_sample,
                          duplicate_threshold=args.duplicate_threshold, seed=args.seed, block_rows=args.block_rows,
                          device=str(device),
                          norm_k=args.norm_k, norm_beta=args.norm_beta, progress=args.progress,
                          index=None if args.index is None else IndexOptions(
                              args.index.strip(), nprobe=args.nprobe, rerank_factor=args.rerank_factor,
                              train_size=args.index_train_size, seed=args.seed))
    result = run_scan(generations, training, options, background)
    paths = write_outputs(out, result, generations, training, options, record, report_rows=args.report_rows,
                          thumb=args.thumb, wall_s=time.perf_counter() - start)
    top1 = result.top.scores[:, 0]
    rates = ", ".join(f"rate@{t:g} {float((top1 > t).double().mean()):.3f}" for t in options.thresholds)
    print(f"lit scan: {generations.num_rows} generations vs {training.num_rows} training images; {rates}")
    print(f"report: {paths['report']} (matches.csv, summary.json and plots beside it)")
    return paths
