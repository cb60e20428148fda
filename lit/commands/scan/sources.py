"""Where the features of a scan come from: a feature store, or images extracted on the way.

``lit scan`` reads every set (generations, training, background) through one small
interface, :class:`FeatureSource`: row count, per-row keys / captions / labels,
features in blocks (never the whole set at once for a store) and by row, the
:class:`lit.search.RowSource` that ``lit.search.search`` scans, the manifest, the images
that were skipped, and each row's image for the report. :class:`MemorySource` holds
features in memory (tests); :class:`StoreSource` reads a :mod:`lit.store` feature
store through its memory maps. :func:`extract_input` turns an image folder, a file
list or webdataset tars into a store with the suite's Lightning extraction
(``DescriptorExtractor`` + ``ExtractionDataModule`` + ``StoreWriterCallback``, the
same path as ``lit predict -c configs/extract.yaml``), in a folder named by a
fingerprint of the input and the descriptor, so a second scan of the same input
with the same descriptor reuses the store (and a killed one resumes it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from datamodules.extraction_inputs import (
    ImageSource,
    input_listing,
    listing_fingerprint,
)
from lit.commands.extract import extract_to_store
from lit.io import load_image, load_image_bytes
from lit.search import RowSource, TensorRows
from lit.store import DamagedStoreError, FeatureStore, is_store
from models.descriptor_config import DescriptorConfig


class FeatureSource(Protocol):
    """What a scan needs from a set of features (a store or features in memory)."""

    name: str

    @property
    def num_rows(self) -> int: ...

    @property
    def keys(self) -> list[str]: ...

    @property
    def captions(self) -> list[str | None] | None: ...

    @property
    def labels(self) -> list[str | None] | None: ...

    @property
    def manifest(self) -> dict[str, Any]: ...

    @property
    def skipped(self) -> list[str]: ...

    @property
    def skipped_reasons(self) -> dict[str, str]: ...

    @property
    def feature_shape(self) -> tuple[int, ...]: ...

    @property
    def row_source(self) -> RowSource: ...

    def image(self, row: int) -> Tensor | None: ...

    def keys_of(self, rows: Sequence[int]) -> list[str]: ...

    def captions_of(self, rows: Sequence[int]) -> list[str | None] | None: ...

    def labels_of(self, rows: Sequence[int]) -> list[str | None] | None: ...

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[int, Tensor]]: ...

    def rows(self, indices: Tensor) -> Tensor: ...


@dataclass
class MemorySource:
    """Features held in memory, row ``i`` named by ``keys[i]`` (tests, small sets)."""

    name: str
    features: Tensor
    keys: list[str]
    captions: list[str | None] | None = None
    labels: list[str | None] | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    skipped_reasons: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.features.shape[0] != len(self.keys):
            raise ValueError(f"{self.name}: {self.features.shape[0]} feature rows but {len(self.keys)} keys")
        for what, values in (("captions", self.captions), ("labels", self.labels)):
            if values is not None and len(values) != len(self.keys):
                raise ValueError(f"{self.name}: {len(values)} {what} for {len(self.keys)} rows")

    @property
    def num_rows(self) -> int:
        return int(self.features.shape[0])

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[int, Tensor]]:
        """``(first_row, features)`` of consecutive blocks of at most ``block_rows`` rows, float32."""
        for start in range(0, self.num_rows, block_rows):
            yield start, self.features[start : start + block_rows].float()

    def rows(self, indices: Tensor) -> Tensor:
        """Features of the given rows, float32, in the given order."""
        return self.features[indices.to(torch.int64)].float()

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.features.shape[1:])

    @property
    def row_source(self) -> RowSource:
        return TensorRows(self.features.float())

    def image(self, row: int) -> Tensor | None:
        """The image of row ``row``: its key read as a file path (None when it cannot be read)."""
        return load_image(self.keys[row]) if Path(self.keys[row]).is_file() else None

    def keys_of(self, rows: Sequence[int]) -> list[str]:
        return [self.keys[r] for r in rows]

    def captions_of(self, rows: Sequence[int]) -> list[str | None] | None:
        return None if self.captions is None else [self.captions[r] for r in rows]

    def labels_of(self, rows: Sequence[int]) -> list[str | None] | None:
        return None if self.labels is None else [self.labels[r] for r in rows]


class StoreSource:
    """A :class:`lit.store.FeatureStore` as a :class:`FeatureSource` (float32 torch blocks, string labels;
    ``labels=False``: none, e.g. the ``images/`` folder of a ``lit generate`` folder is no class)."""

    def __init__(self, name: str, store: FeatureStore, labels: bool = True) -> None:
        self.name = name
        self.store = store
        self.use_labels = labels
        self._keys: list[str] | None = None

    @property
    def num_rows(self) -> int:
        return self.store.num_rows

    def _root(self) -> Path | None:
        """The input folder when the store was extracted from one (its keys are relative to it)."""
        extra = self.store.manifest.get("extra", {})
        return Path(extra["input"]) if extra.get("input_kind") == "folder" and extra.get("input") else None

    @property
    def keys(self) -> list[str]:
        """Every row's name (reads every shard's row file: use :meth:`keys_of` for a few rows)."""
        if self._keys is None:
            root = self._root()
            self._keys = [str(root / key) if root else key for key in self.store.keys]
        return self._keys

    @property
    def captions(self) -> list[str | None] | None:
        return self.store.captions

    @property
    def labels(self) -> list[str | None] | None:
        labels = self.store.labels if self.use_labels else None
        return None if labels is None else [None if label is None else str(label) for label in labels]

    def _column_of(self, field: str, rows: Sequence[int]) -> list[Any] | None:
        """One row-metadata column for the given rows, reading only their shards' row files."""
        if len(rows) == 0:
            return []
        shards, local = self.store._locate(np.asarray(rows, dtype=np.int64))
        columns = [self.store._shard_meta(int(s)).get(field) for s in shards]
        if any(column is None for column in columns):
            return None
        return [column[int(r)] for column, r in zip(columns, local)]

    def keys_of(self, rows: Sequence[int]) -> list[str]:
        """Names of the given rows: for a folder input the image's path (folder / key), else the key."""
        root = self._root()
        return [str(root / key) if root else key for key in self._column_of("keys", rows) or []]

    def captions_of(self, rows: Sequence[int]) -> list[str | None] | None:
        return self._column_of("captions", rows)

    def labels_of(self, rows: Sequence[int]) -> list[str | None] | None:
        labels = self._column_of("labels", rows) if self.use_labels else None
        return None if labels is None else [None if label is None else str(label) for label in labels]

    @property
    def manifest(self) -> dict[str, Any]:
        return {"kind": "store", "root": str(self.store.root),
                **{k: v for k, v in self.store.manifest.items() if k != "shards"},
                "num_shards": len(self.store.shards)}

    @property
    def skipped(self) -> list[str]:
        return self.store.skipped

    @property
    def skipped_reasons(self) -> dict[str, str]:
        return self.store.skipped_reasons

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[int, Tensor]]:
        for start, block in self.store.iter_blocks(block_rows, dtype=np.float32):
            yield start, torch.from_numpy(block)

    def rows(self, indices: Tensor) -> Tensor:
        return torch.from_numpy(self.store.rows(indices.cpu().numpy(), dtype=np.float32))


    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.store.feature_shape

    @property
    def row_source(self) -> RowSource:
        return self.store

    def image(self, row: int) -> Tensor | None:
        """Row ``row``'s image, read back from the extraction's input: ``input/key`` for a folder,
        the key (or list-relative path) for a file list, the sample ``key.*`` inside its tar shard."""
        key = self.store.keys_at([row])[0]
        extra = self.store.manifest.get("extra", {})
        kind, root = extra.get("input_kind"), extra.get("input")
        shard = self.store.shards[int(self.store._locate(np.array([row]))[0][0])]
        if kind == "tars" or shard.source:
            return _tar_image(shard.source, key) if shard.source else None
        candidates = [Path(key)]
        if root:
            base = Path(root)
            candidates += [base / key, base.parent / key]
        for path in candidates:
            if path.is_file():
                return load_image(path)
        return None


def missing_images(source: FeatureSource, rows: Sequence[int]) -> int:
    """How many of the given rows of a store extracted from a folder or file list have no image file
    where the store says (moved or removed since, or a store that recorded a relative folder read
    from another working directory); 0 for tars and features in memory."""
    if not isinstance(source, StoreSource) or not len(rows):
        return 0
    extra = source.store.manifest.get("extra", {})
    kind, root = extra.get("input_kind"), extra.get("input")
    if kind == "folder":
        paths = [Path(name) for name in source.keys_of(rows)]
    elif kind == "list" and root:
        base = Path(root).parent
        paths = [base / Path(key).expanduser() for key in source._column_of("keys", rows) or []]
    else:
        return 0
    return sum(not path.is_file() for path in paths)


@lru_cache(maxsize=8)
def _tar_index(tar_path: str) -> dict[str, tarfile.TarInfo]:
    """Image members of a webdataset tar by sample key, read in one pass (cached: a report shows many)."""
    index: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(tar_path) as archive:
        for member in archive:
            stem, _, suffix = member.name.partition(".")
            if suffix.lower() in ("jpg", "jpeg", "png", "webp") and stem not in index:
                index[stem] = member
    return index


def _tar_image(tar_path: str, key: str) -> Tensor | None:
    """The image of sample ``key`` in a webdataset tar (its ``.jpg``/``.png``/... member), or None."""
    try:
        member = _tar_index(tar_path).get(key)
        if member is None:
            return None
        with tarfile.open(tar_path) as archive:
            handle = archive.extractfile(member)
            return None if handle is None else load_image_bytes(handle.read(), name=f"{tar_path}:{member.name}")
    except (OSError, tarfile.TarError):
        return None


def input_fingerprint(spec: str) -> tuple[str, str, bool]:
    """``(kind, sha256, all_in_subfolders)`` of an input: its absolute location and the fingerprint of
    its listing (:func:`datamodules.extraction_inputs.listing_fingerprint`, the one the store writer
    records and compares on resume), so it changes when the input does."""
    source = ImageSource.resolve(spec)
    location = Path(source.location).expanduser().resolve()
    digest = hashlib.sha256(f"{source.kind}\0{location}\n{listing_fingerprint(input_listing(source))}".encode())
    nested = source.kind == "folder" and all("/" in item.key for item in source.items)
    return source.kind, digest.hexdigest(), nested


def store_folder_name(role: str, fingerprint: str, record: dict[str, Any], dtype: str) -> str:
    """``<role>-<12 hex>``: one store per (input and its content, descriptor, dtype).

    A ``seed`` of None (no random init) is left out of the name, so the stores of real descriptors
    keep the names they had before the seed was recorded; random-init stores of those versions
    (unseeded networks) are not found again, and are extracted anew."""
    compared = {k: v for k, v in DescriptorConfig.compared(record).items() if not (k == "seed" and v is None)}
    key = json.dumps({"fingerprint": fingerprint, "dtype": dtype, "descriptor": compared}, sort_keys=True)
    return f"{role}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def check_descriptor(store: FeatureStore, record: dict[str, Any]) -> None:
    """Refuse (one line) a store whose features another descriptor made than the scan's ``record``."""
    store.check_compatible(record, DescriptorConfig.differences,
                           what=f"the descriptor of this scan ({record.get('display_name')})")


def extract_input(role: str, spec: str, store_dir: Path, config: DescriptorConfig, record: dict[str, Any], *,
                  accelerator: str, device_index: int | None, batch_size: int, num_workers: int,
                  dtype: str = "float16", progress: bool = True) -> tuple[FeatureStore, bool]:
    """The store of input ``spec`` under ``store_dir`` (extracted now, or reused: second value True).

    Extraction is :func:`lit.commands.extract.extract_to_store` (``lit predict``'s module, datamodule
    and store writer) on one device. Folders whose images all lie in sub-folders get those as
    class labels; ``.tsv`` lists and tars bring captions (and labels) of their own.
    Unreadable images are skipped, listed in their shard and counted. A finished store found there
    is reused only when every shard checks out (:meth:`lit.store.FeatureStore.verify`); a damaged
    one is removed and extracted again, and the console says so.
    """
    _, fingerprint, nested = input_fingerprint(spec)
    target = store_dir / store_folder_name(role, fingerprint, record, dtype)
    if (target / "manifest.json").is_file():
        try:  # the whole store is checked before it is called reused (its shards are not checked again)
            store = FeatureStore.open(target)
            store.verify()
        except DamagedStoreError as error:
            if not is_store(target):
                raise
            print(f"{role}: feature store {target} is damaged: {error.what}; extracting it again")
            shutil.rmtree(target)  # this scan's own store (named by it, marked as a store), never a user's
        else:
            check_descriptor(store, record)
            return store, True
    trainer = {"accelerator": accelerator, "devices": [device_index] if device_index is not None else 1,
               "enable_progress_bar": progress}
    store = extract_to_store(spec, str(target), config, batch_size=batch_size, num_workers=num_workers,
                             dtype=dtype, labels_from_folders=nested, trainer_kwargs=trainer)
    check_descriptor(store, record)
    return store, False
