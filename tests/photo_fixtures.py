"""Photo-like test data with object masks, in the layout of the BSDS300 photos the suite is
also checked on, so a test reads either through the same paths.

:func:`write_photo_set` renders procedural scenes (:func:`datamodules.procedural.render_scene`:
an image and its instance mask) cropped to 3:2 landscape or 2:3 portrait, like BSDS300's
481 x 321 photographs, and writes, for each split (``train``, ``val``)::

    <root>/<split>/images/<id>.jpg      the photographs (JPEG)
    <root>/<split>/masks/<id>.png       VOC ``SegmentationObject`` form: palette PNG (mode P,
                                        VOC colour map), 0 = background, 1..N = one object
                                        instance each, no 255 void border
    <root>/<split>/annotations.json     the same regions as a COCO instances file: one
                                        category (``region``, id 1), one annotation per
                                        region, compressed RLE (``counts`` a string), bbox,
                                        area, ``iscrowd`` 0

which is what :class:`datamodules.synthetic.masks.VocMaskSource` (``images``, ``masks``) and
:class:`~datamodules.synthetic.masks.CocoMaskSource` (``annotations.json``, ``images``) read, and
what ``benchmarks/data_layout.py`` detects as a BSDS300-like root. Every image has a background
and at least two visible objects, so the COCO and VOC forms of an image decode to the same
several instances.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from datamodules.procedural import ProceduralScenes

SPLIT_SEEDS = {"train": 1, "val": 2}  # scene seeds of the procedural splits
LONG_SIDE = 72  # pixels; the short side is 2/3 of it (BSDS300: 481 x 321)
JPEG_QUALITY = 90


@dataclass(frozen=True)
class PhotoSet:
    """A folder of photographs with object masks in the layout above.

    ``counts``: images per split; ``picks``: eight ``val`` ids, sorted, that tests build small
    Segmix sets and mask checks from."""

    name: str
    root: Path
    counts: dict[str, int]
    picks: tuple[str, ...]

    def split(self, name: str) -> Path:
        """The folder of split ``name`` (``train`` or ``val``)."""
        return self.root / name


def write_photo_set(root: Path, counts: dict[str, int] | None = None) -> PhotoSet:
    """Write procedural photographs with masks under ``root`` (see the module docstring)."""
    counts = dict(counts or {"train": 12, "val": 30})
    for split, count in counts.items():
        _write_split(root / split, split, count)
    val_ids = sorted(p.stem for p in (root / "val" / "images").glob("*.jpg"))
    return PhotoSet("procedural", root, counts, tuple(val_ids[:8]))


def _write_split(folder: Path, split: str, count: int) -> None:
    """``count`` scenes of split ``split``: images, VOC masks, COCO annotations."""
    from pycocotools import mask as mask_utils  # C extension, as in datamodules.synthetic.masks

    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    scenes = ProceduralScenes(4 * count, size=LONG_SIDE, seed=SPLIT_SEEDS[split], num_objects=(2, 5))
    images, annotations = [], []
    for index in range(len(scenes)):
        if len(images) == count:
            break
        item = scenes[index]
        pixels, labels = _crop(item["image"], item["mask"], portrait=len(images) % 3 == 2)
        regions = [int(v) for v in np.unique(labels) if v != 0]
        if len(regions) < 2 or not (labels == 0).any():
            continue  # every photo: a background and several objects
        name = f"{split[0]}{len(images):03d}"
        Image.fromarray(pixels).save(folder / "images" / f"{name}.jpg", quality=JPEG_QUALITY)
        mask = Image.fromarray(labels, mode="P")
        mask.putpalette(voc_palette())
        mask.save(folder / "masks" / f"{name}.png")
        height, width = labels.shape
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": f"{name}.jpg", "height": height, "width": width})
        for value in regions:
            rle = mask_utils.encode(np.asfortranarray(labels == value, dtype=np.uint8))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
                "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            })
    if len(images) < count:
        raise RuntimeError(f"too few procedural scenes with two objects for {count} {split} images")
    categories = [{"id": 1, "name": "region", "supercategory": "region"}]
    (folder / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))


def _crop(image: Tensor, mask: Tensor, portrait: bool) -> tuple[np.ndarray, np.ndarray]:
    """The centre 2:3 (portrait) or 3:2 (landscape) part of a square scene, as uint8 arrays
    ((H, W, 3) pixels, (H, W) labels)."""
    short = LONG_SIDE * 2 // 3
    start = (LONG_SIDE - short) // 2
    window = (slice(None), slice(start, start + short)) if portrait else (slice(start, start + short), slice(None))
    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return np.ascontiguousarray(pixels[window]), np.ascontiguousarray(mask.numpy().astype(np.uint8)[window])


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (256 RGB entries, flattened): label bits spread over R, G, B."""
    palette = []
    for label in range(256):
        red = green = blue = 0
        value = label
        for shift in range(7, -1, -1):
            red |= (value & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette += [red, green, blue]
    return palette
