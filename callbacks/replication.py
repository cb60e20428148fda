"""``ReplicationMonitor``: watch a DDPM start copying its training set while it trains.

At fit start the callback embeds the (un-augmented) training subset once with its
descriptor (``descriptor: DescriptorConfig``, through ``lit.embedding.embed_dataset``) and
computes the self-similarity baseline and each training image's duplicates. At every check it
samples the EMA weights with fixed seeds (the same generations-to-be at every check, so checks
are comparable), embeds the generations through the same path, searches the training set and
records the statistics of :mod:`lit.replication` (the definitions ``lit scan`` uses too: the
same descriptor and options give the same numbers):

- scalars ``replication/rate@t``, ``replication/top1_{mean,median,p95,max}``,
  ``replication/top_match_duplicates_{mean,share}`` (duplicates of each generation's top-1
  match) and the baseline's ``replication_baseline/rate@t``, ``.../top1_*``,
  ``.../duplicates_{mean,share}`` (``replication_baseline_sampled/`` when the baseline was
  taken on a sample, ``baseline_sample``); time spent in ``replication_time/``. They go to
  the loggers at the step of the check, and the ``replication/`` and baseline ones also
  through ``pl_module.log`` (``logger=False``, the same values on every rank), so
  ``trainer.callback_metrics`` holds the latest check and
  ``ModelCheckpoint(monitor="replication/rate@0.5")`` or ``EarlyStopping`` can act on it.
  Lightning allows ``log`` only in some hooks: checks in ``on_train_batch_end``
  (``every_n_steps``) log per step, checks in ``on_train_epoch_end`` (``every_n_epochs``)
  per epoch; the check before training (``on_train_start``: an epoch-level value there
  would surface only at the end of the first epoch, after newer checks) and the one at
  the end (``on_train_end``, where ``log`` is forbidden) put their values straight into
  ``trainer.callback_metrics``;
- TensorBoard histograms of generation top-1 similarity and of the baseline, and the text
  ``replication/settings`` (descriptor, mirror matching, how the baseline was taken);
- the histogram overlay (paper Fig. 5) and a grid of the most similar
  generations beside their top-k training matches with scores (Fig. 3 / 4);
- ``replication/scores_step_<step>.csv`` (seed, top-k scores and training matches),
  ``replication_history.csv`` and ``replication/descriptor.json`` (what was measured:
  :meth:`models.descriptor_config.DescriptorConfig.record`, ``match_mirrors``, the baseline's
  sample) in the log dir.

With ``match_mirrors`` (default off, as in ``lit scan``) a training image also matches through
its horizontal mirror: models trained with random flips copy mirrored images, which
flip-sensitive descriptors would miss; it doubles the search.

At fit end it writes ``replication_summary.png`` (rates over time, latest histogram, latest
top copies) and prints the rate over time and where the logs are. The tables, CSVs and the
figure are the pure functions of :mod:`lit.replication_report`; this class only orchestrates.

DDP: seeds are split across ranks (rank r samples ``seeds[r::world]``); the generations'
features are gathered by seed position (``lit.embedding.embed_dataset``), so 1 and N processes
give the same numbers. Files, figures and prints come from rank 0 only.

Resume: the history of checks (and the time totals) is the callback's ``state_dict``; a run
resumed with ``--ckpt_path`` continues it, a step already checked is never checked twice,
and ``check_at_start`` checks the untrained model only (step 0), not the resumed one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import Dataset

from lit.choices import DEFAULT_THRESHOLDS, DUPLICATE_THRESHOLD, MATCH_MIRRORS
from lit.distributed import gather_by_index
from lit.embedding import Precision, embed_dataset
from lit.files import write_json, write_text_atomic
from lit.plots import save_figure, similarity_histogram, top_copies_grid
from lit.replication import (
    Matches,
    ReplicationStats,
    RowSample,
    SearchSettings,
    baseline_rows,
    duplicate_comparison,
    duplicate_counts,
    replication_stats,
    self_similarity_baseline,
    top_copies,
    top_matches,
)
from lit.replication_report import (
    Where,
    baseline_legend,
    baseline_prefix,
    copy_labels,
    duplicate_scalars,
    history_csv,
    scores_csv,
    settings_text,
    summary_figure,
    summary_table,
)
from lit.text_replication import SCORE_PREFIX
from models.descriptor_config import DescriptorConfig
from models.descriptor import Descriptor
from models.registry import get_spec

HISTORY_FILE = "replication_history.csv"
SUMMARY_FILE = "replication_summary.png"
PHASES = ("reference", "sampling", "embedding", "search", "logging")


def _mirror(images: Tensor) -> Tensor:
    """Horizontal flip of (B, C, H, W) images."""
    return torch.flip(images, dims=[-1])


class _Generations(Dataset):
    """This rank's generations as ``{"image", "index"}`` items at their seed positions (what
    ``embed_dataset`` embeds on rank r: positions ``r, r + W, ...``, exactly the ones sampled here)."""

    def __init__(self, images: Tensor, positions: list[int], total: int) -> None:
        self.images = images
        self.local = {p: i for i, p in enumerate(positions)}
        self.total = total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, position: int) -> dict[str, Any]:
        return {"image": self.images[self.local[position]], "index": position}


class ReplicationMonitor(Callback):
    """Track the replication rate of a diffusion model's generations during ``fit``.

    The LightningModule must provide ``sample(seeds, steps=, sampler=, batch_size=)``
    (e.g. ``models.ddpm.DDPMModule``) and the datamodule ``reference_dataset()``
    yielding ``{"image", "index"}`` (e.g. ``datamodules.images.ProceduralTrainData``).

    Args:
        descriptor: the descriptor (``models.descriptor_config.DescriptorConfig``: registry
            ``name``, local ``weights``, ``random_init``, ``input_size``, ``token_normalization``).
        match_mirrors: a training image also matches through its horizontal mirror (for models
            trained with random flips; also applies to the baseline and the duplicates).
        baseline_sample: training images the self-similarity baseline is taken over (a seeded
            sample, ``seed``, labelled as such in every output); ``None``: all of them.
        duplicate_threshold: similarity above which another training image is a duplicate.
        every_n_epochs: check after every n training epochs (default 1 when
            ``every_n_steps`` is not set).
        every_n_steps: check every n optimizer steps instead.
        check_at_start: check before the first optimizer step (the untrained model).
        check_at_end: check at the end of fit if the last step was not checked.
        num_samples: generations per check (seeds ``seed .. seed + num_samples - 1``).
        sample_steps: sampler steps (default: the model's ``sample_steps``).
        sampler: ``ddpm`` or ``ddim`` (default: the model's).
        sample_batch_size: generations denoised together (default: the model's).
        thresholds: replication-rate thresholds on the top-1 similarity.
        top_k: training matches kept per generation and shown in the grid.
        num_copies_shown: rows of the top-copies grid.
        seed: first sampling seed (and the seed of a sampled baseline).
        embed_batch_size: images per descriptor batch.
        precision: ``auto`` (bfloat16 autocast on CUDA, float32 on the CPU), ``32`` or ``bf16``
            (see ``lit.embedding.Precision``); ``32`` keeps GPU numbers in float32.
        histogram_bins: bins of the overlay figure.
        verbose: print the summary table at fit end.
    """

    def __init__(
        self,
        descriptor: DescriptorConfig = DescriptorConfig(),  # noqa: B008 - frozen; LightningCLI shows it
        match_mirrors: bool = MATCH_MIRRORS,
        baseline_sample: int | None = None,
        duplicate_threshold: float = DUPLICATE_THRESHOLD,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        check_at_start: bool = True,
        check_at_end: bool = True,
        num_samples: int = 32,
        sample_steps: int | None = None,
        sampler: Literal["ddpm", "ddim"] | None = None,
        sample_batch_size: int | None = None,
        thresholds: list[float] = list(DEFAULT_THRESHOLDS),  # noqa: B006, B008 - LightningCLI shows list defaults
        top_k: int = 3,
        num_copies_shown: int = 6,
        seed: int = 0,
        embed_batch_size: int = 64,
        precision: Precision = "auto",
        histogram_bins: int = 40,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if every_n_epochs is not None and every_n_steps is not None:
            raise ValueError("set either every_n_epochs or every_n_steps, not both")
        for name, value in {"every_n_epochs": every_n_epochs, "every_n_steps": every_n_steps,
                            "sample_steps": sample_steps, "sample_batch_size": sample_batch_size,
                            "baseline_sample": baseline_sample}.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in {"num_samples": num_samples, "top_k": top_k, "embed_batch_size": embed_batch_size,
                            "histogram_bins": histogram_bins}.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not thresholds:
            raise ValueError("thresholds must list at least one value")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not isinstance(descriptor, DescriptorConfig):
            raise TypeError(f"descriptor must be a models.descriptor_config.DescriptorConfig, got "
                            f"{type(descriptor).__name__} (YAML: descriptor: {{name: pixel}})")
        get_spec(descriptor.name)  # an unknown name fails here, with the list of names, not at fit start
        self.descriptor_config = descriptor
        self.match_mirrors = match_mirrors
        self.baseline_sample_size = baseline_sample
        self.duplicate_threshold = duplicate_threshold
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None or every_n_steps is not None else 1
        self.every_n_steps = every_n_steps
        self.check_at_start = check_at_start
        self.check_at_end = check_at_end
        self.seeds = list(range(seed, seed + num_samples))
        self.seed = seed
        self.sample_steps = sample_steps
        self.sampler = sampler
        self.sample_batch_size = sample_batch_size
        self.thresholds = sorted(float(t) for t in thresholds)
        self.top_k = top_k
        self.num_copies_shown = num_copies_shown
        self.embed_batch_size = embed_batch_size
        self.precision: Precision = precision
        self.histogram_bins = histogram_bins
        self.verbose = verbose

        self.history: list[dict[str, float]] = []
        self.timings: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.descriptor: Descriptor | None = None  # the built descriptor (setup)
        self.reference: Dataset | None = None
        self.reference_names: list[str] = []
        self.train_features: Tensor | None = None
        self.mirror_features: Tensor | None = None
        self.baseline_rows: RowSample | None = None
        self.baseline_scores: Tensor | None = None
        self.baseline: ReplicationStats | None = None
        self.training_duplicates: Tensor | None = None  # duplicates of the baseline's training images
        self.duplicates_by_row: dict[int, int] = {}
        self.log_dir: Path | None = None
        self.latest: dict[str, Any] = {}
        self._settings_logged = False

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(descriptor=self.descriptor_config.name, seeds=(self.seeds[0], len(self.seeds)))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history], "timings": dict(self.timings)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the checkpoint's history (its steps are never checked again) and its time totals."""
        self.history = [dict(row) for row in state_dict.get("history", [])]
        self.timings = {**dict.fromkeys(PHASES, 0.0), **state_dict.get("timings", {})}

    def checked_steps(self) -> list[int]:
        """Training steps at which a check was recorded, in order."""
        return [int(row["step"]) for row in self.history]

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "sample", None)):
            raise TypeError(f"ReplicationMonitor needs a model with a sample(seeds, ...) method, got {type(pl_module).__name__}")
        if trainer.world_size > len(self.seeds):
            raise ValueError(f"num_samples ({len(self.seeds)}) must be at least the number of processes "
                             f"({trainer.world_size}): every rank samples some of the generations")
        if self.descriptor is None:
            self.descriptor = self.descriptor_config.build()
            self.descriptor.requires_grad_(False)

    def _search_settings(self) -> SearchSettings:
        """The search runs on the CPU (faiss for global features), as ``lit scan --device cpu``."""
        return SearchSettings(normalization=self.descriptor_config.token_normalization)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Embed the training subset once (sharded across ranks); the baseline and the duplicates."""
        started = time.perf_counter()
        datamodule = trainer.datamodule
        if datamodule is None or not callable(getattr(datamodule, "reference_dataset", None)):
            raise ValueError("ReplicationMonitor needs a datamodule with reference_dataset() "
                             "(e.g. datamodules.images.ProceduralTrainData or ImageFolderTrainData)")
        assert self.descriptor is not None
        self.descriptor.to(pl_module.device)
        self.reference = datamodule.reference_dataset()
        self.reference_names = list(getattr(datamodule, "names", []))
        self.train_features, self.mirror_features = self._embed_reference(trainer, pl_module)
        settings = self._search_settings()
        self.baseline_rows = baseline_rows(self.train_features.shape[0], self.baseline_sample_size, self.seed)
        rows = self.baseline_rows.rows
        self.baseline_scores = self_similarity_baseline(self.train_features, rows, mirrored=self.mirror_features,
                                                        settings=settings)
        self.baseline = replication_stats(self.baseline_scores, self.thresholds)
        self.training_duplicates = duplicate_counts(self.train_features, rows, mirrored=self.mirror_features,
                                                    threshold=self.duplicate_threshold, settings=settings)
        self.duplicates_by_row = dict(zip(rows.tolist(), self.training_duplicates.tolist()))
        self.log_dir = Path(trainer.log_dir) if trainer.log_dir is not None else None
        if trainer.is_global_zero and self.log_dir is not None:
            write_json(self.log_dir / "replication" / "descriptor.json", {
                "descriptor": self.descriptor_config.record(self.descriptor),
                "match_mirrors": self.match_mirrors,
                "baseline": {**self.baseline_rows.record(), "label": self.baseline_rows.label},
                "duplicate_threshold": self.duplicate_threshold,
            })
        self.timings["reference"] += time.perf_counter() - started

    def _embed_reference(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor | None]:
        """Features of the training images (and of their mirrors), sharded over ranks and
        gathered by index (``lit.embedding.embed_dataset``)."""
        assert self.reference is not None and self.descriptor is not None
        common = self._embed_options(trainer, pl_module)
        embedded = embed_dataset(self.descriptor, self.reference, desc="training images", **common)
        if embedded.index.numel() != len(self.reference) or not torch.equal(embedded.index,
                                                                              torch.arange(len(self.reference))):
            raise ValueError(f"reference_dataset indices must be 0..{len(self.reference) - 1}, got "
                             f"{embedded.index.numel()} distinct values (unreadable: {embedded.skipped[:3]})")
        if not self.match_mirrors:
            return embedded.features, None
        mirrored = embed_dataset(self.descriptor, self.reference, transform=_mirror, desc="mirrored training images",
                                 **common)
        return embedded.features, mirrored.features

    def _embed_options(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The keywords every ``embed_dataset`` call of a check shares (device, ranks, precision)."""
        return {"batch_size": self.embed_batch_size, "device": pl_module.device, "rank": trainer.global_rank,
                "world_size": trainer.world_size, "gather_device": trainer.strategy.root_device,
                "precision": self.precision}

    def _embed_generations(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor,
                           positions: list[int]) -> Tensor:
        """Features of every rank's generations, ordered by seed position (``embed_dataset``)."""
        assert self.descriptor is not None
        embedded = embed_dataset(self.descriptor, _Generations(images, positions, len(self.seeds)),
                                 desc="generations", **self._embed_options(trainer, pl_module))
        if not torch.equal(embedded.index, torch.arange(len(self.seeds))):
            raise RuntimeError(f"gathered {embedded.index.numel()} of {len(self.seeds)} generations across ranks")
        return embedded.features

    @staticmethod
    def _gather(trainer: pl.Trainer, index: Tensor, *rows: Tensor) -> tuple[Tensor, ...]:
        """All-gather rows from every rank (through the strategy's device) and dedupe by index."""
        device = trainer.strategy.root_device
        return tuple(t.cpu() for t in gather_by_index(index.to(device), *(t.to(device) for t in rows)))

    # ------------------------------------------------------------------ cadence
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_at_start and trainer.global_step == 0:  # the untrained model, not a resumed one
            self._maybe_check(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._maybe_check(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._maybe_check(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_at_end:
            self._maybe_check(trainer, pl_module)
        if trainer.is_global_zero:
            self._write_summary(trainer)

    def _maybe_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check unless this step is already in the history (resume, epoch end after a step check)."""
        if trainer.sanity_checking or trainer.global_step in self.checked_steps():
            return
        self.check(trainer, pl_module)

    # ------------------------------------------------------------------ one check
    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Sample, embed, search; log on rank 0; append to the history. Returns the row."""
        assert self.train_features is not None and self.baseline is not None
        clock = time.perf_counter()
        positions = list(range(trainer.global_rank, len(self.seeds), trainer.world_size))
        images = self._generate(trainer, pl_module, positions)
        clock = self._tick("sampling", clock)
        features = self._embed_generations(trainer, pl_module, images, positions)
        clock = self._tick("embedding", clock)
        k = min(self.top_k, self.train_features.shape[0])
        matches = top_matches(features, self.train_features, k, mirrored=self.mirror_features,
                              settings=self._search_settings())
        top1 = matches.top1
        stats = replication_stats(top1, self.thresholds)
        duplicates = duplicate_comparison(self._duplicates_of(matches.indices[:, 0]), self.training_duplicates,
                                          self.duplicate_threshold)
        shown = top_copies(top1, self.num_copies_shown)
        mine = torch.tensor(positions, dtype=torch.long)
        keep = torch.isin(mine, shown)
        _, copies = self._gather(trainer, mine[keep], images[keep])  # rows of `shown`, sorted by position
        order = torch.argsort(torch.argsort(shown))  # positions of `shown` within the sorted gather
        copies = copies[order]
        clock = self._tick("search", clock)

        check_duplicates, _ = duplicate_scalars(duplicates)
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "num_samples": len(self.seeds),
               **stats.as_dict(), **check_duplicates, **self._extra_statistics(trainer, matches, positions)}
        self.history.append(row)
        self.latest = {"top1": top1, "matches": matches, "shown": shown, "copies": copies, "duplicates": duplicates}
        self._log_through_lightning(trainer, pl_module, row)
        if trainer.is_global_zero:
            self._log(trainer, row)
        self._tick("logging", clock)
        return row

    def _generate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, positions: list[int]) -> Tensor:
        """This rank's generations, one per seed position in ``positions`` (float images in [0, 1])."""
        return pl_module.sample([self.seeds[p] for p in positions], steps=self.sample_steps,
                                sampler=self.sampler, batch_size=self.sample_batch_size)

    def _extra_statistics(self, trainer: pl.Trainer, matches: Matches, positions: list[int]) -> dict[str, float]:
        """Scalars a subclass adds to a check's row (its keys are logged under ``replication/``,
        those starting with ``memorization/`` as they are); none here."""
        return {}

    def _duplicates_of(self, rows: Tensor) -> Tensor:
        """Duplicate counts of training rows (counted once per row and kept: they never change)."""
        assert self.train_features is not None
        missing = torch.tensor(sorted({int(r) for r in rows.tolist()} - set(self.duplicates_by_row)), dtype=torch.long)
        if missing.numel():
            counts = duplicate_counts(self.train_features, missing, mirrored=self.mirror_features,
                                      threshold=self.duplicate_threshold, settings=self._search_settings())
            self.duplicates_by_row.update(zip(missing.tolist(), counts.tolist()))
        return torch.tensor([self.duplicates_by_row[int(r)] for r in rows.tolist()], dtype=torch.int64)

    def scalars(self, row: dict[str, Any]) -> dict[str, float]:
        """A check's scalars with their logged names: ``replication/...`` and the baseline's
        (``replication_baseline/...``, or ``replication_baseline_sampled/...`` for a sampled baseline)."""
        assert self.baseline is not None and self.baseline_rows is not None
        _, base_duplicates = duplicate_scalars(self.latest["duplicates"])
        prefix = baseline_prefix(self.baseline_rows)
        values = {(k if k.startswith(f"{SCORE_PREFIX}/") else f"replication/{k}"): float(v)
                  for k, v in row.items() if k not in ("step", "epoch", "num_samples")}
        values.update({f"{prefix}/{k}": float(v) for k, v in {**self.baseline.as_dict(), **base_duplicates}.items()})
        return values

    def _log_through_lightning(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               row: dict[str, Any]) -> None:
        """The check's scalars into ``trainer.callback_metrics`` (every rank, identical values),
        for ModelCheckpoint / EarlyStopping; the loggers get them from :meth:`_log` at the check's step."""
        self._log_values(trainer, pl_module, self.scalars(row))

    @staticmethod
    def _log_values(trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        """``values`` into ``trainer.callback_metrics``: through ``pl_module.log`` where Lightning allows it."""
        hook = getattr(pl_module, "_current_fx_name", None)  # the hook Lightning is running now
        if hook == "on_train_batch_end":
            pl_module.log_dict(values, on_step=True, on_epoch=False, logger=False, sync_dist=False)
        elif hook == "on_train_epoch_end":
            pl_module.log_dict(values, on_step=False, on_epoch=True, logger=False, sync_dist=False, batch_size=1)
        else:  # on_train_start, on_train_end (log is forbidden there) or a direct call
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})

    def _tick(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[phase] += now - since
        return now

    # ------------------------------------------------------------------ logging (rank 0)
    def _log(self, trainer: pl.Trainer, row: dict[str, Any]) -> None:
        assert self.baseline_rows is not None and self.baseline_scores is not None
        step = trainer.global_step
        scalars = self.scalars(row)
        scalars.update({f"replication_time/{k}": v for k, v in self.timings.items()})
        prefix = baseline_prefix(self.baseline_rows)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                if not self._settings_logged:
                    writer.add_text("replication/settings", self.settings_text(), step)
                writer.add_histogram("replication/top1_generations", self.latest["top1"], step)
                writer.add_histogram(f"{prefix}/top1_training", self.baseline_scores, step)
                writer.add_figure("replication/similarity_histogram", self.histogram_figure(), step)
                writer.add_figure("replication/top_copies", self.copies_figure(), step)
        self._settings_logged = True
        if self.log_dir is not None:
            write_text_atomic(self.log_dir / "replication" / f"scores_step_{step:07d}.csv",
                              scores_csv(self.seeds, self.latest["matches"]))
            write_text_atomic(self.log_dir / HISTORY_FILE, self.history_csv())

    def settings_text(self) -> str:
        """What is measured, in words (TensorBoard text ``replication/settings``)."""
        assert self.baseline_rows is not None
        return settings_text(self.descriptor_config.display_name, self.match_mirrors, self.baseline_rows,
                             self.duplicate_threshold, len(self.seeds))

    def histogram_figure(self) -> Any:
        """The Fig. 5 overlay of the latest check."""
        assert self.baseline_scores is not None and self.baseline_rows is not None
        mirrors = ", mirror-aware" if self.match_mirrors else ""
        return similarity_histogram(self.latest["top1"], self.baseline_scores, self.thresholds,
                                    bins=self.histogram_bins,
                                    title=f"top-1 similarity ({self.descriptor_config.display_name}{mirrors})",
                                    baseline_label=baseline_legend(self.baseline_rows))

    def _copies(self) -> tuple[Tensor, Tensor, Tensor, list[str], list[list[str]]]:
        """Generations, their training matches, scores and labels for the top-copies grid
        (read from the training set once per check: the TensorBoard grid and the summary share it)."""
        if "grid" not in self.latest:
            self.latest["grid"] = self._read_copies()
        return self.latest["grid"]

    def _read_copies(self) -> tuple[Tensor, Tensor, Tensor, list[str], list[list[str]]]:
        matches: Matches = self.latest["matches"]
        shown = self.latest["shown"]
        images = torch.stack([torch.stack([self._training_image(int(j), bool(m)) for j, m in zip(row, flips)])
                              for row, flips in zip(matches.indices[shown], matches.mirrored[shown])])
        labels, match_labels = copy_labels(self.seeds, shown, matches, self.reference_names)
        return self.latest["copies"], images, matches.scores[shown], labels, match_labels

    def copies_figure(self) -> Any:
        """Fig. 3 / 4 grid of the latest check."""
        generations, images, scores, labels, match_labels = self._copies()
        return top_copies_grid(generations, images, scores, labels, match_labels)

    def _training_image(self, row: int, mirrored: bool) -> Tensor:
        """Training image ``row`` as matched (mirrored when the match was its mirror)."""
        assert self.reference is not None
        image = self.reference[row]["image"]
        return torch.flip(image, dims=[-1]) if mirrored else image

    def history_csv(self) -> str:
        """The history as CSV text (one row per check), baseline as the last row."""
        return history_csv(self.history, self.thresholds, self.match_mirrors, self.baseline, self.baseline_rows)

    # ------------------------------------------------------------------ end of fit
    def _write_summary(self, trainer: pl.Trainer) -> None:
        if not self.history or self.log_dir is None or not self.latest:
            return  # the history CSV is current: the last check's _log wrote it
        assert self.baseline is not None and self.baseline_scores is not None and self.baseline_rows is not None
        generations, images, scores, labels, match_labels = self._copies()
        figure = summary_figure(self.history, self.thresholds, self.latest["top1"], self.baseline_scores,
                                self.baseline, self.baseline_rows, generations, images, scores, labels, match_labels,
                                num_generations=len(self.seeds), descriptor=self.descriptor_config.display_name,
                                match_mirrors=self.match_mirrors)
        png = save_figure(figure, self.log_dir / SUMMARY_FILE)
        if self.verbose:
            print(self.summary_text(trainer, png), flush=True)

    def summary_text(self, trainer: pl.Trainer, png: Path | None = None) -> str:
        """The rate over time as a table, the baseline, the duplicates, the time spent, and where the files are."""
        tensorboard = [lg.log_dir for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        where = Where(tensorboard=tensorboard[0] if tensorboard else None,
                      history=None if self.log_dir is None else self.log_dir / HISTORY_FILE, figure=png)
        return summary_table(self.history, self.thresholds, num_generations=len(self.seeds),
                             num_training=len(self.reference or []), descriptor=self.descriptor_config.display_name,
                             match_mirrors=self.match_mirrors, baseline=self.baseline, sample=self.baseline_rows,
                             duplicates=self.latest.get("duplicates"), timings=self.timings, where=where)
