"""``RetrievalMetricsCallback``: copy-detection mAP of the backbone being trained, every n epochs.

At the end of every ``every_n_epochs``-th training epoch the callback embeds the
queries and the gallery of a retrieval datamodule (procedural copies, Segmix,
Cutmix, outpainting, a folder or list set) with ``pl_module.descriptor`` (the
preprocessing + the backbone being trained, e.g. ``models.mocov3``), searches,
scores, and logs through Lightning's ``pl_module.log``:

- ``retrieval/mAP``, ``retrieval/MRR``, ``retrieval/recall@k`` (share of a query's
  positives in its top k), ``retrieval/hit_rate@k`` (any positive in the top k)
  and ``retrieval/precision@k``, so ``ModelCheckpoint(monitor="retrieval/mAP",
  mode="max")`` and ``EarlyStopping`` can use them;
- every ``grid_every_n_checks`` checks, a grid of queries beside their top
  results (green = a true copy) to TensorBoard as ``retrieval/top_results``;
- one line per check on stdout (rank 0): epoch, step, mAP and the rest.

Why ``on_train_epoch_end``: ``pl_module.log`` is allowed there (epoch-level
values), it runs with or without a validation loop, and Lightning calls the
monitoring callbacks (ModelCheckpoint, EarlyStopping) of that hook after the
others and after the logged values reach ``trainer.callback_metrics``, so a
checkpoint of epoch e is ranked by the mAP of epoch e. With
``every_n_epochs > 1`` the metrics exist only after checked epochs: give
``ModelCheckpoint`` the same ``every_n_epochs`` and ``EarlyStopping(strict=False)``.

Scoring is :func:`lit.retrieval_scoring.score_queries` (the same code as
``lit test``'s :class:`models.retrieval.RetrievalEvaluator`: a query's own
gallery row excluded, junk honoured, positives that failed to load dropped)
and :class:`lit.metrics.RetrievalMetrics`.

DDP: queries and gallery are embedded by :func:`lit.embedding.embed_dataset`, the
suite's one embedding path (rank r embeds rows r, r + W, ...; gathered, deduplicated
and ordered by global index; bfloat16 autocast on CUDA per ``precision``), rank r searches queries r, r + W, ..., and ``RetrievalMetrics`` gathers
and deduplicates the ranked lists by query index before scoring. Every rank
therefore computes the same values, identical for 1 and N processes, and logs
them with ``sync_dist=False``. Prints and images come from rank 0 only.

The descriptor is switched to eval mode for the check and every submodule is
put back in the mode it had (a frozen part stays in eval mode). The set's
loaded images are kept in memory between checks up to ``cache_mb`` per process
(:class:`ItemCache`): the set is fixed, so later checks cost only the forward
passes and the search, not decoding or rendering again.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import Dataset

from datamodules.retrieval import RetrievalDataModule
from lit.choices import SimilarityKind, TokenNormalization
from lit.embedding import Precision, embed_dataset
from lit.grids import retrieval_grid
from lit.metrics import RetrievalMetrics
from lit.retrieval_scoring import ScoredQueries, score_queries
from models.descriptor import Descriptor

PREFIX = "retrieval"
GRID_TAG = f"{PREFIX}/top_results"


class RetrievalMetricsCallback(Callback):
    """Log copy-detection metrics of ``pl_module.descriptor`` on a retrieval set during ``fit``.

    The LightningModule must expose ``descriptor``: a :class:`models.descriptor.Descriptor`
    wrapping the backbone being trained. That descriptor is what is measured, so the callback
    takes no descriptor options of its own (no ``DescriptorConfig``): the features' kind decides
    the similarity (cosine for global features, split-product for tokens), and only what the
    module cannot say is an argument here (``token_normalization``, ``precision``).

    Args:
        datamodule: the retrieval set, e.g. ``datamodules.retrieval.ProceduralRetrievalDataModule``
            (``class_path`` / ``init_args`` in YAML); its ``prepare_data`` and ``setup`` run at fit start.
        every_n_epochs: check after every n training epochs.
        k: length of each ranked list (clipped to the gallery); use ``k`` >= gallery size for exact mAP.
        ks: cut-offs of Recall@k, HitRate@k and P@k.
        token_normalization: normalisation of split-product scores (token descriptors only).
        precision: ``auto`` (bfloat16 autocast on CUDA, float32 on the CPU), ``32`` or ``bf16``
            (see ``lit.embedding.Precision``).
        batch_size: images per embedding batch.
        cache_mb: loaded images kept in memory between checks, per process (each rank keeps its
            own share), so later checks skip decoding / rendering; 0 = load every time.
        grid_every_n_checks: log the query / top results grid every n checks (first check included);
            0 = never.
        grid_queries: queries (rows) in the grid.
        grid_top: retrieved items per query in the grid.
        verbose: print one line per check (rank 0).
    """

    def __init__(
        self,
        datamodule: RetrievalDataModule,
        every_n_epochs: int = 1,
        k: int = 1000,
        ks: list[int] = [1, 5, 10],  # noqa: B006 - LightningCLI shows list defaults
        token_normalization: TokenNormalization = "token",
        precision: Precision = "auto",
        batch_size: int = 64,
        cache_mb: int = 512,
        grid_every_n_checks: int = 5,
        grid_queries: int = 8,
        grid_top: int = 5,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, RetrievalDataModule):
            raise TypeError(
                "datamodule must be a datamodules.retrieval.RetrievalDataModule (it provides retrieval_set), "
                f"got {type(datamodule).__name__}"
            )
        for name, value in {"every_n_epochs": every_n_epochs, "k": k, "batch_size": batch_size,
                            "grid_top": grid_top}.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in {"grid_every_n_checks": grid_every_n_checks, "grid_queries": grid_queries,
                            "cache_mb": cache_mb}.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.datamodule = datamodule
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.token_normalization: TokenNormalization = token_normalization
        self.precision: Precision = precision
        self.batch_size = batch_size
        self.cache_bytes = cache_mb * 2**20
        self._cached: dict[str, ItemCache] = {}
        self.grid_every_n_checks = grid_every_n_checks
        self.grid_queries = grid_queries
        self.grid_top = grid_top
        self.verbose = verbose
        self.metrics = RetrievalMetrics(ks=tuple(ks))  # validates ks
        self.history: list[dict[str, float]] = []
        self.last: dict[str, float] = {}

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(dataset=self.datamodule.name, every_n_epochs=self.every_n_epochs)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state_dict.get("history", [])]

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        descriptor_of(pl_module)  # fail at once, not after the first epoch
        datamodule = self.datamodule
        preparer = trainer.local_rank == 0 if datamodule.prepare_data_per_node else trainer.global_rank == 0
        if preparer:
            datamodule.prepare_data()  # e.g. a synthetic set built on disk once
        trainer.strategy.barrier("retrieval_metrics_prepare")
        datamodule.setup("test")

    # ------------------------------------------------------------------ cadence
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.check(trainer, pl_module)

    # ------------------------------------------------------------------ the check
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Evaluate and log (from a hook where ``pl_module.log`` is allowed); returns the metrics."""
        started = time.perf_counter()
        results, scored = self.evaluate(trainer, pl_module)
        with warnings.catch_warnings():  # "use sync_dist=True": every rank already holds the same values
            warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")
            for name, value in results.items():
                pl_module.log(f"{PREFIX}/{name}", value, on_step=False, on_epoch=True, sync_dist=False,
                              prog_bar=name == "mAP")
        self.last = results
        seconds = time.perf_counter() - started
        self.history.append({"epoch": trainer.current_epoch, "step": trainer.global_step, "seconds": seconds,
                             **results})
        if trainer.is_global_zero:
            if self.grid_every_n_checks and (len(self.history) - 1) % self.grid_every_n_checks == 0 and len(scored):
                self._log_grid(trainer, scored, self.datamodule.retrieval_set)
            if self.verbose:
                print(self.describe(self.history[-1]), flush=True)
        return results

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[dict[str, float], ScoredQueries]:
        """Embed, search and score (every rank joins): the metrics, identical on every rank, and this
        rank's ranked lists. Logs nothing."""
        retrieval_set = self.datamodule.retrieval_set
        descriptor = descriptor_of(pl_module)
        similarity: SimilarityKind = descriptor.similarity
        options = dict(batch_size=self.batch_size, device=pl_module.device, rank=trainer.global_rank,
                       world_size=trainer.world_size, gather_device=trainer.strategy.root_device,
                       precision=self.precision)
        if not self._cached:  # queries first: they get the cache before the gallery
            self._cached = {"queries": ItemCache(retrieval_set.queries, self.cache_bytes)}
            self._cached["gallery"] = ItemCache(retrieval_set.gallery, self.cache_bytes, self._cached["queries"])
        with eval_mode(descriptor):
            queries = embed_dataset(descriptor, self._cached["queries"], desc="retrieval queries", **options)
            gallery = embed_dataset(descriptor, self._cached["gallery"], desc="retrieval gallery", **options)
        if gallery.index.numel() == 0:
            raise RuntimeError("RetrievalMetricsCallback: no gallery image could be loaded: nothing to search")
        mine = slice(trainer.global_rank, None, trainer.world_size)  # this rank's share of the queries
        scored = ScoredQueries(torch.zeros(0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.long),
                               torch.zeros(0, 0, dtype=torch.bool), torch.zeros(0, dtype=torch.long), None)
        if queries.index[mine].numel():
            scored = score_queries(queries.index[mine], queries.features[mine], gallery.index, gallery.features,
                                   retrieval_set, k=self.k, similarity=similarity,
                                   normalization=self.token_normalization)
        self.metrics.to(trainer.strategy.root_device)  # the gather needs the backend's device (NCCL: CUDA)
        self.metrics.reset()
        if len(scored):
            self.metrics.update(scored.query_ids, scored.relevance, scored.num_positives, scored.junk)
        try:
            results = {name: float(value) for name, value in self.metrics.compute().items()}
        except ValueError as error:
            raise RuntimeError(
                f"RetrievalMetricsCallback: no query of {self.datamodule.name} has a positive that could be loaded"
            ) from error
        finally:
            self.metrics.reset()
        return results, scored

    def describe(self, row: dict[str, float]) -> str:
        """One line for a check: epoch, step, mAP, Recall@k, HitRate@k, MRR, time."""
        shown = ["mAP", *(n for n in row if n.startswith(("recall@", "hit_rate@"))), "MRR"]
        values = "  ".join(f"{name} {row[name]:.4f}" for name in shown)
        return (f"retrieval ({self.datamodule.name}) epoch {int(row['epoch'])} step {int(row['step'])}: "
                f"{values}  ({row['seconds']:.1f}s)")

    def _log_grid(self, trainer: pl.Trainer, scored: ScoredQueries, retrieval_set: Any) -> None:
        """Rank 0's first queries beside their top results (green = positive) to TensorBoard."""
        boards = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not boards or self.grid_queries == 0:
            return
        ids = scored.query_ids[: self.grid_queries].tolist()
        ranked = scored.ranked[: self.grid_queries, : self.grid_top].tolist()
        relevance = scored.relevance[: self.grid_queries, : self.grid_top].tolist()

        def image(dataset: Any, row: int) -> Tensor:
            loaded = dataset[row]["image"]
            return loaded if loaded is not None else torch.ones(3, 8, 8)

        grid = retrieval_grid(
            [image(retrieval_set.queries, q) for q in ids],
            [[image(retrieval_set.gallery, g) for g in row if g >= 0] for row in ranked],
            [[bool(ok) for ok, g in zip(flags, row) if g >= 0] for flags, row in zip(relevance, ranked)],
        )
        for logger in boards:
            logger.experiment.add_image(GRID_TAG, grid, trainer.global_step)


class ItemCache(Dataset):
    """A fixed dataset whose items are kept in memory after their first load, while the total image
    bytes (shared with ``budget_of``, another cache) stay within ``max_bytes``; the rest load each time."""

    def __init__(self, dataset: Dataset, max_bytes: int, budget_of: ItemCache | None = None) -> None:
        self.dataset = dataset
        self.max_bytes = max_bytes
        self.items: dict[int, dict[str, Any]] = {}
        self.shared = budget_of.shared if budget_of is not None else [0]  # bytes held by all caches

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index in self.items:
            return self.items[index]
        item = self.dataset[index]
        image = item["image"]
        size = image.numel() * image.element_size() if image is not None else 0
        if self.shared[0] + size <= self.max_bytes:
            self.items[index] = {key: item[key] for key in ("image", "index", "path") if key in item}
            self.shared[0] += size
        return item


def descriptor_of(pl_module: pl.LightningModule) -> Descriptor:
    """``pl_module.descriptor``, checked to be a :class:`models.descriptor.Descriptor`."""
    descriptor = getattr(pl_module, "descriptor", None)
    if not isinstance(descriptor, Descriptor):
        raise TypeError(
            f"RetrievalMetricsCallback needs a LightningModule whose 'descriptor' is a models.descriptor.Descriptor "
            f"(preprocessing + the backbone being trained), got {type(pl_module).__name__}.descriptor = "
            f"{type(descriptor).__name__}"
        )
    return descriptor


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode; on exit give every submodule back its own mode (parents first)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.train(training)
