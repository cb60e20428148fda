"""The approximate generation search of ``lit scan`` (``--index FACTORY``): a faiss index over the training store.

The index (:mod:`lit.ann`, inner product on normalised rows, trained on a seeded
sample) is built once per training store and factory string and saved beside the
store as ``<store>.index-<factory>.faiss`` with its JSON record. The next scan
reuses it when its record matches (factory, rows, dimension, seed, training
sample size when one is asked for) and it is newer than the store's manifest;
otherwise it is rebuilt over it. A file at that path without the suite's record
is never read or replaced (one-line :class:`UserError`). Training sets held in
memory (tests) get an index that is not saved.

Each generation's shortlist of ``k * rerank_factor`` rows is re-ranked exactly
from the store (:meth:`lit.ann.AnnIndex.search`), so every reported score is the
exact score of its row; only rows missing from the shortlist can differ from the
exact search. Only global features ``(N, D)`` can be indexed: token stores are
refused. The self-similarity baseline and duplicate counts stay exact.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lit.ann import FORMAT, AnnIndex, build_index, default_index_path
from lit.errors import UserError
from lit.search import SearchResult


@dataclass(frozen=True)
class IndexOptions:
    """What ``--index``, ``--nprobe``, ``--rerank_factor`` and ``--index_train_size`` asked for."""

    factory: str
    nprobe: int | None = None  # None: the index's default (lit.ann.DEFAULT_NPROBE)
    rerank_factor: int = 10
    train_size: int | None = None  # None: lit.ann's default sample
    seed: int = 0


def _manifest_mtime(source: Any) -> float | None:
    root = getattr(source, "root", None)
    manifest = None if root is None else Path(root) / "manifest.json"
    return manifest.stat().st_mtime if manifest is not None and manifest.is_file() else None


def _reusable(path: Path, record: dict[str, Any], source: Any, options: IndexOptions) -> bool:
    """True when the saved index was built by this suite over these rows with these settings."""
    shape = tuple(source.feature_shape)
    if (record.get("factory") != options.factory or record.get("num_rows") != source.num_rows
            or (record.get("dim"),) != shape or record.get("seed") != options.seed):
        return False
    if options.train_size is not None and record.get("train_size") != min(options.train_size, source.num_rows):
        return False
    made = _manifest_mtime(source)
    return made is None or path.stat().st_mtime >= made


def open_index(row_source: Any, options: IndexOptions, progress: bool = False) -> tuple[AnnIndex, dict[str, Any]]:
    """The index over ``row_source`` (reused from disk or built) and its record for summary.json."""
    shape = tuple(row_source.feature_shape)
    if len(shape) != 1:
        raise UserError(f"--index {options.factory}: an approximate index needs global features (N, D) but the "
                        f"training features are tokens {shape}; drop --index to search them exactly")
    path = default_index_path(row_source, options.factory)
    clock = time.perf_counter()
    reused = False
    ann = None
    if path is not None and path.exists():
        record_file = path.with_name(path.name + ".json")
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            record = None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise UserError(f"{path} exists but was not written by this suite (no valid {record_file.name}); "
                            "move it away to let lit scan build its index there")
        if _reusable(path, record, row_source, options):
            ann, reused = AnnIndex.load(path), True
    if ann is None:
        train_size = None if options.train_size is None else min(options.train_size, row_source.num_rows)
        try:
            ann = build_index(row_source, options.factory, path=path, train_size=train_size, seed=options.seed,
                              overwrite=True, progress=progress)
        except ValueError as error:
            raise UserError(f"--index {options.factory}: {error}") from None
    nprobe = ann.nprobe if options.nprobe is None or ann.nprobe is None else options.nprobe
    record = {"method": "approximate", "factory": options.factory, "nprobe": nprobe,
              "rerank_factor": options.rerank_factor, "index_path": None if path is None else str(path),
              "reused": reused, "train_size": ann.train_size, "seed": ann.seed,
              "bytes_per_vector": ann.bytes_per_vector(), "open_s": time.perf_counter() - clock,
              "note": "shortlist of k x rerank_factor rows from the index, re-ranked exactly from the store; "
                      "baseline and duplicate counts are exact"}
    return ann, record


def approximate_search(ann: AnnIndex, queries: torch.Tensor, row_source: Any, k: int, record: dict[str, Any],
                       progress: bool = False) -> SearchResult:
    """Top-``k`` training rows per query (CPU float32 rows) through the index, re-ranked exactly."""
    return ann.search(queries.float().cpu(), row_source, k, factor=record["rerank_factor"], nprobe=record["nprobe"],
                      progress=progress)
