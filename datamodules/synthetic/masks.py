"""Mask sources for Segmix: images with per-instance object masks and a background mask.

Three on-disk formats, one in-memory form (:class:`MaskedImage`):

- :class:`CocoMaskSource`: a COCO instances JSON (polygon, uncompressed RLE and
  compressed RLE segmentations, decoded with pycocotools). Background = pixels
  covered by no annotation; ``iscrowd`` regions are neither object nor background.
- :class:`VocMaskSource`: VOC ``SegmentationObject`` palette PNGs: index 0 is the
  background, every other index one instance, ``void_label`` (255, the VOC border)
  is ignored (neither object nor background).
- :class:`FolderMaskSource`: a plain folder of masks with the images' stems; every
  distinct non-zero value (grayscale / palette) or non-black colour (RGB) is one
  instance, so a binary 0/255 mask is one object.

Items are keyed by ``id`` = the image file's stem (its path relative to the image
folder without suffix), in sorted id order, and loaded lazily (full-size masks
of thousands of images do not fit in memory). Instances come in a *canonical
order* - largest area first, ties by the first pixel in raster order - so the same
regions stored in different formats give identical items; Segmix's seeds then
choose the same objects from either.
"""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lit.io import list_images, shorten


@dataclass(frozen=True)
class MaskedImage:
    """One image with its object instances and background, all (H, W) bool at image size."""

    id: str
    path: Path
    instances: list[Tensor]
    background: Tensor

    @property
    def areas(self) -> list[int]:
        """Pixel count of each instance (numpy: far cheaper than torch on bool masks)."""
        return [int(np.count_nonzero(m.numpy())) for m in self.instances]

    @property
    def background_area(self) -> int:
        return int(np.count_nonzero(self.background.numpy()))

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image and of every mask."""
        return int(self.background.shape[0]), int(self.background.shape[1])


def canonical_instances(masks: Sequence[np.ndarray | Tensor]) -> list[Tensor]:
    """Drop empty masks and order the rest by area (descending), then first pixel (raster order).

    Stable for exact ties (overlapping COCO masks with the same area and first pixel keep
    their input order)."""
    arrays = [np.asarray(m.numpy() if isinstance(m, Tensor) else m, dtype=bool) for m in masks]
    keyed = []
    for position, mask in enumerate(arrays):
        flat = mask.reshape(-1)
        area = int(np.count_nonzero(flat))
        if area:
            keyed.append((-area, int(flat.argmax()), position, mask))  # argmax of bool = first True
    return [torch.from_numpy(np.ascontiguousarray(mask)) for *_, mask in sorted(keyed, key=lambda k: k[:3])]


def labels_to_instances(labels: np.ndarray, ignore: Sequence[int] = ()) -> tuple[list[np.ndarray], np.ndarray]:
    """Split an integer label map into one bool mask per non-zero label (``ignore`` excluded)
    and the background (label 0)."""
    values = [int(v) for v in np.unique(labels) if v != 0 and int(v) not in ignore]
    return [labels == v for v in values], labels == 0


def decode_coco_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO ``segmentation`` (polygon list, uncompressed or compressed RLE) to (H, W) bool."""
    from pycocotools import mask as mask_utils  # C extension; only COCO sources need it

    if isinstance(segmentation, list):
        if not segmentation:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            raise ValueError(f"RLE size {segmentation['size']} differs from the image size {[height, width]}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unsupported COCO segmentation of type {type(segmentation).__name__}")
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword DeprecationWarning, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


class MaskSource(ABC):
    """Images with instance masks, indexed in sorted id order; items load lazily."""

    ids: list[str]
    paths: list[Path]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> MaskedImage:
        if not 0 <= index < len(self.ids):
            raise IndexError(f"index {index} out of range for {len(self.ids)} masked images")
        path = self.paths[index]
        instances, background = self._load(index)
        _check_image_size(path, background.shape)
        return MaskedImage(
            id=self.ids[index], path=path, instances=canonical_instances(instances),
            background=torch.as_tensor(background, dtype=torch.bool),
        )

    @abstractmethod
    def _load(self, index: int) -> tuple[list[np.ndarray], np.ndarray]:
        """Instance masks (any order) and the background mask of item ``index``."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """Format and absolute file locations, for logs and manifests (a manifest made from
        another working directory still matches)."""


class CocoMaskSource(MaskSource):
    """A COCO instances file plus its image folder.

    Args:
        annotations: the instances JSON (``images``, ``annotations`` keys).
        images: folder that ``file_name`` entries are relative to.
        image_ids: restrict to these COCO image ids (None: every listed image).
    """

    def __init__(self, annotations: str | Path, images: str | Path, image_ids: Sequence[int] | None = None) -> None:
        self.annotations = Path(annotations)
        self.images = Path(images)
        if not self.annotations.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.annotations}")
        if not self.images.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.images}")
        data = _read_coco(self.annotations)
        wanted = None if image_ids is None else set(int(i) for i in image_ids)
        entries = sorted(
            ((str(PurePosixPath(im["file_name"]).with_suffix("")), im) for im in data["images"]
             if wanted is None or int(im["id"]) in wanted),
            key=lambda pair: pair[0],
        )
        _require_unique([name for name, _ in entries], self.annotations)
        self.ids = [name for name, _ in entries]
        self.paths = [self.images / im["file_name"] for _, im in entries]
        self._meta = [im for _, im in entries]
        _require_files(self.paths, f"listed in {self.annotations}", self.images)
        self._annotations: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for annotation in data["annotations"]:
            self._annotations[int(annotation["image_id"])].append(annotation)

    def _load(self, index: int) -> tuple[list[np.ndarray], np.ndarray]:
        meta = self._meta[index]
        height, width = int(meta["height"]), int(meta["width"])
        objects, crowd = [], np.zeros((height, width), dtype=bool)
        for annotation in self._annotations.get(int(meta["id"]), []):
            try:
                mask = decode_coco_segmentation(annotation["segmentation"], height, width)
            except (KeyError, ValueError) as error:
                raise ValueError(f"{self.annotations}: annotation {annotation.get('id')} of "
                                 f"{meta['file_name']}: {error}") from error
            if annotation.get("iscrowd", 0):
                crowd |= mask
            else:
                objects.append(mask)
        covered = np.logical_or.reduce(objects, axis=0) if objects else np.zeros_like(crowd)
        return objects, ~(covered | crowd)

    def describe(self) -> dict[str, str]:
        return {"format": "coco", "annotations": _absolute(self.annotations), "images": _absolute(self.images)}


class _LabelMapSource(MaskSource):
    """Shared by VOC and folder sources: one label PNG per image, matched by stem."""

    def __init__(self, images: str | Path, masks: str | Path, ids: Sequence[str] | None, mask_suffix: str,
                 ids_from_images: bool = False) -> None:
        """``ids``: the images to use; None: every mask's (or, with ``ids_from_images``, every image's)."""
        self.images = Path(images)
        self.masks = Path(masks)
        self.mask_suffix = mask_suffix
        for what, folder in (("image", self.images), ("mask", self.masks)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{type(self).__name__}: {what} folder not found: {folder}")
        listed = [(str(p.relative_to(self.images).with_suffix("")), p) for p in list_images(self.images)]
        by_stem = dict(listed)
        if ids is None and ids_from_images:
            ids = [stem for stem, _ in listed]  # a stem twice (a.png, a.jpg) is refused below
        elif ids is None:
            stems = (str(p.relative_to(self.masks).with_suffix("")) for p in self.masks.rglob(f"*{mask_suffix}.png"))
            ids = [stem[: len(stem) - len(mask_suffix)] for stem in stems]
        self.ids = sorted(ids)
        _require_unique(self.ids, self.masks)
        missing = [i for i in self.ids if i not in by_stem]
        if missing:
            raise FileNotFoundError(_missing_message(len(missing), len(self.ids), f"image(s) for masks in {self.masks}",
                                                     self.images, missing))
        self.paths = [by_stem[i] for i in self.ids]
        _require_files([self.mask_path(i) for i in range(len(self.ids))], "expected as masks", self.masks)

    def mask_path(self, index: int) -> Path:
        """The mask file of item ``index``."""
        return self.masks / f"{self.ids[index]}{self.mask_suffix}.png"


class VocMaskSource(_LabelMapSource):
    """VOC ``SegmentationObject``-style palette PNGs (index 0 background, 1..N instances).

    Args:
        images: folder of the images (``JPEGImages``).
        masks: folder of the object masks (``SegmentationObject``).
        image_set: optional list file of ids, one per line (``ImageSets/Segmentation/val.txt``);
            default: every mask in ``masks``.
        void_label: index ignored as neither object nor background (VOC's 255 border).
    """

    def __init__(self, images: str | Path, masks: str | Path, image_set: str | Path | None = None,
                 void_label: int | None = 255) -> None:
        ids = None
        if image_set is not None:
            image_set = Path(image_set)
            if not image_set.is_file():
                raise FileNotFoundError(f"VOC image set file not found: {image_set}")
            ids = [line.split()[0] for line in image_set.read_text().splitlines() if line.strip()]
        self.image_set = image_set
        self.void_label = void_label
        super().__init__(images, masks, ids, mask_suffix="")

    def _load(self, index: int) -> tuple[list[np.ndarray], np.ndarray]:
        path = self.mask_path(index)
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise ValueError(f"{path}: VOC object masks are palette (P) or index (L) PNGs, got mode {image.mode}")
            labels = np.asarray(image)
        ignore = () if self.void_label is None else (self.void_label,)
        return labels_to_instances(labels, ignore)

    def describe(self) -> dict[str, str]:
        return {"format": "voc", "images": _absolute(self.images), "masks": _absolute(self.masks),
                "image_set": _absolute(self.image_set) if self.image_set else ""}


class FolderMaskSource(_LabelMapSource):
    """A plain mask folder: ``masks/<stem><mask_suffix>.png`` for every image in ``images``.

    Grayscale / palette / 16-bit masks: each distinct non-zero value is an instance.
    RGB(A) masks: each distinct non-black colour is an instance. ``ignore_value`` (a
    gray value) is neither object nor background.
    """

    def __init__(self, images: str | Path, masks: str | Path, mask_suffix: str = "",
                 ignore_value: int | None = None) -> None:
        self.ignore_value = ignore_value
        super().__init__(images, masks, None, mask_suffix=mask_suffix, ids_from_images=True)

    def _load(self, index: int) -> tuple[list[np.ndarray], np.ndarray]:
        with Image.open(self.mask_path(index)) as image:
            if image.mode in ("RGB", "RGBA"):
                rgb = np.asarray(image.convert("RGB")).astype(np.int64)
                labels = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            else:
                labels = np.asarray(image if image.mode != "1" else image.convert("L")).astype(np.int64)
        ignore = () if self.ignore_value is None else (self.ignore_value,)
        return labels_to_instances(labels, ignore)

    def describe(self) -> dict[str, str]:
        return {"format": "folder", "images": _absolute(self.images), "masks": _absolute(self.masks),
                "mask_suffix": self.mask_suffix}


def _absolute(path: str | Path) -> str:
    return str(Path(path).resolve())


def _read_coco(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from error
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise ValueError(f"{path}: not a COCO instances file (needs 'images' and 'annotations')")
    return data


def _check_image_size(path: Path, mask_shape: tuple[int, ...]) -> None:
    """The masks must have the image's stored size (read from the header, no decode)."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    if (height, width) != tuple(mask_shape):
        raise ValueError(f"mask of {path} is {tuple(mask_shape)} (H, W) but the image is {(height, width)}")


def _require_unique(ids: Sequence[str], where: Path) -> None:
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{where}: image id(s) listed more than once: {repeated[:5]}")


def _require_files(paths: Sequence[Path], what: str, folder: Path) -> None:
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(_missing_message(len(missing), len(paths), f"file(s) {what}", folder, missing))


def _missing_message(count: int, total: int, what: str, folder: Path, names: Sequence[str]) -> str:
    return f"{count} of {total} {what} are missing from {folder}: {shorten(names)}"


__all__ = [
    "CocoMaskSource",
    "FolderMaskSource",
    "MaskSource",
    "MaskedImage",
    "VocMaskSource",
    "canonical_instances",
    "decode_coco_segmentation",
    "labels_to_instances",
]
