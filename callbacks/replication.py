"""``ReplicationMonitor``: watch a DDPM start copying its training set while it trains.

At fit start the callback embeds the (un-augmented) training subset once with a
descriptor from the registry and computes the self-similarity baseline (each
training image against the others). At every check it samples the EMA weights
with fixed seeds (the same generations-to-be at every check, so checks are
comparable), embeds the generations, searches the training set and records:

- scalars ``replication/rate@t``, ``replication/top1_{mean,median,p95,max}`` and the
  same for ``replication_baseline/``; time spent in ``replication_time/``. They go to
  the loggers at the step of the check, and the ``replication/`` and
  ``replication_baseline/`` ones also through ``pl_module.log`` (``logger=False``, the
  same values on every rank), so ``trainer.callback_metrics`` holds the latest check and
  ``ModelCheckpoint(monitor="replication/rate@0.5")`` or ``EarlyStopping`` can act on it.
  Lightning allows ``log`` only in some hooks: checks in ``on_train_batch_end``
  (``every_n_steps``) log per step, checks in ``on_train_epoch_end`` (``every_n_epochs``)
  per epoch; the check before training (``on_train_start``: an epoch-level value there
  would surface only at the end of the first epoch, after newer checks) and the one at
  the end (``on_train_end``, where ``log`` is forbidden) put their values straight into
  ``trainer.callback_metrics``;
- TensorBoard histograms of generation top-1 similarity and of the baseline;
- the histogram overlay (paper Fig. 5) and a grid of the most similar
  generations beside their top-k training matches with scores (Fig. 3 / 4);
- ``replication/scores_step_<step>.csv`` (seed, top-k scores and training matches),
  ``replication_history.csv`` and ``replication/descriptor.json`` (what was measured:
  :meth:`models.descriptor_config.DescriptorConfig.record`) in the log dir.

With ``match_mirrors`` (default) a training image also matches through its
horizontal mirror (``lit.replication.mirror_aware_search``): models trained with
random flips copy mirrored images, which flip-sensitive descriptors would miss.

At fit end it writes ``replication_summary.png`` (rates over time, latest
histogram, latest top copies) and prints the rate over time and where the logs
are.

DDP: seeds are split across ranks (rank r samples ``seeds[r::world]``); per-seed
scores are gathered and deduplicated by seed position
(``lit.distributed.dedupe_by_index``), so 1 and N processes give the same
numbers. Files, figures and prints come from rank 0 only.

Resume: the history of checks (and the time totals) is the callback's
``state_dict``; a run resumed with ``--ckpt_path`` continues it, a step already
checked is never checked twice, and ``check_at_start`` checks the untrained model
only (step 0), not the resumed one.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import Dataset

from lit.distributed import gather_by_index
from lit.embedding import embed_dataset
from lit.files import write_json, write_text_atomic
from lit.plots import replication_summary, save_figure, similarity_histogram, top_copies_grid
from lit.replication import (
    DUPLICATE_THRESHOLD,
    ReplicationStats,
    duplicate_pairs,
    format_threshold,
    mirror_aware_search,
    replication_stats,
    self_similarity,
    stat_names,
    top_copies,
)
from lit.similarity import SimilarityKind, TokenNormalization
from models.descriptor_config import DescriptorConfig
from models.descriptor import Descriptor
from models.registry import get_spec

HISTORY_FILE = "replication_history.csv"
SUMMARY_FILE = "replication_summary.png"
PHASES = ("reference", "sampling", "embedding", "search", "logging")


class ReplicationMonitor(Callback):
    """Track the replication rate of a diffusion model's generations during ``fit``.

    The LightningModule must provide ``sample(seeds, steps=, sampler=, batch_size=)``
    (e.g. ``models.ddpm.DDPMModule``) and the datamodule ``reference_dataset()``
    yielding ``{"image", "index"}`` (e.g. ``datamodules.images.ProceduralTrainData``).

    Args:
        descriptor: registry name (``models.registry.available_descriptors``).
        descriptor_weights: local weights file of the descriptor (none for ``pixel``).
        random_init: random descriptor weights (smoke runs and tests only).
        input_size: override of the descriptor's input resolution.
        token_normalization: normalisation for split-product descriptors.
        match_mirrors: a training image also matches through its horizontal mirror
            (for models trained with random flips; also applies to the baseline).
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
        seed: first sampling seed.
        embed_batch_size: images per descriptor batch.
        histogram_bins: bins of the overlay figure.
        verbose: print the summary table at fit end.
    """

    def __init__(
        self,
        descriptor: str = "pixel",
        descriptor_weights: str | None = None,
        random_init: bool = False,
        input_size: int | None = None,
        token_normalization: TokenNormalization = "token",
        match_mirrors: bool = True,
        every_n_epochs: int | None = None,
        every_n_steps: int | None = None,
        check_at_start: bool = True,
        check_at_end: bool = True,
        num_samples: int = 32,
        sample_steps: int | None = None,
        sampler: Literal["ddpm", "ddim"] | None = None,
        sample_batch_size: int | None = None,
        thresholds: list[float] = [0.5, 0.8, 0.9, 0.95],  # noqa: B006 - LightningCLI shows list defaults
        top_k: int = 3,
        num_copies_shown: int = 6,
        seed: int = 0,
        embed_batch_size: int = 64,
        histogram_bins: int = 40,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if every_n_epochs is not None and every_n_steps is not None:
            raise ValueError("set either every_n_epochs or every_n_steps, not both")
        for name, value in {"every_n_epochs": every_n_epochs, "every_n_steps": every_n_steps,
                            "sample_steps": sample_steps, "sample_batch_size": sample_batch_size}.items():
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
        get_spec(descriptor)  # an unknown name fails here, with the list of names, not at fit start
        self.descriptor_config = DescriptorConfig(
            name=descriptor, weights=descriptor_weights, random_init=random_init, input_size=input_size,
            token_normalization=token_normalization,
        )
        self.descriptor_name = descriptor
        self.descriptor_weights = descriptor_weights
        self.random_init = random_init
        self.input_size = input_size
        self.token_normalization: TokenNormalization = token_normalization
        self.match_mirrors = match_mirrors
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None or every_n_steps is not None else 1
        self.every_n_steps = every_n_steps
        self.check_at_start = check_at_start
        self.check_at_end = check_at_end
        self.seeds = list(range(seed, seed + num_samples))
        self.sample_steps = sample_steps
        self.sampler = sampler
        self.sample_batch_size = sample_batch_size
        self.thresholds = sorted(float(t) for t in thresholds)
        self.top_k = top_k
        self.num_copies_shown = num_copies_shown
        self.embed_batch_size = embed_batch_size
        self.histogram_bins = histogram_bins
        self.verbose = verbose

        self.history: list[dict[str, float]] = []
        self.timings: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.descriptor: Descriptor | None = None
        self.similarity: SimilarityKind = "cosine"
        self.reference: Dataset | None = None
        self.reference_names: list[str] = []
        self.train_features: Tensor | None = None
        self.mirror_features: Tensor | None = None
        self.baseline_scores: Tensor | None = None
        self.baseline: ReplicationStats | None = None
        self.duplicates: list[tuple[int, int, float]] = []
        self.log_dir: Path | None = None
        self.latest: dict[str, Any] = {}

    # ------------------------------------------------------------------ state
    @property
    def state_key(self) -> str:
        return self._generate_state_key(descriptor=self.descriptor_name, seeds=(self.seeds[0], len(self.seeds)))

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
        if self.descriptor is None:
            self.descriptor = self.descriptor_config.build()
            self.descriptor.requires_grad_(False)
            self.similarity = self.descriptor_config.resolved_similarity(self.descriptor)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Embed the training subset once (sharded across ranks) and compute the baseline."""
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
        result = self_similarity(self.train_features, k=max(self.top_k, 10), similarity=self.similarity,
                                 normalization=self.token_normalization, mirrored=self.mirror_features)
        self.baseline_scores = result.scores[:, 0].float()
        self.baseline = replication_stats(self.baseline_scores, self.thresholds)
        self.duplicates = duplicate_pairs(result)
        self.log_dir = Path(trainer.log_dir) if trainer.log_dir is not None else None
        if trainer.is_global_zero and self.log_dir is not None:
            write_json(self.log_dir / "replication" / "descriptor.json",
                       {"descriptor": self.descriptor_config.record(self.descriptor)})
        self.timings["reference"] += time.perf_counter() - started

    def _embed_reference(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, Tensor | None]:
        """Features of the training images (and of their mirrors, in the same pass), sharded over
        ranks and gathered by index (``lit.embedding.embed_dataset``)."""
        assert self.reference is not None and self.descriptor is not None
        descriptor = self.descriptor

        def both(images: Tensor) -> Tensor:  # (B, 2, ...): as is, mirrored
            return torch.stack([descriptor(images), descriptor(torch.flip(images, dims=[-1]))], dim=1)

        embedded = embed_dataset(both if self.match_mirrors else descriptor, self.reference,
                                 batch_size=self.embed_batch_size, device=pl_module.device,
                                 rank=trainer.global_rank, world_size=trainer.world_size,
                                 gather_device=trainer.strategy.root_device, desc="training images")
        if embedded.index.numel() != len(self.reference) or not torch.equal(embedded.index,
                                                                              torch.arange(len(self.reference))):
            raise ValueError(f"reference_dataset indices must be 0..{len(self.reference) - 1}, got "
                             f"{embedded.index.numel()} distinct values (unreadable: {embedded.skipped[:3]})")
        if not self.match_mirrors:
            return embedded.features, None
        return embedded.features[:, 0].contiguous(), embedded.features[:, 1].contiguous()

    @torch.no_grad()
    def _embed(self, images: Tensor, device: torch.device) -> Tensor:
        """Descriptor features (float32, CPU) of [0, 1] images, in batches."""
        assert self.descriptor is not None
        out = [self.descriptor(images[i:i + self.embed_batch_size].to(device)).float().cpu()
               for i in range(0, images.shape[0], self.embed_batch_size)]
        return torch.cat(out) if out else torch.empty(0)

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
        """Sample, embed, search, gather; log on rank 0; append to the history. Returns the row."""
        assert self.train_features is not None and self.baseline is not None
        clock = time.perf_counter()
        positions = list(range(trainer.global_rank, len(self.seeds), trainer.world_size))
        images = pl_module.sample([self.seeds[p] for p in positions], steps=self.sample_steps,
                                  sampler=self.sampler, batch_size=self.sample_batch_size)
        clock = self._tick("sampling", clock)
        features = self._embed(images, pl_module.device)
        clock = self._tick("embedding", clock)
        k = min(self.top_k, self.train_features.shape[0])
        scores, matches = torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
        flipped = torch.zeros(0, k, dtype=torch.long)
        if features.shape[0]:
            both = mirror_aware_search(features, self.train_features, self.mirror_features, k,
                                       similarity=self.similarity, normalization=self.token_normalization)
            scores, matches, flipped = both.result.scores.float(), both.result.indices, both.mirrored.long()
        mine = torch.tensor(positions, dtype=torch.long)
        index, scores, matches, flipped = self._gather(trainer, mine, scores, matches, flipped)
        if index.numel() != len(self.seeds):
            raise RuntimeError(f"gathered {index.numel()} of {len(self.seeds)} generations across ranks")
        top1 = scores[:, 0]
        stats = replication_stats(top1, self.thresholds)
        shown = top_copies(top1, self.num_copies_shown)
        keep = torch.isin(mine, shown)
        _, copies = self._gather(trainer, mine[keep], images[keep])  # rows of `shown`, sorted by position
        order = torch.argsort(torch.argsort(shown))  # positions of `shown` within the sorted gather
        copies = copies[order]
        clock = self._tick("search", clock)

        row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "num_samples": len(self.seeds),
               **stats.as_dict()}
        self.history.append(row)
        self.latest = {"top1": top1, "scores": scores, "matches": matches, "mirrored": flipped.bool(),
                       "shown": shown, "copies": copies}
        self._log_through_lightning(trainer, pl_module, stats)
        if trainer.is_global_zero:
            self._log(trainer, stats)
        self._tick("logging", clock)
        return row

    def _log_through_lightning(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                               stats: ReplicationStats) -> None:
        """The check's scalars into ``trainer.callback_metrics`` (every rank, identical values),
        for ModelCheckpoint / EarlyStopping; the loggers get them from :meth:`_log` at the check's step."""
        assert self.baseline is not None
        values = {f"replication/{k}": float(v) for k, v in stats.as_dict().items()}
        values.update({f"replication_baseline/{k}": float(v) for k, v in self.baseline.as_dict().items()})
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
    def _log(self, trainer: pl.Trainer, stats: ReplicationStats) -> None:
        assert self.baseline is not None and self.baseline_scores is not None
        step = trainer.global_step
        scalars = {f"replication/{k}": v for k, v in stats.as_dict().items()}
        scalars.update({f"replication_baseline/{k}": v for k, v in self.baseline.as_dict().items()})
        scalars.update({f"replication_time/{k}": v for k, v in self.timings.items()})
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                writer.add_histogram("replication/top1_generations", self.latest["top1"], step)
                writer.add_histogram("replication_baseline/top1_training", self.baseline_scores, step)
                writer.add_figure("replication/similarity_histogram", self.histogram_figure(), step)
                writer.add_figure("replication/top_copies", self.copies_figure(), step)
        if self.log_dir is not None:
            self._write_scores(step)
            write_text_atomic(self.log_dir / HISTORY_FILE, self.history_csv())

    def histogram_figure(self) -> Any:
        """The Fig. 5 overlay of the latest check."""
        assert self.baseline_scores is not None
        return similarity_histogram(self.latest["top1"], self.baseline_scores, self.thresholds,
                                    bins=self.histogram_bins,
                                    title=f"top-1 similarity ({self.descriptor_config.display_name})")

    def _copies(self) -> tuple[Tensor, Tensor, Tensor, list[str], list[list[str]]]:
        """Generations, their training matches, scores and labels for the top-copies grid
        (read from the training set once per check: the TensorBoard grid and the summary share it)."""
        if "grid" not in self.latest:
            self.latest["grid"] = self._read_copies()
        return self.latest["grid"]

    def _read_copies(self) -> tuple[Tensor, Tensor, Tensor, list[str], list[list[str]]]:
        assert self.reference is not None
        shown = self.latest["shown"]
        scores = self.latest["scores"][shown]
        matches = self.latest["matches"][shown]
        mirrored = self.latest["mirrored"][shown]
        images = torch.stack([torch.stack([self._training_image(int(j), bool(m)) for j, m in zip(row, flips)])
                              for row, flips in zip(matches, mirrored)])
        labels = [f"seed {self.seeds[int(p)]}" for p in shown]
        match_labels = [[self._name(int(j)) + (" (mirror)" if m else "") for j, m in zip(row, flips)]
                        for row, flips in zip(matches, mirrored)]
        return self.latest["copies"], images, scores, labels, match_labels

    def copies_figure(self) -> Any:
        """Fig. 3 / 4 grid of the latest check."""
        generations, images, scores, labels, match_labels = self._copies()
        return top_copies_grid(generations, images, scores, labels, match_labels)

    def _training_image(self, row: int, mirrored: bool) -> Tensor:
        """Training image ``row`` as matched (mirrored when the match was its mirror)."""
        assert self.reference is not None
        image = self.reference[row]["image"]
        return torch.flip(image, dims=[-1]) if mirrored else image

    def _name(self, row: int) -> str:
        if row < 0:
            return "-"
        name = Path(self.reference_names[row]).name if row < len(self.reference_names) else ""
        return f"train #{row}" if name in ("", str(row)) else f"#{row} {name}"[:24]

    def _write_scores(self, step: int) -> None:
        assert self.log_dir is not None
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        k = self.latest["scores"].shape[1]
        writer.writerow(["seed", *[f"score_{i + 1}" for i in range(k)], *[f"train_index_{i + 1}" for i in range(k)],
                         *[f"mirrored_{i + 1}" for i in range(k)]])
        rows = zip(self.latest["scores"].tolist(), self.latest["matches"].tolist(), self.latest["mirrored"].tolist())
        for p, (s, m, f) in enumerate(rows):
            writer.writerow([self.seeds[p], *[f"{v:.6f}" for v in s], *m, *[int(x) for x in f]])
        write_text_atomic(self.log_dir / "replication" / f"scores_step_{step:07d}.csv", buffer.getvalue())

    def history_csv(self) -> str:
        """The history as CSV text (one row per check), baseline as the last row."""
        buffer = io.StringIO()
        columns = ["step", "epoch", "num_samples", *self._metric_names()]
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.baseline is not None:
            base = {k: f"{v:.6f}" for k, v in self.baseline.as_dict().items()}
            writer.writerow({"step": "baseline", "epoch": "", "num_samples": self.baseline.count, **base})
        return buffer.getvalue()

    def _metric_names(self) -> list[str]:
        return stat_names(self.thresholds)

    # ------------------------------------------------------------------ end of fit
    def _write_summary(self, trainer: pl.Trainer) -> None:
        if not self.history or self.log_dir is None or not self.latest:
            return  # the history CSV is current: the last check's _log wrote it
        steps = self.checked_steps()
        rates = {f"rate@{format_threshold(t)}": [row[f"rate@{format_threshold(t)}"] for row in self.history]
                 for t in self.thresholds}
        assert self.baseline is not None and self.baseline_scores is not None
        base_rates = {k: v for k, v in self.baseline.as_dict().items() if k in rates}
        generations, images, scores, labels, match_labels = self._copies()
        figure = replication_summary(
            steps, rates, self.latest["top1"], self.baseline_scores, generations, images, scores,
            self.thresholds, labels, match_labels, base_rates,
            title=f"replication of {len(self.seeds)} generations ({self.descriptor_config.display_name} descriptor)",
        )
        png = save_figure(figure, self.log_dir / SUMMARY_FILE)
        if self.verbose:
            print(self.summary_text(trainer, png), flush=True)

    def summary_text(self, trainer: pl.Trainer, png: Path | None = None) -> str:
        """The rate over time as a table, the baseline, the time spent, and where the files are."""
        names = self._metric_names()[: len(self.thresholds) + 2]
        header = f"{'step':>8} {'epoch':>6} " + " ".join(f"{n:>11}" for n in names)
        lines = [f"Replication over training: {len(self.seeds)} generations (fixed seeds) vs "
                 f"{len(self.reference or [])} training images, {self.descriptor_config.display_name} descriptor; "
                 f"rate@t = share of generations whose nearest training image scores > t", header]
        for row in self.history:
            lines.append(f"{int(row['step']):>8} {int(row['epoch']):>6} " + " ".join(f"{row[n]:>11.3f}" for n in names))
        if self.baseline is not None:
            base = self.baseline.as_dict()
            lines.append(f"{'baseline':>8} {'':>6} " + " ".join(f"{base[n]:>11.3f}" for n in names)
                         + "   (training images vs each other)")
            lines.append(f"training images with a near-duplicate (> {DUPLICATE_THRESHOLD}) among the others: "
                         f"{len(self.duplicates)} pair(s)")
        total = sum(self.timings.values())
        lines.append("monitor time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()) + f" (total {total:.1f}s)")
        tensorboard = [lg.log_dir for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if tensorboard:
            lines.append(f"TensorBoard logs: {tensorboard[0]}  (tensorboard --logdir {Path(tensorboard[0]).parent})")
        if self.log_dir is not None:
            lines.append(f"history CSV: {self.log_dir / HISTORY_FILE}")
        if png is not None:
            lines.append(f"summary PNG (rates over time, histogram overlay, top copies): {png}")
        return "\n".join(lines)

