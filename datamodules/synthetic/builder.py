"""The builder contract: what a synthetic-set kind (Segmix, Cutmix, outpainting, ...)
implements, and the types it hands to the build engine (:mod:`datamodules.synthetic.build`).

A *builder* (:class:`SyntheticBuilder`) knows how to turn query ``row`` into zero or more
synthetic images. Every random draw of item ``(query id, mix)`` comes from its own
``torch.Generator`` seeded with :func:`~lit.seeding.derive_seed` ``(seed, kind, query id, mix)``
(:meth:`SyntheticBuilder.generator`), and augmentations are called with explicit
parameters, so a seed gives the same pixels in any process, on any DDP rank, whatever
order or batching the queries are rendered in. An unreadable query is a :class:`Skip`;
an unreadable pool image is replaced by a seeded redraw
(:meth:`SyntheticBuilder.load_pool_image`); with ``strict`` the build stops at the first
unreadable file instead.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from datamodules.synthetic.manifest import FORMAT_VERSION, PNG_COMPRESS_LEVEL, jsonable
from datamodules.synthetic.sampling import randint
from datamodules.synthetic.sources import SourceRef
from lit.io import ImageLoadError, load_image
from lit.seeding import derive_seed


@dataclass
class RenderedItem:
    """One synthetic image, (3, S, S) float in [0, 1], and its JSON-able provenance."""

    image: Tensor
    provenance: dict[str, Any]


@dataclass(frozen=True)
class Skip:
    """A query that gave no synthetic image, and why. ``fatal``: an unreadable file under
    ``strict``, which stops the build (raised in the main process, one line)."""

    reason: str
    fatal: bool = False


QueryOutput = list[RenderedItem] | Skip


@dataclass
class StageTimer:
    """Accumulates wall-clock seconds per named stage (``with timer("decode"): ...``)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


class SyntheticBuilder(ABC):
    """Renders the synthetic images of query rows; subclasses set ``kind`` and implement
    :meth:`parameters`, :meth:`queries` and :meth:`render_query` (or :meth:`render` for
    batched renderers such as diffusion, with ``batch_size`` > 1)."""

    kind: ClassVar[str]

    def __init__(self, seed: int, *, batch_size: int = 1, strict: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.seed = int(seed)
        self.batch_size = batch_size
        self.strict = strict
        self._bad_pool: dict[int, str] = {}  # pool row -> why it cannot be read (per process)

    @abstractmethod
    def parameters(self) -> dict[str, Any]:
        """JSON-able parameters that determine the pixels (a change triggers a rebuild)."""

    @abstractmethod
    def queries(self) -> list[SourceRef]:
        """Candidate query images, in row order."""

    def pool(self) -> list[SourceRef]:
        """Images that backgrounds / paste targets come from (none by default)."""
        return []

    def render_query(self, row: int, timer: StageTimer) -> QueryOutput:
        """Synthetic images of query ``row`` (or a :class:`Skip`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement render_query() or render()")

    def render(self, rows: Sequence[int], timer: StageTimer) -> list[QueryOutput]:
        """Outputs of several query rows (default: one :meth:`render_query` call each)."""
        return [self.render_query(row, timer) for row in rows]

    def unreadable(self, error: ImageLoadError) -> Skip:
        """The skip for an unreadable query / pool file: fatal (stops the build) under ``strict``."""
        return Skip(str(error), fatal=self.strict)

    def load_pool_image(self, first_row: int, max_pixels: int, *redraw_parts: int | str,
                        ) -> tuple[Tensor, int, list[dict[str, str]]]:
        """Pool image ``first_row``, or, when it cannot be read, a seeded redraw among the pool
        rows not tried yet (generator ``(seed, kind, *redraw_parts, "pool-redraw")``, so a bad
        file changes only the canvas of the items that drew it, the same way in any process).
        Returns (image, the row used, [{"pool_id", "reason"}] of each unreadable draw).
        Under ``strict`` the first unreadable pool file raises :class:`ImageLoadError`."""
        pool = self.pool()
        row, tried, replaced = first_row, {first_row}, []
        redraw: torch.Generator | None = None
        while True:
            reason = self._bad_pool.get(row)
            if reason is None:
                try:
                    image = load_image(pool[row].path, strict=True, max_pixels=max_pixels)
                    assert image is not None
                    return image, row, replaced
                except ImageLoadError as error:
                    if self.strict:
                        raise
                    reason = self._bad_pool[row] = str(error)
            elif self.strict:
                raise ImageLoadError(reason)
            replaced.append({"pool_id": pool[row].id, "reason": reason})
            left = [r for r in range(len(pool)) if r not in tried]
            if not left:
                raise ImageLoadError(f"none of the {len(pool)} pool images can be read "
                                     f"(first: {replaced[0]['reason']})")
            if redraw is None:
                redraw = self.generator(*redraw_parts, "pool-redraw")
            row = left[randint(redraw, len(left))]
            tried.add(row)

    def generator(self, *parts: int | str) -> torch.Generator:
        """A CPU generator seeded from ``(seed, kind, *parts)``: e.g. ``(query id, mix)``."""
        return torch.Generator().manual_seed(derive_seed(self.seed, self.kind, *parts))

    def header(self) -> dict[str, Any]:
        """What a manifest must match to be reused."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "seed": self.seed,
            "png_compress_level": PNG_COMPRESS_LEVEL,
            "parameters": jsonable(self.parameters()),
            "query_ids": [ref.id for ref in self.queries()],
            "pool_ids": [ref.id for ref in self.pool()],
        }


__all__ = ["QueryOutput", "RenderedItem", "Skip", "StageTimer", "SyntheticBuilder"]
