"""Shared pieces of the real retrieval-set loaders (Oxford/Paris, CUB, GPR1200, INSTRE).

- :class:`DatasetLayoutError`: a root folder that is not the expected layout; the
  one-line message names what is missing (file names, counts) and the layout expected.
- :class:`CroppedImageDataset`: image files read lazily, each optionally cropped by
  a box (the revisited Oxford/Paris query crops).
- :func:`class_retrieval_set`: the "each image queries the rest of its class"
  ground truth shared by CUB-200-2011, GPR1200 and INSTRE.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from datamodules.retrieval import DatasetLayoutError, ImageFileDataset, class_retrieval_set
from lit.io import DEFAULT_MAX_PIXELS, missing_files, shorten

Box = tuple[float, float, float, float]
"""(x1, y1, x2, y2) in pixels of the stored image, x2/y2 exclusive (PIL ``crop``)."""


def require_root(root: str | Path, dataset: str, layout: str) -> Path:
    """``root`` as a Path; a missing root or a file raises :class:`DatasetLayoutError`."""
    path = Path(root)
    if not path.exists():
        raise DatasetLayoutError(f"{dataset} root not found: {path} (expected {layout})")
    if not path.is_dir():
        raise DatasetLayoutError(f"{dataset} root is a file, not a folder: {path} (expected {layout})")
    return path


def require_files(root: Path, names: Sequence[str], dataset: str, listed_in: str) -> None:
    """Raise one :class:`DatasetLayoutError` saying how many of ``names`` (relative to
    ``root``) are missing and which, else return."""
    missing, total = missing_files(root, names)
    if missing:
        raise DatasetLayoutError(
            f"{dataset}: {len(missing)} of {total} image files listed in {listed_in} are missing "
            f"under {root}: {shorten(missing)}"
        )


def crop_box(image: Tensor, box: Box) -> Tensor:
    """Crop a (C, H, W) image to ``box`` = (x1, y1, x2, y2), rounded as ``PIL.Image.crop``
    rounds (Python ``round``) and clipped to the image; an empty crop raises ValueError."""
    height, width = image.shape[-2:]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, x2 = max(0, x1), min(width, x2)
    y1, y2 = max(0, y1), min(height, y2)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"crop box {tuple(box)} lies outside the {width}x{height} image")
    return image[..., y1:y2, x1:x2]


class CroppedImageDataset(ImageFileDataset):
    """Image files read lazily, item ``i`` cropped to ``boxes[i]`` (``None``: whole image).

    A file that fails to load yields ``image=None`` (a counted skip, see
    :func:`datamodules.retrieval.collate_images`). Boxes are in the stored file's
    pixels; when ``load_image`` downscaled the image (more than ``max_pixels``) the
    box is scaled by the same factor, read from the file header.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        boxes: Sequence[Box | None],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        strict: bool = False,
    ) -> None:
        super().__init__(paths, max_pixels=max_pixels, strict=strict)
        if len(boxes) != len(self.paths):
            raise ValueError(f"got {len(boxes)} boxes for {len(self.paths)} images")
        self.boxes = [tuple(float(v) for v in b) if b is not None else None for b in boxes]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        box = self.boxes[index]
        image = item["image"]
        if image is not None and box is not None:
            item["image"] = crop_box(image, _rescale_box(box, self.paths[index], image)).contiguous()
        return item


def _rescale_box(box: Box, path: str, image: Tensor) -> Box:
    """``box`` in the loaded image's pixels when loading shrank the stored image."""
    height, width = image.shape[-2:]
    with Image.open(path) as stored:
        stored_width, stored_height = stored.size
    if (stored_width, stored_height) in ((width, height), (height, width)):
        return box
    sx, sy = width / stored_width, height / stored_height
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


__all__ = [
    "Box",
    "CroppedImageDataset",
    "DatasetLayoutError",
    "class_retrieval_set",
    "crop_box",
    "require_files",
    "require_root",
    "shorten",
]
