"""GPR1200 (Schall et al., 2021): 1200 classes x 10 images from six domains.

The official ``GPR1200.zip`` unpacks to one flat folder ``images/`` whose files are
named ``<class id>_<image name>.jpg``; the official evaluation reads the class from
the part before the first underscore. ``root`` may be that folder or its parent.
Every image queries the other 9 images of its class; unlike the official script,
the query itself is excluded from its ranking (DESIGN: a sample is never its own match).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from datamodules.real.common import DatasetLayoutError, class_retrieval_set, require_root
from datamodules.retrieval import RetrievalDataModule, RetrievalSet
from lit.io import DEFAULT_MAX_PIXELS, list_images, shorten

_NAME = "GPR1200"
_LAYOUT = "the flat images/ folder of GPR1200.zip with files named <class id>_<name>.jpg"


def gpr1200_images(folder: Path) -> tuple[list[Path], list[int]]:
    """Image files of a flat GPR1200 folder sorted by (class id, name), with their class ids."""
    files = list_images(folder, recursive=False)
    if not files:
        nested = sorted(p.name for p in folder.iterdir() if p.is_dir())
        hint = f"; it has sub-folders {shorten(nested)}" if nested else ""
        raise DatasetLayoutError(f"{_NAME}: no image files in {folder} (expected {_LAYOUT}){hint}")
    prefixes = [f.name.split("_", 1)[0] if "_" in f.name else "" for f in files]
    if bad := [f.name for f, prefix in zip(files, prefixes) if not prefix.isdigit()]:
        raise DatasetLayoutError(
            f"{_NAME}: {len(bad)} of {len(files)} image files in {folder} are not named "
            f"<class id>_<name>: {shorten(bad)} (expected {_LAYOUT})"
        )
    order = sorted(range(len(files)), key=lambda i: (int(prefixes[i]), files[i].name))
    return [files[i] for i in order], [int(prefixes[i]) for i in order]


def check_class_counts(labels: list[int], num_classes: int | None, images_per_class: int | None, folder: Path) -> None:
    """Raise :class:`DatasetLayoutError` when the class / per-class counts differ from the expected ones."""
    counts = Counter(labels)
    problems = []
    if num_classes is not None and len(counts) != num_classes:
        problems.append(f"{len(counts)} classes instead of {num_classes}")
    if images_per_class is not None and (odd := sorted(c for c, n in counts.items() if n != images_per_class)):
        problems.append(
            f"{len(odd)} classes without exactly {images_per_class} images: "
            + shorten([f"{c} ({counts[c]})" for c in odd])
        )
    if problems:
        raise DatasetLayoutError(
            f"{_NAME}: {folder} has {len(labels)} images; " + "; ".join(problems)
            + " (incomplete copy? set num_classes / images_per_class to null to accept a subset)"
        )


class GPR1200DataModule(RetrievalDataModule):
    """GPR1200: each image queries the rest of its class.

    Args:
        root: the ``images/`` folder of GPR1200, or the folder that contains it.
        num_classes: expected number of classes (1200; ``None`` skips the check).
        images_per_class: expected images per class (10; ``None`` skips the check).
        max_pixels: images larger than this are downscaled on load.
        strict: stop at the first unreadable image (default: skip and count it).
    """

    def __init__(
        self,
        root: str,
        num_classes: int | None = 1200,
        images_per_class: int | None = 10,
        batch_size: int = 32,
        num_workers: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        strict: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, strict=strict)
        self.root = root
        self.num_classes = num_classes
        self.images_per_class = images_per_class
        self.max_pixels = max_pixels

    def build(self) -> RetrievalSet:
        root = require_root(self.root, _NAME, _LAYOUT)
        folder = root / "images" if (root / "images").is_dir() else root
        paths, labels = gpr1200_images(folder)
        check_class_counts(labels, self.num_classes, self.images_per_class, folder)
        return class_retrieval_set(paths, labels, _NAME, self.max_pixels, self.strict)


__all__ = ["GPR1200DataModule", "check_class_counts", "gpr1200_images"]
