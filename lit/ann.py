"""Approximate search for galleries beyond memory: a faiss index over a feature store, re-ranked exactly.

:func:`build_index` makes a faiss index from any :class:`lit.search.RowSource`
(a ``lit.store.FeatureStore``, or :class:`lit.search.TensorRows`) with a factory
string (``"IVF1024,Flat"``, ``"IVF65536,Flat"``, ``"OPQ64,IVF65536,PQ64"``) and
the inner-product metric on L2-normalised rows: trained on a seeded sample of
the rows, filled block by block (never the whole store in memory), and written
atomically with a JSON record beside it. :meth:`AnnIndex.search` asks the index
for a shortlist of ``k * factor`` rows per query and re-ranks it exactly: the
rows are gathered from the source and rescored in float32 in the fixed
summation order of the exact search (:func:`lit.search.rerank`), so a re-ranked
score equals the exact score of that row and ties order by ascending row. Compressed
codes (PQ) lose top-1 matches unless the shortlist is re-ranked (BigANN-1B
recall@1 ~0.35 at 16-20 bytes a vector), which is why copy detection re-ranks.

faiss GPU is used for training, adding and searching when ``faiss.get_num_gpus() > 0``
(a faiss GPU build), never required. PQ factory strings train polysemous codes
unless they end in ``np`` (``"IVF1024,PQ64np"``): slow at 512-d and useless
here, where the exact re-rank does the fine ranking.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from lit.errors import UserError
from lit.files import atomic_path, write_json
from lit.search import RowSource, SearchResult, as_tensor, check_exclude, normalized_rows, rerank

FORMAT = "lit-ann-index"
#: Default number of IVF lists probed per query (recorded with the index).
DEFAULT_NPROBE = 16


@dataclass
class AnnIndex:
    """A trained, filled faiss index over ``num_rows`` normalised rows, and how it was made."""

    index: faiss.Index
    factory: str
    num_rows: int
    dim: int
    train_size: int
    seed: int
    nprobe: int | None

    def record(self) -> dict[str, Any]:
        """JSON-able description (written beside the index file)."""
        return {"format": FORMAT, "factory": self.factory, "metric": "inner_product (L2-normalised rows)",
                "num_rows": self.num_rows, "dim": self.dim, "train_size": self.train_size, "seed": self.seed,
                "nprobe": self.nprobe, "bytes_per_vector": self.bytes_per_vector()}

    def bytes_per_vector(self) -> float:
        """Stored bytes a vector in the inverted lists: code plus its 8-byte id (IVF), or the code."""
        try:
            ivf = faiss.extract_index_ivf(self.index)
        except RuntimeError:
            return float(self.index.sa_code_size()) if hasattr(self.index, "sa_code_size") else math.nan
        return float(ivf.code_size + 8)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the index (``faiss.write_index``) and ``PATH.json`` atomically.

        An existing file is replaced only with ``overwrite`` and only when its
        record marks it as an index this suite wrote.
        """
        path = Path(path)
        _check_writable(path, overwrite)
        with atomic_path(path) as tmp:
            faiss.write_index(_to_cpu(self.index), str(tmp))
        write_json(_record_path(path), self.record())
        return path

    @classmethod
    def load(cls, path: str | Path) -> AnnIndex:
        """Read an index written by :meth:`save` (its record must be beside it)."""
        path = Path(path)
        record_file = _record_path(path)
        if not path.is_file() or not record_file.is_file():
            raise UserError(f"no ANN index at {path} (needs {path.name} and {record_file.name}); build it first")
        record = json.loads(record_file.read_text())
        if record.get("format") != FORMAT:
            raise UserError(f"{record_file} is not a {FORMAT} record")
        index = faiss.read_index(str(path))
        if index.ntotal != record["num_rows"] or index.d != record["dim"]:
            raise UserError(f"{path} holds {index.ntotal} x {index.d} vectors but {record_file.name} says "
                            f"{record['num_rows']} x {record['dim']}; rebuild the index")
        return cls(_maybe_gpu(index), record["factory"], int(record["num_rows"]), int(record["dim"]),
                   int(record["train_size"]), int(record["seed"]), record.get("nprobe"))

    def search(
        self,
        queries: Tensor,
        source: RowSource,
        k: int,
        *,
        factor: int = 10,
        nprobe: int | None = None,
        exclude: Tensor | None = None,
        query_block: int = 4096,
        progress: bool = False,
    ) -> SearchResult:
        """Top-``k`` rows per query: a shortlist of ``k * factor`` from the index, re-ranked exactly from ``source``.

        ``source`` must hold the rows the index was built from (same count).
        ``nprobe``: IVF lists visited per query (default: the index's record).
        ``exclude`` (Q,) drops one row per query (-1: none), as in :func:`lit.search.search`.
        Results in (score desc, row asc) order, padded with -1 / -inf.
        """
        for name, v in (("k", k), ("factor", factor), ("query_block", query_block)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(queries, Tensor) or queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be a (Q, {self.dim}) tensor, got "
                             f"{tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__}")
        if source.num_rows != self.num_rows or tuple(source.feature_shape) != (self.dim,):
            raise UserError(f"the index was built over {self.num_rows} x {self.dim} rows but the source has "
                            f"{source.num_rows} x {tuple(source.feature_shape)}; rebuild the index")
        excluded = check_exclude(exclude, queries.shape[0], self.num_rows)
        probe = self.nprobe if nprobe is None else nprobe
        if probe is not None:
            _set_nprobe(self.index, probe)
        shortlist = min(self.num_rows, k * factor + (0 if excluded is None else 1))
        num_q = queries.shape[0]
        out_s = torch.full((num_q, k), -math.inf)
        out_i = torch.full((num_q, k), -1, dtype=torch.int64)
        for q0 in tqdm(range(0, num_q, query_block), desc="ann search", unit="block", disable=not progress):
            block = queries[q0 : q0 + query_block]
            _, cand = self.index.search(normalized_rows(block, "queries", q0), shortlist)
            if excluded is not None:
                cand[cand == excluded[q0 : q0 + len(block), None]] = -1
            found = rerank(block, torch.from_numpy(cand.astype(np.int64)), source, k, device="cpu")
            out_s[q0 : q0 + len(block)], out_i[q0 : q0 + len(block)] = found.scores, found.indices
        return SearchResult(out_s, out_i)


def build_index(
    source: RowSource,
    factory: str,
    *,
    path: str | Path | None = None,
    train_size: int | None = None,
    seed: int = 0,
    nprobe: int | None = DEFAULT_NPROBE,
    block_rows: int = 65536,
    overwrite: bool = False,
    progress: bool = False,
) -> AnnIndex:
    """Train and fill a faiss index (``factory``, inner product) over the normalised rows of ``source``.

    ``train_size`` rows (default ``min(N, max(50_000, 40 * nlist))``) drawn
    without replacement with ``seed`` train it; all rows are then added in
    blocks of ``block_rows``. Saved to ``path`` when given, else beside a store
    that has a ``root`` folder (``<root>.index-<factory>.faiss``); not saved
    when neither. ``nprobe`` is the default for :meth:`AnnIndex.search`
    (ignored by indexes without inverted lists).
    """
    shape = tuple(source.feature_shape)
    if len(shape) != 1:
        raise ValueError(f"an ANN index needs global features (N, D); the source has rows of shape {shape}")
    dim, num_rows = shape[0], source.num_rows
    if num_rows < 1:
        raise ValueError("cannot build an index over an empty source")
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise UserError(f"faiss cannot build index factory string {factory!r} for dimension {dim}: "
                        f"{str(err).strip().splitlines()[-1]}") from None
    nlist = _nlist(index)
    size = min(num_rows, max(50_000, 40 * nlist)) if train_size is None else int(train_size)
    if not 1 <= size <= num_rows:
        raise ValueError(f"train_size must be in [1, {num_rows}], got {train_size}")
    if path is None:
        path = default_index_path(source, factory)
    if path is not None:
        _check_writable(Path(path), overwrite)  # before the long work
    if nprobe is not None and (isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1):
        raise ValueError(f"nprobe must be a positive int or None, got {nprobe!r}")

    work = _maybe_gpu(index)
    if not work.is_trained:
        sample = np.sort(np.random.default_rng(seed).choice(num_rows, size=size, replace=False))
        xt = normalized_rows(as_tensor(source.rows(sample)), "training rows", 0)
        if len(xt) < nlist:
            raise ValueError(f"{factory!r} has {nlist} lists but only {len(xt)} training rows; "
                             "use fewer lists or more rows")
        work.train(xt)
        del xt
    total = math.ceil(num_rows / block_rows)
    for g0, block in tqdm(source.iter_blocks(block_rows), total=total, desc="index", unit="block",
                          disable=not progress):
        work.add(normalized_rows(as_tensor(block), "gallery", g0))
    ann = AnnIndex(work, factory, num_rows, dim, size, seed, nprobe if nlist > 0 else None)
    if path is not None:
        ann.save(path, overwrite=overwrite)
    return ann


def default_index_path(source: RowSource, factory: str) -> Path | None:
    """Where :func:`build_index` saves an index by default: ``<root>.index-<factory>.faiss`` beside a
    store's folder; None for a source without a ``root`` (held in memory)."""
    root = getattr(source, "root", None)
    if root is None:
        return None
    root = Path(root)
    return root.with_name(f"{root.name}.index-{_slug(factory)}.faiss")


def _nlist(index: faiss.Index) -> int:
    """Number of inverted lists (0 for an index without them)."""
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 0


def _set_nprobe(index: faiss.Index, nprobe: int) -> None:
    if isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1:
        raise ValueError(f"nprobe must be a positive int, got {nprobe!r}")
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        pass  # no inverted lists: nothing to probe
    if faiss.get_num_gpus() > 0:  # pragma: no cover - faiss GPU builds only
        try:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        except (RuntimeError, AttributeError):
            pass


def _maybe_gpu(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs when faiss has any (and supports the index type), else itself."""
    if faiss.get_num_gpus() < 1:
        return index
    try:  # pragma: no cover - faiss GPU builds only
        return faiss.index_cpu_to_all_gpus(index)
    except (RuntimeError, AttributeError):  # pragma: no cover
        return index


def _to_cpu(index: faiss.Index) -> faiss.Index:
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "index_gpu_to_cpu"):  # pragma: no cover
        try:
            return faiss.index_gpu_to_cpu(index)
        except (RuntimeError, AttributeError):
            return index
    return index


def _slug(factory: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", factory)


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _check_writable(path: Path, overwrite: bool) -> None:
    """Refuse to replace a file unless asked to and it is an index this suite wrote."""
    if not path.exists():
        return
    if not overwrite:
        raise UserError(f"{path} exists; pass overwrite=True to replace the index, or choose another path")
    record = _record_path(path)
    try:
        ours = json.loads(record.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise UserError(f"{path} exists and is not an index this suite wrote (no {record.name}); "
                        "refusing to overwrite it")
