"""Where the features of a scan come from: a feature store, or images extracted on the way.

``lit scan`` reads every set (generations, training, background) through one small
interface, :class:`FeatureSource`: row count, per-row keys / captions / labels,
features in blocks (never the whole set at once for a store) and by row, the
manifest, and the images that were skipped. :class:`MemorySource` holds features
embedded in this process (tests); :class:`StoreSource` reads a :mod:`lit.store`
feature store through its memory maps. :func:`extract_folder` turns an image folder
into a store, one shard of ``shard_rows`` images at a time (a rerun skips finished
shards), in a folder named by a fingerprint of the images and the descriptor, so a
second scan of the same folder with the same descriptor reuses the store.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import hashlib
import json

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from lit.embedding import embed_dataset
from lit.errors import UserError
from lit.io import list_images, load_image
from lit.store import COMPATIBILITY_FIELDS, FeatureStore, StoreWriter
from models.extractors import Descriptor, center_crop, resize_short_side


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


class FittedImages(Dataset):
    """Image files resized (short side) and centre-cropped to the descriptor's resize size, so
    images of any size batch together and the descriptor's own preprocessing is unchanged."""

    def __init__(self, paths: Sequence[str], descriptor: Descriptor) -> None:
        self.paths = list(paths)
        self.size = descriptor.preprocessing.resize_size
        self.interpolation = descriptor.preprocessing.interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = load_image(self.paths[index])
        if image is not None:
            image = center_crop(resize_short_side(image[None], self.size, self.interpolation), self.size)[0]
        return {"image": image, "index": index, "path": self.paths[index]}


def folder_labels(root: Path, paths: Sequence[Path]) -> list[str | None] | None:
    """Class labels from an ImageNet-style layout (``root/<class>/<image>``): the first folder
    under ``root``; ``None`` when some image lies directly in ``root`` (no classes)."""
    parts = [p.relative_to(root).parts for p in paths]
    if not parts or any(len(p) < 2 for p in parts):
        return None
    return [p[0] for p in parts]


def sidecar_captions(paths: Sequence[Path]) -> list[str | None] | None:
    """Caption of each image from ``<stem>.txt`` beside it (img2dataset's layout); ``None`` when there are none."""
    captions: list[str | None] = []
    for path in paths:
        text = path.with_suffix(".txt")
        captions.append(text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else None)
    return captions if any(c is not None for c in captions) else None


class StoreSource:
    """A :class:`lit.store.FeatureStore` as a :class:`FeatureSource` (float32 torch blocks, string labels)."""

    def __init__(self, name: str, store: FeatureStore) -> None:
        self.name = name
        self.store = store
        self._keys: list[str] | None = None

    @property
    def num_rows(self) -> int:
        return self.store.num_rows

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = self.store.keys
        return self._keys

    @property
    def captions(self) -> list[str | None] | None:
        return self.store.captions

    @property
    def labels(self) -> list[str | None] | None:
        labels = self.store.labels
        return None if labels is None else [None if label is None else str(label) for label in labels]

    @property
    def manifest(self) -> dict[str, Any]:
        return {"kind": "store", "root": str(self.store.root),
                **{k: v for k, v in self.store.manifest.items() if k != "shards"},
                "num_shards": len(self.store.shards)}

    @property
    def skipped(self) -> list[str]:
        return self.store.skipped

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[int, Tensor]]:
        for start, block in self.store.iter_blocks(block_rows, dtype=np.float32):
            yield start, torch.from_numpy(block)

    def rows(self, indices: Tensor) -> Tensor:
        return torch.from_numpy(self.store.rows(indices.cpu().numpy(), dtype=np.float32))


def folder_fingerprint(root: Path, paths: Sequence[Path]) -> str:
    """SHA-256 over every image's relative path, size and modification time (changes when the folder does)."""
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def store_folder_name(role: str, root: Path, fingerprint: str, record: dict[str, Any], dtype: str) -> str:
    """``<role>-<12 hex>``: one store per (source folder, its content, descriptor, dtype)."""
    key = json.dumps({"source": str(root.resolve()), "fingerprint": fingerprint, "dtype": dtype,
                      "descriptor": {f: record.get(f) for f in COMPATIBILITY_FIELDS}}, sort_keys=True)
    return f"{role}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def extract_folder(role: str, root: Path, store_dir: Path, descriptor: Descriptor, record: dict[str, Any], *,
                   device: torch.device, batch_size: int, num_workers: int = 0, shard_rows: int = 8192,
                   dtype: str = "float16", progress: bool = True) -> tuple[FeatureStore, bool]:
    """The store of image folder ``root`` under ``store_dir`` (extracted now, or reused: second value True).

    Rows are the folder's images in sorted path order; unreadable images are skipped,
    listed in their shard and counted. Labels come from ``root/<class>/`` folders,
    captions from ``<stem>.txt`` files (see :func:`folder_labels`, :func:`sidecar_captions`).
    """
    try:
        paths = list_images(root)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise UserError(f"--{role}: {error}") from None
    if not paths:
        raise UserError(f"--{role}: no images found under {root}")
    fingerprint = folder_fingerprint(root, paths)
    target = store_dir / store_folder_name(role, root, fingerprint, record, dtype)
    if (target / "manifest.json").is_file():
        store = FeatureStore.open(target)
        extra = store.manifest.get("extra", {})
        if extra.get("fingerprint") == fingerprint and store.manifest.get("dtype") == dtype:
            store.check_compatible(record, what=f"the descriptor of this scan ({record.get('display_name')})")
            return store, True
    labels, captions = folder_labels(root, paths), sidecar_captions(paths)
    dataset = FittedImages([str(p) for p in paths], descriptor)
    feature_shape = _feature_shape(descriptor, dataset)
    writer = StoreWriter(target, record, feature_shape, dtype=dtype)
    starts = range(0, len(paths), shard_rows)
    for start in tqdm(starts, desc=f"extract {role}", unit="shard", disable=not progress or len(starts) < 2):
        name = f"{start:010d}"
        if writer.has_shard(name):
            continue
        stop = min(start + shard_rows, len(paths))
        try:
            embedded = embed_dataset(descriptor, Subset(dataset, range(start, stop)), batch_size=batch_size,
                                     device=device, num_workers=num_workers, progress=progress,
                                     desc=f"embed {role} {start}-{stop}")
        except ValueError:
            if _any_loadable(dataset, start, stop):
                raise
            embedded = None  # every image of this shard is unreadable: an empty shard that lists them
        kept = [] if embedded is None else embedded.index.tolist()
        features = (embedded.features if embedded is not None
                    else torch.empty(0, *feature_shape))
        skipped = sorted(set(str(paths[i]) for i in range(start, stop)) - {str(paths[i]) for i in kept})
        writer.write_shard(name, features, keys=[str(paths[i]) for i in kept],
                           captions=None if captions is None else [captions[i] for i in kept],
                           labels=None if labels is None else [labels[i] for i in kept],
                           skipped=skipped, start=start)
    writer.finalize({"source": str(root.resolve()), "fingerprint": fingerprint, "images": len(paths),
                     "made_by": "lit scan"})
    return FeatureStore.open(target), False


def _any_loadable(dataset: FittedImages, start: int, stop: int) -> bool:
    """Whether some image of rows [start, stop) loads (embed_dataset needs one to size an empty result)."""
    return any(dataset[i]["image"] is not None for i in range(start, stop))


def _feature_shape(descriptor: Descriptor, dataset: FittedImages) -> tuple[int, ...]:
    """Shape of one row of features, from the first image that loads."""
    for i in range(len(dataset)):
        image = dataset[i]["image"]
        if image is not None:
            with torch.no_grad():
                device = next(iter(descriptor.buffers())).device
                return tuple(descriptor(image[None].to(device)).shape[1:])
    raise UserError(f"none of the {len(dataset)} images under the input folder could be read")
