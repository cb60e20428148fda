"""Retrieval datamodules: queries, a gallery and the ground truth that links them.

A :class:`RetrievalSet` holds two map-style datasets whose items are
``{"image": (3,H,W) float in [0,1] or None, "index": row, "path": str}`` plus,
per query, its positive gallery rows (and optional junk rows, ignored when
ranking). :class:`RetrievalDataModule` subclasses build one in ``build()``; the
test and predict loops get ``[queries_loader, gallery_loader]`` without
shuffling. Under DDP Lightning pads the shards with repeated samples; every
item carries its row ``index`` so the evaluator can deduplicate.

Image files are read lazily with :func:`lit.io.load_image`: a bad file becomes
``image=None`` with an ``ImageSkipWarning`` and :func:`collate_images` reports
it in ``batch["skipped"]`` for the caller to count. Every datamodule that reads files
takes ``strict``: the first unreadable file then stops the run with an
:class:`~lit.io.ImageLoadError` (a ``UserError``) naming it.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from datamodules.procedural import ProceduralScenes
from lit.errors import UserError
from lit.io import DEFAULT_MAX_PIXELS, list_images, load_image, missing_files, shorten
from lit.seeding import derive_seed

_GROUND_TRUTH_KEYS = ("queries", "gallery", "positives")
_OPTIONAL_KEYS = ("junk",)


@dataclass
class RetrievalSet:
    """Queries, gallery and ground truth; validated on construction.

    ``positives[q]`` / ``junk[q]`` are gallery rows; ``query_in_gallery[q]`` is the
    gallery row that *is* query ``q`` (excluded from its ranking), or -1.
    ``skipped_queries`` (query path -> reason): candidate queries left out before
    evaluation (e.g. a synthetic set's skipped sources); ``skipped_sources`` (file ->
    reason): other unreadable inputs that were worked around (e.g. a redrawn pool image).
    Both go into ``metrics.json``.
    """

    queries: Dataset
    gallery: Dataset
    positives: list[list[int]]
    junk: list[list[int]] | None = None
    query_in_gallery: list[int] | None = None
    skipped_queries: dict[str, str] = field(default_factory=dict)
    skipped_sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        num_queries, num_gallery = len(self.queries), len(self.gallery)  # type: ignore[arg-type]
        if num_queries == 0:
            raise ValueError("retrieval set has no queries")
        _check_per_query("positives", self.positives, num_queries)
        if self.junk is not None:
            _check_per_query("junk", self.junk, num_queries)
        if self.query_in_gallery is not None:
            _check_per_query("query_in_gallery", self.query_in_gallery, num_queries)
        for q in range(num_queries):
            name = _item_name(self.queries, q)
            positives = [int(r) for r in self.positives[q]]
            if not positives:
                raise ValueError(f"query {name} has no positives (every query needs at least one)")
            _check_rows(f"positives of query {name}", positives, num_gallery)
            junk = [int(r) for r in self.junk[q]] if self.junk is not None else []
            _check_rows(f"junk of query {name}", junk, num_gallery)
            if overlap := sorted(set(positives) & set(junk)):
                raise ValueError(f"query {name}: gallery rows {overlap} are both positive and junk")
            own = int(self.query_in_gallery[q]) if self.query_in_gallery is not None else -1
            if not -1 <= own < num_gallery:
                raise ValueError(f"query {name}: query_in_gallery row {own} is outside -1..{num_gallery - 1}")
            if own >= 0 and own in positives:
                raise ValueError(f"query {name} lists its own gallery row {own} as a positive")

    @property
    def num_positives(self) -> Tensor:
        """(Q,) int64 number of positives per query (junk excluded)."""
        return torch.tensor([len(p) for p in self.positives], dtype=torch.int64)

    @property
    def exclude(self) -> Tensor:
        """(Q,) int64 gallery row to drop from each query's ranking (-1 = none), for ``lit.search``."""
        if self.query_in_gallery is None:
            return torch.full((len(self.positives),), -1, dtype=torch.int64)
        return torch.tensor(self.query_in_gallery, dtype=torch.int64)


def collate_images(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate dataset items, dropping those whose image failed to load.

    ``image`` is stacked to (B,3,H,W) when all sizes match, else kept as a list of
    (3,H,W) (an empty batch gives a (0,3,0,0) tensor); ``index`` is an int64 tensor;
    ``path`` a list; ``skipped`` lists the paths of dropped items. Other keys present in
    every kept item are stacked when possible, else kept as lists.
    """
    kept = [item for item in batch if item["image"] is not None]
    out: dict[str, Any] = {
        "image": _stack_or_list([item["image"] for item in kept], empty=torch.empty(0, 3, 0, 0)),
        "index": torch.tensor([int(item["index"]) for item in kept], dtype=torch.int64),
        "path": [str(item["path"]) for item in kept],
        "skipped": [str(item.get("path", f"index {item.get('index')}")) for item in batch if item["image"] is None],
    }
    extra = set.intersection(*(set(item) for item in kept)) - set(out) if kept else set()
    for key in sorted(extra):
        out[key] = _stack_or_list([item[key] for item in kept], empty=None)
    return out


class ImageFileDataset(Dataset):
    """Image files read lazily; a file that fails to load yields ``image=None`` (a counted
    skip), or raises :class:`~lit.io.ImageLoadError` naming it when ``strict``."""

    def __init__(self, paths: Sequence[str | Path], max_pixels: int = DEFAULT_MAX_PIXELS, strict: bool = False) -> None:
        self.paths = [str(p) for p in paths]
        self.max_pixels = max_pixels
        self.strict = strict

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        return self.paths[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        return {"image": load_image(path, strict=self.strict, max_pixels=self.max_pixels), "index": int(index),
                "path": path}


class DatasetLayoutError(UserError, ValueError):
    """A dataset root is missing files or folders, or they do not have the expected form.

    A :class:`~lit.errors.UserError`: ``lit`` ends with its one-line message."""


def class_retrieval_set(
    paths: Sequence[str | Path],
    labels: Sequence[Hashable],
    dataset: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    strict: bool = False,
) -> RetrievalSet:
    """Every image is in the gallery; every image of a class with >= 2 images is a query
    whose positives are the other images of its class (its own gallery row is excluded).

    Images of single-image classes cannot be queries: they stay in the gallery as
    distractors and are counted in a warning.
    """
    if len(paths) != len(labels):
        raise ValueError(f"{dataset}: {len(paths)} paths but {len(labels)} labels")
    rows_of_class: dict[Hashable, list[int]] = defaultdict(list)
    for row, label in enumerate(labels):
        rows_of_class[label].append(row)
    singles = [label for label, rows in rows_of_class.items() if len(rows) == 1]
    if singles:
        rank_zero_warn(
            f"{dataset}: {len(singles)} class(es) have a single image ({shorten([str(s) for s in singles])}); "
            "those images are gallery-only distractors, not queries"
        )
    query_rows = [row for row, label in enumerate(labels) if len(rows_of_class[label]) > 1]
    if not query_rows:
        raise DatasetLayoutError(f"{dataset}: no class has two or more images, so there are no queries")
    return RetrievalSet(
        queries=ImageFileDataset([paths[r] for r in query_rows], max_pixels, strict),
        gallery=ImageFileDataset(paths, max_pixels, strict),
        positives=[[r for r in rows_of_class[labels[q]] if r != q] for q in query_rows],
        query_in_gallery=query_rows,
    )


class RetrievalDataModule(pl.LightningDataModule):
    """Base datamodule: subclasses implement :meth:`build`; ``setup()`` calls it once.

    Args:
        batch_size: images per batch for both loaders.
        num_workers: dataloader worker processes (0 = load in the main process).
        strict: stop at the first image file that cannot be read (default: skip and count it).
    """

    def __init__(self, batch_size: int = 32, num_workers: int = 0, strict: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.strict = strict
        self._retrieval_set: RetrievalSet | None = None

    @property
    def name(self) -> str:
        """Dataset label in reports (Table 1 column); subclasses may refine it."""
        return type(self).__name__.removesuffix("DataModule")

    def build(self) -> RetrievalSet:
        """Create the retrieval set (called once, by :meth:`setup`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build()")

    def setup(self, stage: str | None = None) -> None:
        if self._retrieval_set is None:
            self._retrieval_set = self.build()

    @property
    def retrieval_set(self) -> RetrievalSet:
        """The retrieval set built by :meth:`setup`."""
        if self._retrieval_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before retrieval_set is used")
        return self._retrieval_set

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(self.retrieval_set.queries), self._loader(self.retrieval_set.gallery)]

    def predict_dataloader(self) -> list[DataLoader]:
        return self.test_dataloader()

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_images,
        )


class FolderRetrievalDataModule(RetrievalDataModule):
    """Class folders ``root/<class>/<images>`` (searched recursively inside each class).

    Every image is in the gallery; every image of a class with at least two images is
    a query whose positives are the other images of its class (its own gallery row is
    excluded). Images of single-image classes are gallery-only distractors.

    Args:
        root: folder holding one sub-folder per class.
        max_pixels: images larger than this are downscaled on load.
        strict: stop at the first unreadable image (default: skip and count it).
    """

    def __init__(
        self, root: str, batch_size: int = 32, num_workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
        strict: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, strict=strict)
        self.root = root
        self.max_pixels = max_pixels
        self.class_names: list[str] = []

    def build(self) -> RetrievalSet:
        root = Path(self.root)
        loose = list_images(root, recursive=False)  # raises FileNotFoundError for a missing root
        if loose:
            rank_zero_warn(f"{len(loose)} image(s) directly under {root} are in no class folder and are ignored")
        paths: list[Path] = []
        labels: list[int] = []
        self.class_names = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            images = list_images(folder)
            if images:
                labels += [len(self.class_names)] * len(images)
                self.class_names.append(folder.name)
                paths += images
        if not paths:
            raise ValueError(f"no images found in class folders under {root} (expected root/<class>/<images>)")
        return class_retrieval_set(paths, labels, str(root), self.max_pixels, self.strict)


class ListRetrievalDataModule(RetrievalDataModule):
    """Ground truth from a JSON file::

        {"queries": ["q/0.jpg", ...], "gallery": ["g/0.jpg", ...],
         "positives": [[gallery rows] per query], "junk": [[gallery rows] per query]}

    ``junk`` is optional. A query whose path also appears in the gallery has that
    gallery row excluded from its ranking (first occurrence).

    Args:
        ground_truth: path of the JSON file.
        root: folder the image paths are relative to (default: the JSON file's folder).
        max_pixels: images larger than this are downscaled on load.
        strict: stop at the first unreadable image (default: skip and count it).
    """

    def __init__(
        self,
        ground_truth: str,
        root: str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        strict: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, strict=strict)
        self.ground_truth = ground_truth
        self.root = root
        self.max_pixels = max_pixels

    def build(self) -> RetrievalSet:
        source = Path(self.ground_truth)
        data = _read_ground_truth(source)
        root = Path(self.root) if self.root is not None else source.parent
        queries, gallery = data["queries"], data["gallery"]
        _check_files_exist(source, root, [*queries, *gallery])
        first_row: dict[str, int] = {}
        for row, name in enumerate(gallery):
            first_row.setdefault(os.path.normpath(name), row)
        return RetrievalSet(
            queries=ImageFileDataset([root / p for p in queries], self.max_pixels, self.strict),
            gallery=ImageFileDataset([root / p for p in gallery], self.max_pixels, self.strict),
            positives=data["positives"],
            junk=data.get("junk"),
            query_in_gallery=[first_row.get(os.path.normpath(p), -1) for p in queries],
        )


class ProceduralRetrievalDataModule(RetrievalDataModule):
    """Synthetic copy detection with no files: procedural scenes as queries; the gallery
    holds ``copies_per_query`` augmented copies of each query (kornia random resized
    crop, flip, colour jitter, blur) followed by ``num_distractors`` unrelated scenes.

    Gallery rows ``q * copies_per_query + c`` are the copies of query ``q`` (its
    positives); the distractors come after. Every item is rendered lazily and
    deterministically from ``(seed, row)``, so DDP ranks and workers agree bitwise.

    Args:
        num_queries: number of query scenes.
        copies_per_query: augmented copies of each query in the gallery (its positives).
        num_distractors: extra unrelated scenes in the gallery.
        image_size: side of the square images.
        seed: seed of the whole set.
    """

    def __init__(
        self,
        num_queries: int = 50,
        copies_per_query: int = 3,
        num_distractors: int = 100,
        image_size: int = 64,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if num_queries < 1 or copies_per_query < 1 or num_distractors < 0:
            raise ValueError(
                "need num_queries >= 1, copies_per_query >= 1 and num_distractors >= 0, got "
                f"{num_queries}, {copies_per_query}, {num_distractors}"
            )
        self.num_queries = num_queries
        self.copies_per_query = copies_per_query
        self.num_distractors = num_distractors
        self.image_size = image_size
        self.seed = seed

    def build(self) -> RetrievalSet:
        queries = ProceduralScenes(self.num_queries, self.image_size, seed=self.seed)
        distractors = ProceduralScenes(
            self.num_distractors, self.image_size, seed=derive_seed(self.seed, "distractors")
        )
        gallery = ProceduralCopyGallery(queries, self.copies_per_query, distractors, seed=self.seed)
        copies = self.copies_per_query
        return RetrievalSet(
            queries=queries,
            gallery=gallery,
            positives=[list(range(q * copies, (q + 1) * copies)) for q in range(self.num_queries)],
        )


class ProceduralCopyGallery(Dataset):
    """Gallery of augmented copies of ``sources`` (rows ``s * copies + c``) then ``distractors``."""

    def __init__(self, sources: ProceduralScenes, copies: int, distractors: ProceduralScenes, seed: int) -> None:
        self.sources = sources
        self.copies = copies
        self.distractors = distractors
        self.seed = seed
        self.augment = copy_augmentation(sources.size)
        self._last_source: tuple[int, Tensor] | None = None  # copies of a source are consecutive rows

    def __len__(self) -> int:
        return len(self.sources) * self.copies + len(self.distractors)

    def _source_image(self, source: int) -> Tensor:
        """Scene ``source``, rendered once for its run of consecutive copies."""
        if self._last_source is None or self._last_source[0] != source:
            self._last_source = (source, self.sources[source]["image"])
        return self._last_source[1]

    def path(self, index: int) -> str:
        if index < len(self.sources) * self.copies:
            source, copy = divmod(index, self.copies)
            return f"{self.sources.path(source)}#copy{copy}"
        return self.distractors.path(index - len(self.sources) * self.copies)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} gallery items")
        num_copies = len(self.sources) * self.copies
        if index < num_copies:
            source, copy = divmod(index, self.copies)
            image = self._source_image(source)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.seed, "copy", source, copy))
                image = self.augment(image[None])[0].clamp(0.0, 1.0)
        else:
            image = self.distractors[index - num_copies]["image"]
        return {"image": image, "index": index, "path": self.path(index)}


def copy_augmentation(size: int) -> nn.Module:
    """The kornia pipeline that turns a scene into a near copy: random resized crop keeping
    60-100% of the area, horizontal flip, colour jitter and Gaussian blur."""
    import kornia.augmentation as K  # heavy import, only needed for procedural copies

    sigma_max = max(0.5, 1.5 * size / 64)
    kernel = 2 * int(2 * sigma_max + 0.5) + 1
    return K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3)),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=0.8),
        K.RandomGaussianBlur((kernel, kernel), sigma=(0.1, sigma_max), p=0.5),
    )


def _stack_or_list(values: list[Any], empty: Any) -> Any:
    """Stack equal-shape tensors, turn ints into an int64 tensor, else keep the list."""
    if not values:
        return empty if empty is not None else []
    if all(isinstance(v, Tensor) for v in values) and len({v.shape for v in values}) == 1:
        return torch.stack(values)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return torch.tensor(values, dtype=torch.int64)
    return values


def _item_name(dataset: Dataset, index: int) -> str:
    """``#index`` plus the item's path when the dataset can say it without loading."""
    path = getattr(dataset, "path", None)
    return f"#{index} ({path(index)})" if callable(path) else f"#{index}"


def _check_per_query(name: str, values: Sequence[Any], num_queries: int) -> None:
    if len(values) != num_queries:
        raise ValueError(f"{name} has {len(values)} entries but there are {num_queries} queries")


def _check_rows(what: str, rows: list[int], num_gallery: int) -> None:
    if bad := [r for r in rows if not 0 <= r < num_gallery]:
        raise ValueError(f"{what}: gallery rows {bad[:5]} are outside 0..{num_gallery - 1}")
    if len(set(rows)) != len(rows):
        raise ValueError(f"{what}: repeated gallery rows {sorted(r for r in set(rows) if rows.count(r) > 1)}")


def _read_ground_truth(source: Path) -> dict[str, Any]:
    """Load and type-check a ground-truth JSON file."""
    if not source.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {source}")
    try:
        data = json.loads(source.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: invalid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object with keys {list(_GROUND_TRUTH_KEYS)}")
    if missing := [k for k in _GROUND_TRUTH_KEYS if k not in data]:
        raise ValueError(
            f"{source}: missing key(s) {missing}; expected 'queries', 'gallery', 'positives' (and optional 'junk')"
        )
    if unknown := sorted(set(data) - set(_GROUND_TRUTH_KEYS) - set(_OPTIONAL_KEYS)):
        rank_zero_warn(f"{source}: ignoring unknown key(s) {unknown}")
    for key in ("queries", "gallery"):
        if not isinstance(data[key], list) or not all(isinstance(p, str) for p in data[key]):
            raise ValueError(f"{source}: '{key}' must be a list of relative image paths")
    for key in ("positives", "junk"):
        value = data.get(key)
        if value is None and key == "junk":
            continue
        if not isinstance(value, list) or not all(
            isinstance(rows, list) and all(isinstance(r, int) and not isinstance(r, bool) for r in rows)
            for rows in value
        ):
            raise ValueError(f"{source}: '{key}' must be a list (one per query) of lists of gallery rows")
    return data


def _check_files_exist(source: Path, root: Path, names: list[str]) -> None:
    """Raise one FileNotFoundError listing how many listed images are missing, and the first few."""
    missing, total = missing_files(root, names)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {total} image file(s) listed in {source} are missing under {root}: {shorten(missing)}"
        )


__all__ = [
    "FolderRetrievalDataModule",
    "ImageFileDataset",
    "ListRetrievalDataModule",
    "ProceduralCopyGallery",
    "ProceduralRetrievalDataModule",
    "RetrievalDataModule",
    "RetrievalSet",
    "collate_images",
    "copy_augmentation",
]
