"""Cutmix copy detection (the paper's IN-Cutmix): a random square patch of a query pasted
at a random place in an image of a disjoint pool.

Each synthetic image, from its own generator (see ``datamodules.synthetic.builder``):

1. a patch side ``s = round(f * output_size)`` with ``f`` uniform in ``patch_fraction``;
2. a random square of the query at the scale where its shorter side is ``output_size``
   (side ``s / scale`` in the query's own pixels), resampled to ``s`` x ``s``;
3. a pool image: its largest square at a random place, resized to the canvas;
4. a random top-left corner where the patch fits entirely, and the paste.

No photometric augmentation: the copy is the patch as it is. Items record the query box
(query pixels), the pool image and its box, and the pasted box (output pixels).

An unreadable query skips that query (counted with its reason); an unreadable pool image
is replaced by a seeded redraw (:meth:`~datamodules.synthetic.builder.SyntheticBuilder.load_pool_image`,
recorded in the item as ``replaced_pool``), so one bad pool file never costs a readable
query. ``strict`` stops at the first unreadable file instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from datamodules.synthetic.builder import QueryOutput, RenderedItem, StageTimer, SyntheticBuilder
from datamodules.synthetic.datamodule import SyntheticRetrievalDataModule
from datamodules.synthetic.sampling import randint, random_square, random_square_resized, uniform
from datamodules.synthetic.sources import SourceRef, folder_refs, require_disjoint, split_sources
from lit.io import DEFAULT_MAX_PIXELS, ImageLoadError, load_image


class CutmixBuilder(SyntheticBuilder):
    """Renders Cutmix images (see the module docstring).

    Args:
        queries: source images, one row each.
        pool: paste targets, disjoint from the queries.
        seed: seed of the whole set.
        mixes_per_query: synthetic images per query.
        patch_fraction: range of the patch side, as a fraction of ``output_size``.
        output_size: side of the square synthetic images.
        max_pixels: images larger than this are downscaled on load.
        strict: stop the build at the first unreadable query or pool image.
    """

    kind = "cutmix"

    def __init__(self, queries: list[SourceRef], pool: list[SourceRef], seed: int = 0, mixes_per_query: int = 1,
                 patch_fraction: tuple[float, float] = (0.3, 0.6), output_size: int = 256,
                 max_pixels: int = DEFAULT_MAX_PIXELS, strict: bool = False) -> None:
        super().__init__(seed=seed, strict=strict)
        if mixes_per_query < 1:
            raise ValueError(f"mixes_per_query must be >= 1, got {mixes_per_query}")
        if not 0.0 < patch_fraction[0] <= patch_fraction[1] <= 1.0:
            raise ValueError(f"patch_fraction must satisfy 0 < low <= high <= 1, got {patch_fraction}")
        if output_size < 8:
            raise ValueError(f"output_size must be >= 8, got {output_size}")
        if not queries or not pool:
            raise ValueError(f"Cutmix needs queries and a pool, got {len(queries)} and {len(pool)} images")
        require_disjoint(queries, pool)
        self._queries = list(queries)
        self._pool = list(pool)
        self.mixes_per_query = mixes_per_query
        self.patch_fraction = (float(patch_fraction[0]), float(patch_fraction[1]))
        self.output_size = output_size
        self.max_pixels = max_pixels

    def parameters(self) -> dict[str, Any]:
        return {"mixes_per_query": self.mixes_per_query, "patch_fraction": self.patch_fraction,
                "output_size": self.output_size, "max_pixels": self.max_pixels, "bad_pool_image": "redraw"}

    def queries(self) -> list[SourceRef]:
        return self._queries

    def pool(self) -> list[SourceRef]:
        return self._pool

    def render_query(self, row: int, timer: StageTimer) -> QueryOutput:
        ref = self._queries[row]
        try:  # an unreadable query skips it (counted in the manifest); a bad pool image is redrawn
            with timer("decode"):
                image = load_image(ref.path, strict=True, max_pixels=self.max_pixels)
            assert image is not None
            return [self._mix(ref.id, mix, image, timer) for mix in range(self.mixes_per_query)]
        except ImageLoadError as error:  # the query, a strict pool failure, or a pool with no readable image
            return self.unreadable(error)

    def _mix(self, query_id: str, mix: int, image: Tensor, timer: StageTimer) -> RenderedItem:
        generator = self.generator(query_id, mix)
        size = self.output_size
        fraction = uniform(generator, *self.patch_fraction)
        side = max(1, round(fraction * size))
        scale = size / min(image.shape[-2:])
        source_side = max(1, min(round(side / scale), min(image.shape[-2:])))
        sy, sx = random_square(tuple(image.shape[-2:]), source_side, generator)
        with timer("decode"):
            pool_image, pool_row, replaced = self.load_pool_image(randint(generator, len(self._pool)),
                                                                  self.max_pixels, query_id, mix)
        with timer("resize"):
            canvas, pool_box = random_square_resized(pool_image, size, generator)
        with timer("augment"):
            patch = image[:, sy:sy + source_side, sx:sx + source_side]
            if source_side != side:
                patch = F.interpolate(patch[None], size=(side, side), mode="bilinear", antialias=True,
                                      align_corners=False)[0].clamp(0, 1)
        ty, tx = random_square((size, size), side, generator)
        with timer("composite"):
            result = canvas.clone()
            result[:, ty:ty + side, tx:tx + side] = patch
        provenance: dict[str, Any] = {
            "pool_id": self._pool[pool_row].id, "pool_box": pool_box, "region": "patch",
            "placement": {"source_box": [sx, sy, sx + source_side, sy + source_side], "patch_fraction": fraction,
                          "box": [tx, ty, tx + side, ty + side]},
            "augmentation": {},
        }
        if replaced:
            provenance["replaced_pool"] = replaced
        return RenderedItem(result, provenance)


class CutmixDataModule(SyntheticRetrievalDataModule):
    """Cutmix copy detection: queries are source images, the gallery their Cutmix pastes.

    Args:
        root: folder of source images (listed recursively).
        pool: folder of paste-target images; default: a seeded ``pool_fraction`` of
            ``root``, disjoint from the queries.
        num_queries: number of queries (None: every non-pool image).
        pool_fraction: share of ``root`` used as pool when ``pool`` is not given.
        output_dir: where the set is written (reused while its manifest matches).
        seed: seed of the split and of every paste.
        mixes_per_query, patch_fraction, output_size: see :class:`CutmixBuilder`.
        distractors, num_distractors, progress, build_workers, max_pixels, batch_size, num_workers, strict:
            see :class:`~datamodules.synthetic.datamodule.SyntheticRetrievalDataModule`.
    """

    def __init__(self, root: str, pool: str | None = None, num_queries: int | None = None,
                 pool_fraction: float = 0.5, output_dir: str = "synthetic/cutmix", seed: int = 0,
                 mixes_per_query: int = 1, patch_fraction: tuple[float, float] = (0.3, 0.6),
                 output_size: int = 256, distractors: str | None = None, num_distractors: int | None = None,
                 progress: bool = True, build_workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 batch_size: int = 32, num_workers: int = 0, strict: bool = False) -> None:
        super().__init__(output_dir=output_dir,
                         distractors=distractors, num_distractors=num_distractors, progress=progress,
                         build_workers=build_workers, max_pixels=max_pixels, batch_size=batch_size,
                         num_workers=num_workers, strict=strict)
        self.root = root
        self.pool_dir = pool
        self.num_queries = num_queries
        self.pool_fraction = pool_fraction
        self.seed = seed
        self.mixes_per_query = mixes_per_query
        self.patch_fraction = (float(patch_fraction[0]), float(patch_fraction[1]))
        self.output_size = output_size

    def make_builder(self) -> CutmixBuilder:
        sources = folder_refs(Path(self.root))
        if not sources:
            raise ValueError(f"no images found under {self.root}")
        query_rows, pool = split_sources(sources, self.seed, self.num_queries, self.pool_fraction, self.pool_dir)
        return CutmixBuilder([sources[r] for r in query_rows], pool, seed=self.seed,
                             mixes_per_query=self.mixes_per_query, patch_fraction=self.patch_fraction,
                             output_size=self.output_size, max_pixels=self.max_pixels, strict=self.strict)


__all__ = ["CutmixBuilder", "CutmixDataModule"]
