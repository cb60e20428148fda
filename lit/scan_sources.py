"""Where the features of a scan come from: a feature store, or images embedded on the way.

``lit scan`` reads every set (generations, training, background) through one small
interface, :class:`FeatureSource`: row count, per-row keys / captions / labels,
features in blocks (never the whole set at once for a store) and by row, the
manifest, and the images that were skipped. :class:`MemorySource` holds features
embedded in this process (small sets, tests); stores come from :mod:`lit.store`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit.embedding import embed_dataset
from lit.errors import UserError
from lit.io import list_images, load_image
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


def embed_folder(name: str, root: Path, descriptor: Descriptor, record: dict[str, Any], *, device: torch.device,
                 batch_size: int, num_workers: int = 0) -> MemorySource:
    """Embed every image under ``root`` (recursive, sorted) in this process; unreadable files are skipped and listed."""
    paths = list_images(root)
    if not paths:
        raise UserError(f"--{name}: no images found under {root}")
    dataset = FittedImages([str(p) for p in paths], descriptor)
    embedded = embed_dataset(descriptor, dataset, batch_size=batch_size, device=device, num_workers=num_workers,
                             progress=True, desc=f"embed {name}")
    kept = embedded.index.tolist()
    labels, captions = folder_labels(root, paths), sidecar_captions(paths)
    manifest = {"kind": "memory", "source": str(root), "descriptor": record, "num_rows": len(kept),
                "skipped": len(embedded.skipped)}
    return MemorySource(
        name=name,
        features=embedded.features,
        keys=[str(paths[i]) for i in kept],
        captions=None if captions is None else [captions[i] for i in kept],
        labels=None if labels is None else [labels[i] for i in kept],
        manifest=manifest,
        skipped=list(embedded.skipped),
    )
