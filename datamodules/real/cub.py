"""CUB-200-2011 (Wah et al., 2011) as a retrieval set, in the layout of ``CUB_200_2011.tgz``.

``root`` holds ``images.txt`` (``<image id> <relative path>``), ``image_class_labels.txt``
(``<image id> <class id>``), ``classes.txt`` (``<class id> <name>``) and ``images/``.
The metric-learning protocol evaluates on the second 100 classes (ids 101-200,
5,924 images): every image queries the rest of its class, its own row excluded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pytorch_lightning.utilities import rank_zero_warn

from datamodules.real.common import DatasetLayoutError, class_retrieval_set, require_files, require_root
from datamodules.retrieval import RetrievalDataModule, RetrievalSet
from lit.io import DEFAULT_MAX_PIXELS, shorten

CubSplit = Literal["test", "train", "all"]

_NAME = "CUB-200-2011"
_FILES = ("images.txt", "image_class_labels.txt", "classes.txt")
_LAYOUT = "images.txt, image_class_labels.txt, classes.txt and images/ as unpacked from CUB_200_2011.tgz"
_SPLIT_CLASSES = {"train": range(1, 101), "test": range(101, 201), "all": range(1, 201)}
_OFFICIAL_IMAGES, _OFFICIAL_CLASSES = 11788, 200


def read_id_table(path: Path) -> dict[int, str]:
    """``<integer id> <value>`` lines (value may contain spaces) -> {id: value}; blank lines ignored."""
    table: dict[int, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value.strip():
            raise DatasetLayoutError(f"{_NAME}: {path} line {number} is not '<integer id> <value>': {line!r}")
        if int(key) in table:
            raise DatasetLayoutError(f"{_NAME}: {path} line {number} repeats id {key}")
        table[int(key)] = value.strip()
    return table


def cub_images(root: Path, split: CubSplit) -> tuple[list[str], list[int]]:
    """Relative image paths (under ``images/``) and class ids of ``split``, by image id."""
    if missing := [name for name in _FILES if not (root / name).is_file()]:
        nested = root / "CUB_200_2011"
        hint = f"; did you mean root={nested}?" if (nested / "images.txt").is_file() else ""
        raise DatasetLayoutError(f"{_NAME}: {', '.join(missing)} not found in {root} (expected {_LAYOUT}){hint}")
    if not (root / "images").is_dir():
        raise DatasetLayoutError(f"{_NAME}: folder images/ not found in {root} (expected {_LAYOUT})")
    images = read_id_table(root / "images.txt")
    labels = read_id_table(root / "image_class_labels.txt")
    classes = read_id_table(root / "classes.txt")
    if unlabeled := sorted(set(images) - set(labels)):
        raise DatasetLayoutError(
            f"{_NAME}: {len(unlabeled)} image ids of images.txt have no line in image_class_labels.txt: "
            f"{shorten([str(i) for i in unlabeled])}"
        )
    bad = sorted({v for v in labels.values() if not v.isdigit() or int(v) not in classes})
    if bad:
        raise DatasetLayoutError(
            f"{_NAME}: image_class_labels.txt uses class ids not in classes.txt: {shorten(bad)}"
        )
    if (len(images), len(classes)) != (_OFFICIAL_IMAGES, _OFFICIAL_CLASSES):
        rank_zero_warn(
            f"{_NAME}: {root} lists {len(images)} images in {len(classes)} classes; "
            f"the official release has {_OFFICIAL_IMAGES} in {_OFFICIAL_CLASSES}"
        )
    wanted = set(_SPLIT_CLASSES[split])
    chosen = [i for i in sorted(images) if int(labels[i]) in wanted]
    if not chosen:
        span = _SPLIT_CLASSES[split]
        raise DatasetLayoutError(
            f"{_NAME}: no image of classes {span.start}-{span.stop - 1} (split {split!r}) in "
            f"{root / 'image_class_labels.txt'}"
        )
    return [images[i] for i in chosen], [int(labels[i]) for i in chosen]


class CUB200DataModule(RetrievalDataModule):
    """CUB-200-2011: each image queries the other images of its class.

    Args:
        root: the unpacked ``CUB_200_2011`` folder.
        split: ``test`` (classes 101-200, the standard evaluation set), ``train``
            (classes 1-100) or ``all``.
        max_pixels: images larger than this are downscaled on load.
        strict: stop at the first unreadable image (default: skip and count it).
    """

    def __init__(
        self,
        root: str,
        split: CubSplit = "test",
        batch_size: int = 32,
        num_workers: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        strict: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, strict=strict)
        if split not in _SPLIT_CLASSES:
            raise ValueError(f"unknown split {split!r}; expected 'test', 'train' or 'all'")
        self.root = root
        self.split = split
        self.max_pixels = max_pixels

    def build(self) -> RetrievalSet:
        root = require_root(self.root, _NAME, _LAYOUT)
        names, labels = cub_images(root, self.split)
        require_files(root / "images", names, _NAME, "images.txt")
        return class_retrieval_set([root / "images" / n for n in names], labels, _NAME, self.max_pixels,
                                   self.strict)


__all__ = ["CUB200DataModule", "CubSplit", "cub_images", "read_id_table"]
