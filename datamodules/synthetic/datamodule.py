"""Reading a synthetic set back: the base datamodule of the synthetic sets.

:class:`SyntheticRetrievalDataModule` builds in ``prepare_data`` (global rank 0 only under
DDP; :func:`~datamodules.synthetic.build.build_synthetic`) and turns the manifest into a
:class:`~datamodules.retrieval.RetrievalSet` (:func:`manifest_to_retrieval_set`): queries =
source images, gallery = synthetic images (then optional distractors), positives of a
query = the synthetic images made from it. Skipped queries (no usable content) are left
out, since every query needs a positive; they are counted in
:attr:`RetrievalSet.skipped_queries`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_warn

from datamodules.retrieval import ImageFileDataset, RetrievalDataModule, RetrievalSet
from datamodules.synthetic.build import BuildReport, build_synthetic
from datamodules.synthetic.builder import SyntheticBuilder
from datamodules.synthetic.manifest import MANIFEST, manifest_matches, read_manifest
from datamodules.synthetic.sources import SourceRef
from lit.distributed import world_size
from lit.io import DEFAULT_MAX_PIXELS, list_images


class SyntheticRetrievalDataModule(RetrievalDataModule):
    """Base of the synthetic-set datamodules: subclasses implement :meth:`make_builder`.

    Args:
        output_dir: folder of the built set (images + ``manifest.json``).
        distractors: optional folder of extra gallery images (no query's positives).
        num_distractors: use only the first N distractors (sorted; None: all).
        progress: show a progress bar while building.
        build_workers: processes that render while building (0: in the main process).
        max_pixels: query / distractor images larger than this are downscaled on load.
        batch_size: images per batch for both loaders.
        num_workers: dataloader worker processes.
        strict: stop at the first unreadable file (query, pool image, distractor) with an error
            naming it; default: skip it and count it (queries) or redraw (pool images).
    """

    def __init__(self, output_dir: str, *, distractors: str | None = None, num_distractors: int | None = None,
                 progress: bool = True, build_workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 batch_size: int = 32, num_workers: int = 0, strict: bool = False) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, strict=strict)
        if build_workers < 0:
            raise ValueError(f"build_workers must be >= 0, got {build_workers}")
        self.build_workers = build_workers
        if num_distractors is not None and num_distractors < 0:
            raise ValueError(f"num_distractors must be >= 0 or null, got {num_distractors}")
        self.output_dir = Path(output_dir)
        self.distractors = distractors
        self.num_distractors = num_distractors
        self.progress = progress
        self.max_pixels = max_pixels
        self.prepare_data_per_node = False  # one writer per (shared) output folder
        self._builder: SyntheticBuilder | None = None
        self.build_report: BuildReport | None = None

    @abstractmethod
    def make_builder(self) -> SyntheticBuilder:
        """The builder of this set (constructed once, lazily)."""

    @property
    def builder(self) -> SyntheticBuilder:
        if self._builder is None:
            self._builder = self.make_builder()
            self._builder.strict = self.strict
        return self._builder

    def prepare_data(self) -> None:
        """Build or reuse the set on disk (Lightning calls this on global rank 0 only)."""
        self.build_report = build_synthetic(self.builder, self.output_dir, progress=self.progress,
                                            num_workers=self.build_workers)

    def build(self) -> RetrievalSet:
        if self.build_report is not None:  # prepared in this process: its manifest is current
            manifest = self.build_report.manifest
        else:
            manifest = read_manifest(self.output_dir)
            if manifest is None or not manifest_matches(manifest, self.builder.header()):
                if world_size() > 1:
                    raise RuntimeError(f"no matching synthetic set in {self.output_dir}: prepare_data() on rank 0 "
                                       "should have built it (is output_dir on storage shared by all nodes?)")
                self.prepare_data()
                assert self.build_report is not None
                manifest = self.build_report.manifest
        return manifest_to_retrieval_set(manifest, self.builder.queries(), self.output_dir,
                                         self._distractor_paths(), self.max_pixels, self.strict)

    def _distractor_paths(self) -> list[Path]:
        if self.distractors is None:
            return []
        paths = list_images(self.distractors)  # warns about entries that are not image files
        return paths if self.num_distractors is None else paths[: self.num_distractors]


def manifest_to_retrieval_set(manifest: dict[str, Any], queries: Sequence[SourceRef], root: Path,
                              distractors: Sequence[Path] = (), max_pixels: int = DEFAULT_MAX_PIXELS,
                              strict: bool = False) -> RetrievalSet:
    """Queries = source images with at least one item; gallery = items (manifest order) then
    ``distractors``; positives = the gallery rows of a query's items. The manifest's skipped
    queries and replaced pool images become ``skipped_queries`` / ``skipped_sources``."""
    if [ref.id for ref in queries] != manifest["query_ids"]:
        raise ValueError(f"{root / MANIFEST} was built for other query images")
    rows_of_query: dict[int, list[int]] = defaultdict(list)
    for gallery_row, item in enumerate(manifest["items"]):
        rows_of_query[int(item["query"])].append(gallery_row)
    if not rows_of_query:
        raise ValueError(f"synthetic set {root} has no items (all {len(queries)} queries were skipped)")
    query_rows = sorted(rows_of_query)
    query_paths = {ref.path.resolve() for ref in (queries[r] for r in query_rows)}
    if clash := [p for p in distractors if Path(p).resolve() in query_paths]:
        raise ValueError(f"{len(clash)} distractor(s) are query images (e.g. {clash[0]}); distractors must "
                         "be unrelated to the queries")
    if manifest["skipped"]:
        rank_zero_warn(f"{len(manifest['skipped'])} query image(s) of {root} have no synthetic item and are "
                       "not queries (see 'skipped' in its manifest)")
    gallery = [root / item["file"] for item in manifest["items"]] + [Path(p) for p in distractors]
    replaced = {bad["pool_id"]: bad["reason"] for item in manifest["items"] for bad in item.get("replaced_pool", [])}
    return RetrievalSet(
        queries=ImageFileDataset([queries[r].path for r in query_rows], max_pixels, strict),
        gallery=ImageFileDataset(gallery, max_pixels, strict),
        positives=[rows_of_query[r] for r in query_rows],
        skipped_queries={str(queries[s["query"]].path): s["reason"] for s in manifest["skipped"]},
        skipped_sources={f"pool image {pool_id}": reason for pool_id, reason in replaced.items()},
    )


__all__ = ["SyntheticRetrievalDataModule", "manifest_to_retrieval_set"]
