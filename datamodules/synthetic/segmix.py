"""Segmix (paper Sec. 4: MSCOCO Segmix, VOC Segmix): one object or the background of a
query, augmented and pasted into an image of a disjoint pool.

For every query, ``mixes_per_query`` synthetic images; each, from its own generator:

1. picks the **region**: with probability ``object_probability`` one object (uniformly
   among instances covering at least ``min_region_area`` of the image, in the mask
   source's canonical order), otherwise the background; when the wanted kind has no
   usable region the other kind is used (a query with neither is skipped, with a
   counted warning);
2. picks a **pool image**, resized to shorter side ``output_size`` and randomly cropped
   to a square canvas;
3. **object**: crops the object's box, resizes it so its longer side is a random
   fraction ``object_scale`` of the canvas, applies the photometric augmentations
   (:class:`RegionAugmentation`: colour jitter, autocontrast, solarize, Gaussian blur;
   kornia with explicit parameters) and a random horizontal flip, rotates it by up to
   ``max_rotation`` degrees and moves it to a random place where it fits (one kornia
   ``warp_affine`` of image and mask), then alpha-composites it with its own
   (resampled) mask onto the canvas;
   **background**: the whole query is resized to fit the canvas (longer side
   ``output_size``, random offset along the shorter side), augmented and flipped the
   same way, and composited through its background mask, so the pool image shows
   through where the query's objects (and void pixels) were, and in the letterbox
   bands. We chose this over inpainting the holes (no model needed; every visible pixel
   comes from exactly one of the two images) and over a square crop of the query (which
   can cut the background region away: BSDS "backgrounds" are often one band of sky).

Items record their region (``object:<k>`` in canonical order, or ``background``), pool
image, placement (boxes, scale, angle, flip) and augmentation parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.synthetic.builder import QueryOutput, RenderedItem, Skip, StageTimer, SyntheticBuilder
from datamodules.synthetic.datamodule import SyntheticRetrievalDataModule
from datamodules.synthetic.masks import CocoMaskSource, FolderMaskSource, MaskSource, VocMaskSource
from datamodules.synthetic.sampling import randint, random_square_resized, uniform
from datamodules.synthetic.sources import SourceRef, require_disjoint, split_sources
from lit.io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

MaskFormat = Literal["coco", "voc", "folder"]


@dataclass(frozen=True)
class RegionAugmentation:
    """The paper's region augmentations and their strengths. Each op is applied with its
    probability; every random number is drawn whether or not the op is applied, so the
    parameters of one op never shift those of another.

    Args:
        flip_probability: horizontal flip (applied to region and mask).
        jitter_probability: colour jitter; then brightness (additive shift in
            [-b, b]), contrast and saturation (factors in [1-c, 1+c]), hue (shift in
            [-h, h] of a full turn).
        autocontrast_probability: per-channel min-max stretch to [0, 1] (over the region's
            box: an object's own pixels and the surroundings inside its box).
        solarize_probability: invert pixels above a threshold drawn from ``solarize_threshold``.
        blur_probability: Gaussian blur with sigma (output pixels) from ``blur_sigma``.
    """

    flip_probability: float = 0.5
    jitter_probability: float = 0.8
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.05
    autocontrast_probability: float = 0.2
    solarize_probability: float = 0.1
    solarize_threshold: tuple[float, float] = (0.6, 0.9)
    blur_probability: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.5)

    def __post_init__(self) -> None:
        for name in ("flip_probability", "jitter_probability", "autocontrast_probability",
                     "solarize_probability", "blur_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation", "hue"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name, (low, high) in (("solarize_threshold", self.solarize_threshold), ("blur_sigma", self.blur_sigma)):
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be a range (low, high) with 0 <= low <= high, got {(low, high)}")

    def sample(self, generator: torch.Generator) -> dict[str, Any]:
        """Explicit parameters (JSON-able); ``None`` marks an op that is off."""
        on = {name: uniform(generator, 0.0, 1.0) < getattr(self, f"{name}_probability")
              for name in ("flip", "jitter", "autocontrast", "solarize", "blur")}
        jitter = {
            "brightness": uniform(generator, -self.brightness, self.brightness),
            "contrast": uniform(generator, 1 - self.contrast, 1 + self.contrast),
            "saturation": uniform(generator, 1 - self.saturation, 1 + self.saturation),
            "hue": uniform(generator, -self.hue, self.hue),
        }
        threshold = uniform(generator, *self.solarize_threshold)
        sigma = uniform(generator, *self.blur_sigma)
        return {
            "flip": on["flip"],
            "jitter": jitter if on["jitter"] else None,
            "autocontrast": on["autocontrast"],
            "solarize": threshold if on["solarize"] else None,
            "blur_sigma": sigma if on["blur"] else None,
        }

    @staticmethod
    def apply(image: Tensor, params: dict[str, Any]) -> Tensor:
        """Photometric part of ``params`` on a (B, 3, H, W) [0, 1] batch (the flip is geometric:
        callers apply it to image and mask together)."""
        jitter = params["jitter"]
        if jitter is not None:
            image = kornia.enhance.adjust_brightness(image, jitter["brightness"])
            image = kornia.enhance.adjust_contrast(image, jitter["contrast"])
            image = kornia.enhance.adjust_saturation(image, jitter["saturation"])
            image = kornia.enhance.adjust_hue(image, jitter["hue"] * 2 * math.pi).clamp(0, 1)
        if params["autocontrast"]:
            image = kornia.enhance.normalize_min_max(image, 0.0, 1.0)
        if params["solarize"] is not None:
            image = kornia.enhance.solarize(image, params["solarize"])
        if params["blur_sigma"] is not None:
            sigma = params["blur_sigma"]
            kernel = 2 * math.ceil(3 * sigma) + 1
            image = kornia.filters.gaussian_blur2d(image, (kernel, kernel), (sigma, sigma), border_type="replicate")
        return image.clamp(0, 1)


def source_refs(source: MaskSource) -> list[SourceRef]:
    """The images of a mask source as refs (id, path), row for row."""
    return [SourceRef(i, p) for i, p in zip(source.ids, source.paths)]


class SegmixBuilder(SyntheticBuilder):
    """Renders Segmix images (see the module docstring).

    Args:
        source: queries with their masks (rows ``query_rows`` of it).
        pool: paste targets, disjoint from the queries.
        query_rows: which items of ``source`` are queries (None: all).
        seed: seed of the whole set.
        mixes_per_query: synthetic images per query.
        object_probability: chance of pasting an object rather than the background.
        min_region_area: smallest usable region, as a fraction of the image area.
        object_scale: range of the pasted object's longer side, as a fraction of ``output_size``.
        max_rotation: objects rotate by a uniform angle in [-max_rotation, max_rotation] degrees.
        augmentation: photometric augmentation strengths.
        output_size: side of the square synthetic images.
        max_pixels: pool / query images larger than this are downscaled on load.
        strict: stop the build at the first unreadable query or pool image (default: skip the
            query / redraw the pool image, both recorded in the manifest).
    """

    kind = "segmix"

    def __init__(self, source: MaskSource, pool: list[SourceRef], query_rows: list[int] | None = None,
                 seed: int = 0, mixes_per_query: int = 2, object_probability: float = 0.5,
                 min_region_area: float = 0.02, object_scale: tuple[float, float] = (0.3, 0.8),
                 max_rotation: float = 15.0, augmentation: RegionAugmentation | None = None,
                 output_size: int = 256, max_pixels: int = DEFAULT_MAX_PIXELS, strict: bool = False) -> None:
        super().__init__(seed=seed, strict=strict)
        if mixes_per_query < 1:
            raise ValueError(f"mixes_per_query must be >= 1, got {mixes_per_query}")
        if not 0.0 <= object_probability <= 1.0:
            raise ValueError(f"object_probability must be in [0, 1], got {object_probability}")
        if not 0.0 <= min_region_area < 1.0:
            raise ValueError(f"min_region_area must be in [0, 1), got {min_region_area}")
        if not 0.0 < object_scale[0] <= object_scale[1] <= 1.0:
            raise ValueError(f"object_scale must satisfy 0 < low <= high <= 1, got {object_scale}")
        if output_size < 8:
            raise ValueError(f"output_size must be >= 8, got {output_size}")
        if not pool:
            raise ValueError("the Segmix pool (paste targets) is empty")
        self.source = source
        self.query_rows = list(range(len(source))) if query_rows is None else list(query_rows)
        refs = source_refs(source)
        self._queries = [refs[r] for r in self.query_rows]
        require_disjoint(self._queries, pool)
        self._pool = list(pool)
        self.mixes_per_query = mixes_per_query
        self.object_probability = object_probability
        self.min_region_area = min_region_area
        self.object_scale = (float(object_scale[0]), float(object_scale[1]))
        self.max_rotation = max_rotation
        self.augmentation = augmentation or RegionAugmentation()
        self.output_size = output_size
        self.max_pixels = max_pixels

    def parameters(self) -> dict[str, Any]:
        return {
            "source": self.source.describe(),
            "mixes_per_query": self.mixes_per_query, "object_probability": self.object_probability,
            "min_region_area": self.min_region_area, "object_scale": self.object_scale,
            "max_rotation": self.max_rotation, "augmentation": asdict(self.augmentation),
            "output_size": self.output_size, "max_pixels": self.max_pixels, "bad_pool_image": "redraw",
        }

    def queries(self) -> list[SourceRef]:
        return self._queries

    def pool(self) -> list[SourceRef]:
        return self._pool

    def render_query(self, row: int, timer: StageTimer) -> QueryOutput:
        with timer("decode"):
            item = self.source[self.query_rows[row]]
            try:
                image = load_image(item.path, strict=True, max_pixels=self.max_pixels)
            except ImageLoadError as error:
                return self.unreadable(error)
        assert image is not None
        if tuple(image.shape[-2:]) != item.size:
            return Skip(f"image {item.path} loads as {tuple(image.shape[-2:])} but its masks are {item.size} "
                        "(EXIF rotation or max_pixels downscaling)")
        min_pixels = self.min_region_area * item.size[0] * item.size[1]
        objects = [k for k, area in enumerate(item.areas) if area >= max(1.0, min_pixels)]
        background_ok = item.background_area >= max(1.0, min_pixels)
        if not objects and not background_ok:
            return Skip(f"no object or background covers min_region_area={self.min_region_area} of the image")
        try:
            return [self._mix(item.id, mix, image, item.instances, item.background, objects, background_ok, timer)
                    for mix in range(self.mixes_per_query)]
        except ImageLoadError as error:  # strict, or a pool with no readable image at all
            return self.unreadable(error)

    def _mix(self, query_id: str, mix: int, image: Tensor, instances: list[Tensor], background: Tensor,
             objects: list[int], background_ok: bool, timer: StageTimer) -> RenderedItem:
        generator = self.generator(query_id, mix)
        want_object = uniform(generator, 0.0, 1.0) < self.object_probability
        pick = randint(generator, max(1, len(objects)))
        use_object = bool(objects) and (want_object or not background_ok)
        pool_row = randint(generator, len(self._pool))
        params = self.augmentation.sample(generator)
        with timer("decode"):
            pool_image, pool_row, replaced = self.load_pool_image(pool_row, self.max_pixels, query_id, mix)
        with timer("resize"):
            canvas, pool_box = random_square_resized(pool_image, self.output_size, generator)
        provenance: dict[str, Any] = {"pool_id": self._pool[pool_row].id, "pool_box": pool_box,
                                      "augmentation": params}
        if replaced:
            provenance["replaced_pool"] = replaced
        if use_object:
            k = objects[pick]
            result, placement = self._paste_object(image, instances[k], canvas, params, generator, timer)
            provenance.update(region=f"object:{k}", placement=placement)
        else:
            result, placement = self._paste_background(image, background, canvas, params, generator, timer)
            provenance.update(region="background", placement=placement)
        return RenderedItem(result, provenance)

    def _paste_object(self, image: Tensor, mask: Tensor, canvas: Tensor, params: dict[str, Any],
                      generator: torch.Generator, timer: StageTimer) -> tuple[Tensor, dict[str, Any]]:
        size = self.output_size
        fraction = uniform(generator, *self.object_scale)
        angle = uniform(generator, -self.max_rotation, self.max_rotation)
        place_x, place_y = uniform(generator, 0.0, 1.0), uniform(generator, 0.0, 1.0)
        with timer("augment"):
            box = _box_of(mask)
            assert box is not None  # only objects with area >= 1 are pasted
            x0, y0, x1, y1 = box
            scale = fraction * size / max(y1 - y0, x1 - x0)
            crop = torch.cat([image[:, y0:y1, x0:x1], mask[None, y0:y1, x0:x1].float()])
            height, width = max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale))
            crop = F.interpolate(crop[None], size=(height, width), mode="bilinear", antialias=True,
                                 align_corners=False).clamp(0, 1)
            region = self.augmentation.apply(crop[:, :3], params)
            region = torch.cat([region, crop[:, 3:]], dim=1)
            if params["flip"]:
                region = kornia.geometry.transform.hflip(region)
        with timer("composite"):
            theta = math.radians(angle)
            extent_x = width * abs(math.cos(theta)) + height * abs(math.sin(theta))
            extent_y = width * abs(math.sin(theta)) + height * abs(math.cos(theta))
            center_x = _place(place_x, extent_x, size)
            center_y = _place(place_y, extent_y, size)
            source_center = torch.tensor([[(width - 1) / 2, (height - 1) / 2]])
            matrix = kornia.geometry.transform.get_rotation_matrix2d(
                source_center, torch.tensor([angle]), torch.ones(1, 2))
            matrix[:, 0, 2] += center_x - source_center[0, 0]
            matrix[:, 1, 2] += center_y - source_center[0, 1]
            warped = kornia.geometry.transform.warp_affine(region, matrix, (size, size), align_corners=True)[0]
            alpha = warped[3:].clamp(0, 1)
            result = alpha * warped[:3] + (1 - alpha) * canvas
        placement = {"source_box": [x0, y0, x1, y1], "scale": scale, "angle": angle,
                     "center": [center_x, center_y], "box": _box_of(alpha[0] >= _VISIBLE_ALPHA)}
        return result, placement

    def _paste_background(self, image: Tensor, background: Tensor, canvas: Tensor, params: dict[str, Any],
                          generator: torch.Generator, timer: StageTimer) -> tuple[Tensor, dict[str, Any]]:
        """The whole query, fitted inside the canvas (longer side = ``output_size``) at a random
        offset along its shorter side, composited through its background mask: the pool shows
        through the query's object holes and the letterbox bands. (A square crop could cut the
        background region away entirely.)"""
        size = self.output_size
        source_height, source_width = image.shape[-2:]
        scale = size / max(source_height, source_width)
        height = min(size, max(1, round(source_height * scale)))
        width = min(size, max(1, round(source_width * scale)))
        top, left = randint(generator, size - height + 1), randint(generator, size - width + 1)
        with timer("augment"):
            stacked = torch.cat([image, background[None].float()])[None]
            resized = F.interpolate(stacked, size=(height, width), mode="bilinear", antialias=True,
                                    align_corners=False).clamp(0, 1)
            region = torch.cat([self.augmentation.apply(resized[:, :3], params), resized[:, 3:]], dim=1)
            if params["flip"]:
                region = kornia.geometry.transform.hflip(region)
        with timer("composite"):
            result = canvas.clone()
            window = result[:, top:top + height, left:left + width]
            alpha = region[0, 3:]
            result[:, top:top + height, left:left + width] = alpha * region[0, :3] + (1 - alpha) * window
        return result, {"source_box": [0, 0, int(source_width), int(source_height)], "scale": scale,
                        "box": [left, top, left + width, top + height]}


_VISIBLE_ALPHA = 1 / 512
"""Alpha below which a pasted pixel cannot change the uint8 output: the recorded ``box``
holds every pixel at or above it, so pixels outside it are the pool's."""


def _place(u: float, extent: float, size: int) -> float:
    """Centre coordinate for a draw ``u`` in [0, 1) so that ``extent`` pixels fit in ``size``
    (centred when they do not)."""
    half = extent / 2
    if extent >= size:
        return (size - 1) / 2
    return half - 0.5 + u * (size - extent)


def _box_of(mask: Tensor) -> list[int] | None:
    """[x0, y0, x1, y1] (exclusive) of a bool mask, None when empty (numpy row/column
    reductions: much cheaper than ``torch.nonzero`` on large masks)."""
    array = mask.numpy()
    rows, columns = np.flatnonzero(array.any(axis=1)), np.flatnonzero(array.any(axis=0))
    if rows.size == 0:
        return None
    return [int(columns[0]), int(rows[0]), int(columns[-1]) + 1, int(rows[-1]) + 1]


def mask_source(root: str | Path, mask_format: MaskFormat, images: str = "images", masks: str = "masks",
                annotations: str = "annotations.json", image_set: str | None = None) -> MaskSource:
    """A mask source from a dataset root and paths relative to it (absolute paths also work)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    if mask_format == "coco":
        return CocoMaskSource(root / annotations, root / images)
    if mask_format == "voc":
        return VocMaskSource(root / images, root / masks, None if image_set is None else root / image_set)
    if mask_format == "folder":
        return FolderMaskSource(root / images, root / masks)
    raise ValueError(f"mask_format must be 'coco', 'voc' or 'folder', got {mask_format!r}")


class SegmixDataModule(SyntheticRetrievalDataModule):
    """Segmix copy detection: queries are source images, the gallery their Segmix mixes.

    Args:
        root: dataset root; ``images``, ``masks``, ``annotations`` and ``image_set`` are
            relative to it (e.g. VOC2012 with ``JPEGImages`` / ``SegmentationObject``).
        mask_format: ``coco`` (instances JSON), ``voc`` (palette PNGs) or ``folder``.
        images: image folder.
        masks: mask folder (voc, folder).
        annotations: COCO instances JSON (coco).
        image_set: VOC list file of ids (voc; default: every mask).
        pool: folder of paste-target images; default: a seeded ``pool_fraction`` of the
            source images, disjoint from the queries.
        num_queries: number of queries (None: every non-pool source image).
        pool_fraction: share of the source images used as pool when ``pool`` is not given.
        output_dir: where the set is written (reused while its manifest matches).
        seed: seed of the split and of every mix.
        mixes_per_query, object_probability, min_region_area, object_scale, max_rotation,
        augmentation, output_size: see :class:`SegmixBuilder`.
        distractors, num_distractors, progress, build_workers, max_pixels, batch_size, num_workers, strict:
            see :class:`~datamodules.synthetic.datamodule.SyntheticRetrievalDataModule`.
    """

    def __init__(self, root: str, mask_format: MaskFormat = "voc", images: str = "images", masks: str = "masks",
                 annotations: str = "annotations.json", image_set: str | None = None, pool: str | None = None,
                 num_queries: int | None = None, pool_fraction: float = 0.5,
                 output_dir: str = "synthetic/segmix", seed: int = 0, mixes_per_query: int = 2,
                 object_probability: float = 0.5, min_region_area: float = 0.02,
                 object_scale: tuple[float, float] = (0.3, 0.8), max_rotation: float = 15.0,
                 augmentation: RegionAugmentation = RegionAugmentation(),  # noqa: B008 - frozen dataclass
                 output_size: int = 256, distractors: str | None = None, num_distractors: int | None = None,
                 progress: bool = True, build_workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 batch_size: int = 32, num_workers: int = 0, strict: bool = False) -> None:
        super().__init__(output_dir=output_dir,
                         distractors=distractors, num_distractors=num_distractors, progress=progress,
                         build_workers=build_workers, max_pixels=max_pixels, batch_size=batch_size,
                         num_workers=num_workers, strict=strict)
        self.root = root
        self.mask_format = mask_format
        self.paths = {"images": images, "masks": masks, "annotations": annotations, "image_set": image_set}
        self.pool_dir = pool
        self.num_queries = num_queries
        self.pool_fraction = pool_fraction
        self.seed = seed
        self.builder_args = {"mixes_per_query": mixes_per_query, "object_probability": object_probability,
                             "min_region_area": min_region_area, "object_scale": tuple(object_scale),
                             "max_rotation": max_rotation, "augmentation": augmentation,
                             "output_size": output_size}

    @property
    def name(self) -> str:
        """Table 1 column: "COCO Segmix" / "VOC Segmix" by mask source (the paper's MSCOCO and
        VOC Segmix are different columns), plain "Segmix" for an image+mask folder."""
        return {"coco": "COCO Segmix", "voc": "VOC Segmix"}.get(self.mask_format, "Segmix")

    def make_builder(self) -> SegmixBuilder:
        source = mask_source(self.root, self.mask_format, **self.paths)
        query_rows, pool = split_sources(source_refs(source), self.seed, self.num_queries, self.pool_fraction,
                                         self.pool_dir)
        return SegmixBuilder(source, pool, query_rows, seed=self.seed, max_pixels=self.max_pixels,
                             strict=self.strict, **self.builder_args)


__all__ = ["MaskFormat", "RegionAugmentation", "SegmixBuilder", "SegmixDataModule", "mask_source"]
