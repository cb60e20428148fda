"""``lit test`` for copy detection: embed queries and gallery, search, score, report.

The datamodule (a :class:`datamodules.retrieval.RetrievalDataModule`) yields two
test loaders, queries then gallery, whose samples carry a global ``index``.
Every test batch goes through the suite's one embedding path (:mod:`lit.embedding`:
an ``Embedder``, bfloat16 autocast on CUDA per ``precision``, float32 on the CPU) into
a ``FeatureBuffer`` per loader. Under DDP every rank embeds a (padded) shard of each;
the gallery is gathered and deduplicated by index on every rank
(``FeatureBuffer.gather``), each rank searches its own queries, and
:class:`lit.metrics.RetrievalMetrics` gathers, deduplicates and scores, so 1 and N
processes report the same numbers.

The metrics are logged with ``self.log`` (``mAP``, ``MRR``, ``recall@k``,
``hit_rate@k``, ``precision@k``), so ``trainer.test()`` returns them and callbacks
can read them; ``metrics.json`` records what was measured (the descriptor's
:meth:`models.descriptor_config.DescriptorConfig.record`: name, weights file and
SHA-256, random init, input size, the similarity the features' kind implies, normalisation).
The grid of
retrievals shows the first ``grid_queries`` kept queries (by index) for any
number of processes. Report files already in the log folder that this module did
not write are never overwritten (one-line :class:`lit.errors.UserError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from lit.distributed import all_gather_objects, gather_by_index
from lit.embedding import Embedder, FeatureBuffer, Precision, step_precision
from lit.errors import UserError
from lit.files import write_json, write_text_atomic
from lit.grids import retrieval_grid, save_png
from lit.metrics import RetrievalMetrics
from lit.report import metrics_markdown
from lit.retrieval_scoring import score_queries
from models.descriptor_config import DescriptorConfig

QUERIES, GALLERY = 0, 1
REPORT_FILES = ("metrics.json", "metrics.md", "retrievals.png")


class RetrievalEvaluator(pl.LightningModule):
    """Evaluate a descriptor on a retrieval set: mAP, Recall@k, HitRate@k, P@k, MRR.

    Args:
        descriptor: the descriptor (:class:`models.descriptor_config.DescriptorConfig`: registry
            name, weights file, random init, input size, token normalisation); its features' kind
            decides the similarity (cosine, or split-product for token descriptors).
        precision: ``auto`` (bfloat16 autocast on CUDA when the trainer runs in float32, float32
            on the CPU), ``32`` (no autocast of its own) or ``bf16`` (always autocast to bfloat16).
        k: length of each ranked list; positives beyond it count as not retrieved,
            so use ``k`` >= gallery size for exact mAP (clipped to the gallery).
        ks: cut-offs for Recall@k, HitRate@k and P@k.
        ap: ``standard`` AP, or ``revisited`` (Oxford/Paris trapezoid with junk).
        run_name: label of the row in the Markdown table and in ``lit report`` (default: the
            descriptor's name, ``<name> (random init)`` for random weights).
        grid_queries: queries shown in the TensorBoard / PNG grid of top results (0 = none).
        grid_top: retrieved items shown per query in that grid.
    """

    def __init__(
        self,
        descriptor: DescriptorConfig = DescriptorConfig(),  # noqa: B008 - frozen; LightningCLI shows it
        precision: Precision = "auto",
        k: int = 1000,
        ks: list[int] = [1, 5, 10],  # noqa: B006 - LightningCLI shows list defaults
        ap: Literal["standard", "revisited"] = "standard",
        run_name: str | None = None,
        grid_queries: int = 8,
        grid_top: int = 5,
    ) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.save_hyperparameters()
        if not isinstance(descriptor, DescriptorConfig):
            raise TypeError(f"descriptor must be a models.descriptor_config.DescriptorConfig, "
                            f"got {type(descriptor).__name__}")
        self.descriptor_config = descriptor
        self.descriptor = descriptor.build()
        self.similarity = self.descriptor.similarity
        self.precision_choice: Precision = precision
        self.metrics = RetrievalMetrics(ks=tuple(ks), ap=ap)
        self._loaders: dict[int, FeatureBuffer] = {}  # embedded rows of each test loader (queries, gallery)
        self._skipped: list[str] = []
        self._grid_rows: list[tuple[int, list[int], list[bool]]] = []
        self._written: set[Path] = set()
        self.results: dict[str, float] = {}

    # ------------------------------------------------------------------ embedding
    def forward(self, images: Tensor | list[Tensor]) -> Tensor:
        """Features of a batch of [0, 1] images (global or token, per the descriptor)."""
        return self.descriptor(images)

    def on_test_start(self) -> None:
        """Refuse early, on every rank, to overwrite report files that this module did not write."""
        log_dir = self._log_dir()
        foreign = [str(log_dir / name) for name in REPORT_FILES
                   if (log_dir / name).exists() and log_dir / name not in self._written]
        foreign = self.trainer.strategy.broadcast(foreign if self.trainer.is_global_zero else [])
        if foreign:
            raise UserError(
                f"{foreign[0]} already exists and this run did not write it: give the logger another "
                "save_dir / name / version, or another default_root_dir, so that nothing is overwritten"
            )

    def on_test_epoch_start(self) -> None:
        self._loaders = {QUERIES: FeatureBuffer(), GALLERY: FeatureBuffer()}
        self._skipped = []
        self._grid_rows = []
        self.metrics.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._skipped.extend(batch.get("skipped", []))
        if len(batch["index"]) == 0:
            return
        self._loaders[dataloader_idx].add(batch["index"], self.embedder()(batch["image"]))

    def embedder(self) -> Embedder:
        """The suite's one embedding path for this module's descriptor, device and precision."""
        trainer_precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        return Embedder(self.descriptor, self.device, step_precision(self.precision_choice, trainer_precision))

    # ------------------------------------------------------------------ scoring
    def on_test_epoch_end(self) -> None:
        retrieval_set = self.trainer.datamodule.retrieval_set  # type: ignore[union-attr]
        query_ids, query_features = self._loaders[QUERIES].local()  # this rank's queries, searched here
        gallery_ids, gallery_features = self._loaders[GALLERY].gather(
            self.device, nothing="no gallery image could be loaded: nothing to search")
        query_ids = query_ids.to(self.device)
        scored = torch.zeros(0, dtype=torch.long, device=self.device)
        if query_features is not None:
            scored = self._score_queries(
                query_ids, query_features, gallery_ids, gallery_features, retrieval_set
            ).to(self.device)
        results = {name: float(value) for name, value in self.metrics.compute().items()}
        num_queries = int(gather_by_index(scored)[0].numel())
        # every rank holds the same (gathered) values: no reduction needed; logged outside a
        # dataloader, so trainer.test() returns them (in the dict of each test dataloader)
        self.log_dict(results, sync_dist=False, batch_size=1)
        self.results = results
        skipped = all_gather_objects(self._skipped)
        # each rank's first kept queries -> the first by index over all ranks (DDP padding
        # repeats a query on two ranks: one row per index), the same for any world size
        grid_rows = {row[0]: row for row in all_gather_objects(self._grid_rows)}
        self._grid_rows = [grid_rows[q] for q in sorted(grid_rows)[: self.hparams.grid_queries]]
        log_dir = self._log_dir()
        if self.trainer.is_global_zero:
            self._write_reports(log_dir, results, num_queries, int(gallery_ids.numel()), skipped, retrieval_set)

    def _log_dir(self) -> Path:
        """The run's log folder (a collective under DDP: every rank must ask for it)."""
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def _score_queries(
        self,
        query_ids: Tensor,
        query_features: Tensor,
        gallery_ids: Tensor,
        gallery_features: Tensor,
        retrieval_set: Any,
    ) -> Tensor:
        """Search this rank's queries, feed their relevance to the accumulator, return their ids."""
        scored = score_queries(
            query_ids,
            query_features,
            gallery_ids,
            gallery_features,
            retrieval_set,
            k=self.hparams.k,
            similarity=self.similarity,
            normalization=self.descriptor_config.token_normalization,
        )
        if not len(scored):
            return torch.zeros(0, dtype=torch.long)
        self.metrics.update(scored.query_ids, scored.relevance, scored.num_positives, scored.junk)
        rows, top = self.hparams.grid_queries, self.hparams.grid_top
        self._grid_rows = list(zip(scored.query_ids[:rows].tolist(), scored.ranked[:rows, :top].tolist(),
                                   scored.relevance[:rows, :top].bool().tolist()))
        return scored.query_ids

    def _write_reports(
        self,
        log_dir: Path,
        results: dict[str, float],
        num_queries: int,
        num_gallery: int,
        skipped: list[str],
        retrieval_set: Any,
    ) -> None:
        """metrics.json and metrics.md in the log directory, and a short summary on stdout."""
        name = self.hparams.run_name or self.descriptor_config.display_name
        expected_queries = len(retrieval_set.positives)
        datamodule = self.trainer.datamodule
        payload = {
            "run_name": name,
            "descriptor": self.descriptor_config.name,
            "descriptor_config": self.descriptor_config.record(self.descriptor),
            "dataset": getattr(datamodule, "name", None) or type(datamodule).__name__,
            "similarity": self.similarity,
            "token_normalization": self.descriptor_config.token_normalization,
            "ap": self.hparams.ap,
            "k": self.hparams.k,
            "num_queries": num_queries,
            "num_gallery": num_gallery,
            # build-time skips (a synthetic set's unreadable sources) count with the load failures
            "queries_skipped": expected_queries - num_queries + len(getattr(retrieval_set, "skipped_queries", {})),
            "gallery_skipped": len(retrieval_set.gallery) - num_gallery,
            "skipped_files": sorted(set(skipped)),
            "skipped_queries": dict(getattr(retrieval_set, "skipped_queries", {})),
            "skipped_sources": dict(getattr(retrieval_set, "skipped_sources", {})),
            "metrics": results,
        }
        self._written.add(write_json(log_dir / "metrics.json", payload))
        table = metrics_markdown(results, name)
        self._written.add(write_text_atomic(log_dir / "metrics.md", table))
        self._write_grid(log_dir, retrieval_set)
        rank_zero_info(
            f"\nRetrieval results ({num_queries} queries, {num_gallery} gallery images, "
            f"{self.similarity}):\n{table}\nLogs, metrics.json and metrics.md: {log_dir}"
        )

    def _write_grid(self, log_dir: Path, retrieval_set: Any) -> None:
        """Queries beside their top results (green = positive, red = not) to TensorBoard and PNG."""
        if not self._grid_rows or self.hparams.grid_queries == 0:
            return
        query_ids = torch.tensor([row[0] for row in self._grid_rows])
        ranked = torch.tensor([row[1] for row in self._grid_rows])
        relevance = torch.tensor([row[2] for row in self._grid_rows])

        def image(dataset: Any, row: int) -> Tensor:
            loaded = dataset[row]["image"] if row >= 0 else None
            return loaded if loaded is not None else torch.ones(3, 8, 8)

        grid = retrieval_grid(
            [image(retrieval_set.queries, q) for q in query_ids.tolist()],
            [[image(retrieval_set.gallery, g) for g in row if g >= 0] for row in ranked.tolist()],
            [[bool(ok) for ok, g in zip(flags, row) if g >= 0] for flags, row in zip(relevance.tolist(), ranked.tolist())],
        )
        self._written.add(save_png(grid, log_dir / "retrievals.png"))
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("test/retrievals", grid, self.global_step)
