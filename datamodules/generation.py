"""What ``lit generate`` generates: prompts -> jobs (one per image, each with its own seed) -> global
batches handed to ranks whole.

- :func:`generation_jobs`: one :class:`GenerationJob` per (prompt, image index): the image file
  ``images/p{prompt_index:06d}_i{image_index}.png``, the prompt, its source key, the seed
  ``derive_seed(seed, prompt_index, image_index)`` (with an ablation, every variant takes the
  seeds of prompt 0: the same seed per image index, so only the words differ);
- :func:`global_batches`: fixed consecutive chunks of ``batch_size`` jobs of the whole job list,
  numbered from 0. A batch is one pipeline call whatever the number of processes, so its images
  are the same bytes on 1 or N ranks; a batch is also the unit of resumption;
- :class:`GenerationDataModule`: reads the prompt source (:mod:`datamodules.prompts`), and hands
  this rank the batches not yet done, round-robin (``configure``, called by
  :class:`callbacks.generation_writer.GenerationWriter` once it knows which are done).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, IterableDataset

from datamodules.extraction_inputs import self_batching_loader
from datamodules.prompts import Prompt, PromptSourceRows, ablation_prompts, draw_prompts, read_prompt_source
from lit.errors import UserError
from lit.seeding import derive_seed

IMAGES = "images"
"""Folder of the images inside the output folder."""


@dataclass(frozen=True)
class GenerationJob:
    """One image to generate: where it goes (relative to the output folder), from which prompt and seed."""

    file: str
    prompt: str
    source_key: str | None
    seed: int
    prompt_index: int
    image_index: int
    variant: str = ""


@dataclass(frozen=True)
class GenerationBatch:
    """A global batch: its number and its jobs (consecutive in the job list)."""

    number: int
    jobs: tuple[GenerationJob, ...]


def image_file(prompt_index: int, image_index: int) -> str:
    """``images/p000012_i0.png``: the file of a prompt's image, relative to the output folder."""
    return f"{IMAGES}/p{prompt_index:06d}_i{image_index}.png"


def generation_jobs(prompts: Sequence[Prompt], images_per_prompt: int, seed: int, *,
                    same_seeds: bool = False) -> list[GenerationJob]:
    """Every image of a run, by prompt then image index. ``same_seeds`` (ablations): every prompt
    takes prompt 0's seeds, ``derive_seed(seed, 0, image_index)``."""
    if images_per_prompt < 1:
        raise UserError(f"--images_per_prompt must be >= 1, got {images_per_prompt}")
    return [GenerationJob(image_file(p.index, i), p.text, p.source_key,
                          derive_seed(seed, 0 if same_seeds else p.index, i), p.index, i, p.variant)
            for p in prompts for i in range(images_per_prompt)]


def global_batches(jobs: Sequence[GenerationJob], batch_size: int) -> list[GenerationBatch]:
    """The job list cut into consecutive batches of ``batch_size`` (the last may be smaller)."""
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    return [GenerationBatch(n, tuple(jobs[start:start + batch_size]))
            for n, start in enumerate(range(0, len(jobs), batch_size))]


def prompts_fingerprint(prompts: Sequence[Prompt]) -> str:
    """SHA-256 of the run's prompts (index, text, key, variant, in order): a resumed run checks it."""
    payload = json.dumps([[p.index, p.text, p.source_key, p.variant] for p in prompts], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


#: The batch a rank with nothing left to do gets: Lightning skips a rank's predict loop (and its
#: end hooks, with their barrier) when it has no batch; an empty one keeps every rank in step.
NOTHING_LEFT = GenerationBatch(-1, ())


class BatchStream(IterableDataset):
    """This rank's batches, one item each: ``{"batch": number, "jobs": [job as a dict, ...]}``
    (:data:`NOTHING_LEFT` alone when it has none)."""

    def __init__(self, batches: Sequence[GenerationBatch]) -> None:
        self.batches = list(batches) or [NOTHING_LEFT]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.batches:
            yield {"batch": batch.number, "jobs": [asdict(job) for job in batch.jobs]}


class GenerationDataModule(pl.LightningDataModule):
    """The prompts of a ``lit generate`` run as global batches of jobs (used with
    :class:`models.generation.TextToImageGenerator` and :class:`callbacks.generation_writer.GenerationWriter`).

    Args:
        prompts: a prompt source: ``.txt`` (one a line), ``.csv`` / ``.tsv`` / ``.jsonl`` (caption
            column, optional key column), a feature store with captions, webdataset tars.
        ablate: instead of ``prompts``, one prompt and its word-ablation variants (paper Fig. 10),
            all generated with the same seeds.
        n: draw this many prompts with ``seed`` (default: every prompt once, in order).
        seed: seeds the draw and every image (``derive_seed(seed, prompt_index, image_index)``).
        replacement: draw with replacement.
        images_per_prompt: images per prompt, each with its own seed.
        batch_size: images per pipeline call (keep it when resuming: batches are the unit of resumption).
        caption_column, key_column: the columns of a table source (default: found by name).
    """

    def __init__(
        self,
        prompts: str | None = None,
        ablate: str | None = None,
        n: int | None = None,
        seed: int = 0,
        replacement: bool = False,
        images_per_prompt: int = 1,
        batch_size: int = 4,
        caption_column: str | None = None,
        key_column: str | None = None,
    ) -> None:
        super().__init__()
        if (prompts is None) == (ablate is None):
            raise UserError("give --prompts SOURCE or --ablate \"PROMPT\" (one of them)")
        if ablate is not None and (n is not None or replacement or caption_column or key_column):
            raise UserError("--ablate generates the prompt's own variants: --n, --replacement and the column "
                            "options apply to --prompts")
        if n is not None and n < 1:
            raise UserError(f"--n must be >= 1, got {n}")
        if images_per_prompt < 1:
            raise UserError(f"--images_per_prompt must be >= 1, got {images_per_prompt}")
        if batch_size < 1:
            raise UserError(f"--batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()
        self.source, self.ablate = prompts, ablate
        self.n, self.seed, self.replacement = n, seed, replacement
        self.images_per_prompt, self.batch_size = images_per_prompt, batch_size
        self.caption_column, self.key_column = caption_column, key_column
        self._rows: PromptSourceRows | None = None
        self._prompts: list[Prompt] | None = None
        self._stream: BatchStream | None = None

    @property
    def rows(self) -> PromptSourceRows | None:
        """The prompt source as read (None with ``ablate``)."""
        if self._rows is None and self.source is not None:
            try:
                self._rows = read_prompt_source(self.source, caption_column=self.caption_column,
                                                key_column=self.key_column)
            except UserError as error:
                raise UserError(f"--prompts {self.source}: {error}") from None
        return self._rows

    @property
    def prompts(self) -> list[Prompt]:
        """The run's prompts, ``index`` 0, 1, ... (read and drawn once)."""
        if self._prompts is None:
            if self.ablate is not None:
                try:
                    self._prompts = ablation_prompts(self.ablate)
                except UserError as error:
                    raise UserError(f"--ablate: {error}") from None
            else:
                rows = self.rows
                assert rows is not None
                try:
                    self._prompts = draw_prompts(rows, self.n, self.seed, self.replacement)
                except UserError as error:
                    raise UserError(f"--n: {error}") from None
        return self._prompts

    @property
    def jobs(self) -> list[GenerationJob]:
        return generation_jobs(self.prompts, self.images_per_prompt, self.seed, same_seeds=self.ablate is not None)

    @property
    def batches(self) -> list[GenerationBatch]:
        """Every global batch of the run."""
        return global_batches(self.jobs, self.batch_size)

    def record(self) -> dict[str, Any]:
        """The prompts and job options for the manifest (what the images depend on)."""
        rows = self.rows
        source = None if rows is None else {
            "path": str(rows.path), "kind": rows.kind, "rows": len(rows.rows), "skipped": dict(rows.skipped),
            "caption_column": rows.caption_column, "key_column": rows.key_column}
        return {"source": source, "ablate": self.ablate, "n": self.n, "seed": self.seed,
                "replacement": self.replacement, "images_per_prompt": self.images_per_prompt,
                "batch_size": self.batch_size, "prompts": len(self.prompts),
                "prompts_sha256": prompts_fingerprint(self.prompts)}

    def configure(self, done: set[int] | frozenset[int], rank: int = 0, world_size: int = 1) -> BatchStream:
        """Hand this rank its share of the batches not in ``done``: the pending ones, round-robin."""
        pending = [batch for batch in self.batches if batch.number not in done]
        self._stream = BatchStream(pending[rank::world_size])
        return self._stream

    def predict_dataloader(self) -> DataLoader:
        if self._stream is None:
            raise UserError("GenerationDataModule needs a callbacks.generation_writer.GenerationWriter in "
                            "trainer.callbacks (it says where the images go and which batches are done)")
        return self_batching_loader(self._stream)
