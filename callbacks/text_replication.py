"""``TextReplicationMonitor``: watch a text-conditioned diffusion model memorize its training captions.

The :class:`callbacks.replication.ReplicationMonitor` for text-to-image models: every check
generates from the same fixed ``(caption, seed)`` pairs, drawn once with the seed from the
training captions (``datamodule.monitor_pairs``: half from the duplicated images, half from
the unique ones when duplication is on), records each generation's memorization score from the
guidance batch the sampler computes anyway (:class:`models.generation.MemorizationScorer`), and
searches the training set as the parent does. Beside the parent's scalars it logs, per group of
captions (:func:`lit.text_replication.group_statistics`):

- ``replication/{duplicated,unique}/rate@t``, ``.../top1_p95`` and ``.../own_share`` (the top-1
  match is the caption's own training image), ``replication/own_share``;
- ``memorization/{duplicated,unique}/score_mean`` (and ``score_first_mean``),
  ``memorization/auc_duplicated`` (the score separating the two groups) and
  ``memorization/auc_copied@t`` (the score against "top-1 above t", first threshold);

through ``pl_module.log`` as the parent does, so ModelCheckpoint and EarlyStopping can act on any
of them. The top-copies grid names each generation's caption. ``score_only``: the training-data-free
monitor: no descriptor, no training-set embedding, no search; only the ``memorization/`` scalars.

At fit end it prints the steps-by-group table (:func:`lit.text_replication.group_table`) and writes
``text_replication_history.csv`` (every scalar of every check) and ``monitor_pairs.csv`` (the
pairs: key, caption, seed, group) to the log folder.

The LightningModule must provide ``sample(captions, seeds, steps=, guidance_scale=, batch_size=)``
and ``pipeline()`` (e.g. :class:`models.text_diffusion.TextDiffusionModule`); the datamodule
``monitor_pairs(count, seed)``, ``reference_dataset()`` and ``keys`` (e.g.
:class:`datamodules.captioned.CaptionedImageDataModule`). DDP, resume and the cadence are the parent's.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from callbacks.replication import ReplicationMonitor
from lit.files import write_text_atomic
from lit.replication import Matches
from lit.text_replication import GROUPS, group_statistics, group_table, own_rows, score_statistics
from models.generation import GUIDANCE_BATCH, MemorizationScorer, empty_prompt_embedding

TEXT_HISTORY_FILE = "text_replication_history.csv"
PAIRS_FILE = "monitor_pairs.csv"


class TextReplicationMonitor(ReplicationMonitor):
    """Track replication and the memorization score of a text-to-image model during ``fit``, per
    group of training captions (duplicated / unique).

    Args (beside :class:`callbacks.replication.ReplicationMonitor`'s; ``num_samples`` is the
    number of ``(caption, seed)`` pairs, ``sampler`` is not used: the model's pipeline samples):
        guidance_scale: classifier-free guidance of the generations (default: the model's);
            must be above 1, since the score reads the guidance batch.
        score_only: log the memorization score only: no descriptor, no training-set search.
    """

    def __init__(self, *args: Any, guidance_scale: float | None = None, score_only: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if guidance_scale is not None and guidance_scale <= 1:
            raise ValueError(f"guidance_scale must be > 1 (the score reads the guidance batch), got {guidance_scale}")
        self.guidance_scale = guidance_scale
        self.score_only = score_only
        self.pairs: list[tuple[str, str, bool]] = []
        self.captions: list[str] = []
        self.duplicated = torch.zeros(0, dtype=torch.bool)
        self.own_rows: Tensor | None = None
        self._scores: dict[int, tuple[float, float]] = {}  # this rank's (mean, first) score by position

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not callable(getattr(pl_module, "pipeline", None)):
            raise TypeError(f"TextReplicationMonitor needs a text-conditioned model with sample(captions, seeds) and "
                            f"pipeline() (models.text_diffusion.TextDiffusionModule), got {type(pl_module).__name__}")
        if self.score_only:
            if trainer.world_size > len(self.seeds):
                raise ValueError(f"num_samples ({len(self.seeds)}) must be at least the number of processes "
                                 f"({trainer.world_size})")
            return  # no descriptor to build
        super().setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        if datamodule is None or not callable(getattr(datamodule, "monitor_pairs", None)):
            raise ValueError("TextReplicationMonitor needs a datamodule with monitor_pairs(count, seed) "
                             "(datamodules.captioned.CaptionedImageDataModule)")
        self.pairs = list(datamodule.monitor_pairs(len(self.seeds), self.seed))
        if len(self.pairs) != len(self.seeds):
            raise ValueError(f"monitor_pairs gave {len(self.pairs)} pairs for {len(self.seeds)} seeds")
        self.captions = [caption for _, caption, _ in self.pairs]
        self.duplicated = torch.tensor([dup for _, _, dup in self.pairs], dtype=torch.bool)
        self.log_dir = Path(trainer.log_dir) if trainer.log_dir is not None else None
        if trainer.is_global_zero and self.log_dir is not None:
            write_text_atomic(self.log_dir / PAIRS_FILE, self.pairs_csv())
        if self.score_only:
            return
        super().on_fit_start(trainer, pl_module)
        self.own_rows = own_rows([key for key, _, _ in self.pairs], list(datamodule.keys))

    def pairs_csv(self) -> str:
        """The monitored pairs: position, key, caption, seed, group."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["position", "key", "caption", "seed", "group"])
        for position, ((key, caption, dup), seed) in enumerate(zip(self.pairs, self.seeds)):
            writer.writerow([position, key, caption, seed, GROUPS[0] if dup else GROUPS[1]])
        return buffer.getvalue()

    # ------------------------------------------------------------------ one check
    def _generate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, positions: list[int]) -> Tensor:
        """This rank's generations from its pairs, and their memorization scores (kept by position)."""
        pipeline = pl_module.pipeline()
        scorer = MemorizationScorer(pipeline.unet, lambda: empty_prompt_embedding(pipeline), GUIDANCE_BATCH)
        size = self.sample_batch_size or getattr(pl_module.hparams, "sample_batch_size", 16)
        chunks: list[Tensor] = []
        self._scores = {}
        for start in range(0, len(positions), size):
            chunk = positions[start:start + size]
            with scorer.recording(len(chunk)) as trace:
                chunks.append(pl_module.sample([self.captions[p] for p in chunk], [self.seeds[p] for p in chunk],
                                               steps=self.sample_steps, guidance_scale=self.guidance_scale,
                                               batch_size=len(chunk)))
            self._scores.update(zip(chunk, zip(trace.mean.tolist(), trace.first.tolist())))
        if not chunks:
            return torch.empty(0, 3, 1, 1)
        return torch.cat(chunks)

    def _gathered_scores(self, trainer: pl.Trainer, positions: list[int]) -> tuple[Tensor, Tensor]:
        """Every rank's scores, ordered by position."""
        index = torch.tensor(positions, dtype=torch.long)
        mean = torch.tensor([self._scores[p][0] for p in positions], dtype=torch.float64)
        first = torch.tensor([self._scores[p][1] for p in positions], dtype=torch.float64)
        _, mean, first = self._gather(trainer, index, mean, first)
        if mean.numel() != len(self.seeds):
            raise RuntimeError(f"gathered {mean.numel()} of {len(self.seeds)} memorization scores across ranks")
        return mean, first

    def _extra_statistics(self, trainer: pl.Trainer, matches: Matches, positions: list[int]) -> dict[str, float]:
        assert self.own_rows is not None
        mean, first = self._gathered_scores(trainer, positions)
        own = matches.indices[:, 0] == self.own_rows
        return group_statistics(matches.top1, own, mean, first, self.duplicated, self.thresholds)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        if not self.score_only:
            return super().check(trainer, pl_module)
        clock = time.perf_counter()
        positions = list(range(trainer.global_rank, len(self.seeds), trainer.world_size))
        self._generate(trainer, pl_module, positions)
        mean, first = self._gathered_scores(trainer, positions)
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch, "num_samples": len(self.seeds),
               **score_statistics(mean, first, self.duplicated)}
        self.history.append(row)
        values = {k: float(v) for k, v in row.items() if k not in ("step", "epoch", "num_samples")}
        self._log_values(trainer, pl_module, values)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
            if self.log_dir is not None:
                write_text_atomic(self.log_dir / TEXT_HISTORY_FILE, self.text_history_csv())
        self._tick("sampling", clock)
        return row

    def _log(self, trainer: pl.Trainer, row: dict[str, Any]) -> None:
        super()._log(trainer, row)
        if self.log_dir is not None:
            write_text_atomic(self.log_dir / TEXT_HISTORY_FILE, self.text_history_csv())

    def _read_copies(self) -> tuple[Tensor, Tensor, Tensor, list[str], list[list[str]]]:
        generations, images, scores, labels, match_labels = super()._read_copies()
        shown = self.latest["shown"].tolist()
        labels = [f"{label}: {self._short(self.captions[p])}" for label, p in zip(labels, shown)]
        return generations, images, scores, labels, match_labels

    @staticmethod
    def _short(caption: str, width: int = 40) -> str:
        return caption if len(caption) <= width else caption[: width - 3] + "..."

    # ------------------------------------------------------------------ end of fit
    def text_history_csv(self) -> str:
        """Every scalar of every check, one row per check."""
        keys: list[str] = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
        return buffer.getvalue()

    def _write_summary(self, trainer: pl.Trainer) -> None:
        if not self.score_only:
            super()._write_summary(trainer)
        if self.verbose and self.history:
            title = (f"Memorization of training captions: {int(self.duplicated.sum())} duplicated and "
                     f"{int((~self.duplicated).sum())} unique captions, one fixed seed each")
            where = f"history CSV: {self.log_dir / TEXT_HISTORY_FILE}" if self.log_dir is not None else ""
            print("\n".join([title, group_table(self.history, min(self.thresholds), score_only=self.score_only),
                             where]), flush=True)
