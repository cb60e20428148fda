"""INSTRE (Wang and Jiang, 2015): instance-level object retrieval, 28,543 images.

The release has three disjoint subsets, each a folder of class folders:
``INSTRE-S1/<class>/*.jpg`` (100 classes, 11,011 images), ``INSTRE-S2/<class>/*.jpg``
(100 classes, 12,059 images) and ``INSTRE-M/<class>/*.jpg`` (50 classes of two
objects, 5,473 images); bounding-box ``.txt`` files beside the images are ignored.
A class is (subset, folder); every image queries the rest of its class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pytorch_lightning.utilities import rank_zero_warn

from datamodules.real.common import DatasetLayoutError, class_retrieval_set, require_root
from datamodules.retrieval import RetrievalDataModule, RetrievalSet
from lit.io import DEFAULT_MAX_PIXELS, list_images, shorten

InstreSubset = Literal["INSTRE-S1", "INSTRE-S2", "INSTRE-M"]

_NAME = "INSTRE"
_OFFICIAL = {"INSTRE-S1": (100, 11011), "INSTRE-S2": (100, 12059), "INSTRE-M": (50, 5473)}  # classes, images
_LAYOUT = "folders INSTRE-S1/, INSTRE-S2/, INSTRE-M/, each holding one folder of .jpg images per class"


def instre_images(root: Path, subsets: list[str]) -> tuple[list[Path], list[str]]:
    """Image files of the chosen subsets, sorted, with class labels ``<subset>/<class folder>``."""
    if missing := [s for s in subsets if not (root / s).is_dir()]:
        nested = [p.name for p in root.iterdir() if p.is_dir() and (p / missing[0]).is_dir()]
        hint = f"; did you mean root={root / nested[0]}?" if nested else ""
        raise DatasetLayoutError(
            f"{_NAME}: subset folder(s) {', '.join(missing)} not found in {root} (expected {_LAYOUT}){hint}"
        )
    paths: list[Path] = []
    labels: list[str] = []
    for subset in subsets:
        folders = sorted(p for p in (root / subset).iterdir() if p.is_dir())
        if not folders:
            raise DatasetLayoutError(f"{_NAME}: {root / subset} has no class folders (expected {_LAYOUT})")
        images_of = {folder: list_images(folder) for folder in folders}
        if empty := [f.name for f, images in images_of.items() if not images]:
            raise DatasetLayoutError(
                f"{_NAME}: {len(empty)} class folder(s) of {subset} hold no images: {shorten(empty)}"
            )
        for folder, images in images_of.items():
            paths.extend(images)
            labels.extend([f"{subset}/{folder.name}"] * len(images))
    return paths, labels


def check_subset_counts(root: Path, subsets: list[str], labels: list[str]) -> None:
    """Class counts must match the release (else :class:`DatasetLayoutError`); image counts only warn."""
    for subset in subsets:
        classes = {label for label in labels if label.startswith(f"{subset}/")}
        images = sum(1 for label in labels if label.startswith(f"{subset}/"))
        want_classes, want_images = _OFFICIAL[subset]
        if len(classes) != want_classes:
            raise DatasetLayoutError(
                f"{_NAME}: {root / subset} has {len(classes)} class folders; the release has {want_classes} "
                "(incomplete copy? set check_counts: false to accept a subset)"
            )
        if images != want_images:
            rank_zero_warn(f"{_NAME}: {root / subset} has {images} images; the release has {want_images}")


class INSTREDataModule(RetrievalDataModule):
    """INSTRE: each image queries the other images of its class.

    Args:
        root: the folder holding ``INSTRE-S1``, ``INSTRE-S2`` and ``INSTRE-M``.
        subsets: the subsets to include (default all three, 250 classes).
        check_counts: require the release's class counts (100, 100, 50).
        max_pixels: images larger than this are downscaled on load.
        strict: stop at the first unreadable image (default: skip and count it).
    """

    def __init__(
        self,
        root: str,
        subsets: list[InstreSubset] = ["INSTRE-S1", "INSTRE-S2", "INSTRE-M"],  # noqa: B006 - shown by LightningCLI
        check_counts: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        strict: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, strict=strict)
        if not subsets or any(s not in _OFFICIAL for s in subsets):
            raise ValueError(f"subsets must be a non-empty list of {list(_OFFICIAL)}; got {subsets}")
        if len(set(subsets)) != len(subsets):
            raise ValueError(f"subsets repeat a name: {subsets}")
        self.root = root
        self.subsets = list(subsets)
        self.check_counts = check_counts
        self.max_pixels = max_pixels

    def build(self) -> RetrievalSet:
        root = require_root(self.root, _NAME, _LAYOUT)
        paths, labels = instre_images(root, self.subsets)
        if self.check_counts:
            check_subset_counts(root, self.subsets, labels)
        return class_retrieval_set(paths, labels, _NAME, self.max_pixels, self.strict)


__all__ = ["INSTREDataModule", "InstreSubset", "check_subset_counts", "instre_images"]
