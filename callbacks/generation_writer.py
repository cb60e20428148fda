"""Write what ``lit generate`` generates: images, rows, the manifest; resume a killed run batch by batch.

Used with :class:`models.generation.TextToImageGenerator` and
:class:`datamodules.generation.GenerationDataModule`. The output folder (``OUT``) holds:

- ``images/p{prompt_index:06d}_i{image_index}.png``: the images (PNG, RGB; none with ``score_only``);
- ``generations.csv``: one row per image, sorted by (prompt_index, image_index), columns
  :data:`COLUMNS` (``file`` relative to OUT, empty with ``score_only``; ``prompt`` the source
  prompt, ``generated_prompt`` the one the image was made from: the same unless ``random_words``
  added words);
- ``prompts.csv``: one row per prompt, columns :data:`PROMPT_COLUMNS` (scores: means over its images);
- ``generate_manifest.json``: the pipeline (path, SHA-256 of every file), the scheduler, every
  argument, the mitigations, the score's mode, the prompts (source, count, fingerprint, truncated ones), a summary;
- ``.lit-generate`` (the marker: the folder is lit generate's own) and ``.lit-generate-batches/``:
  one row file per finished batch (rows with each image's SHA-256), written after its images.

Before predicting, rank 0 claims and locks OUT (a folder holding anything lit generate did not
write is refused; a second writer is refused), compares the manifest of an earlier run with this
one (any argument that changes an image differs: refused with one line naming it), and lists
the batches done: a batch is done when its row file matches its jobs and every image it names
is there with its recorded SHA-256. Every rank gets its share of the rest, writes each image
atomically, then the batch's row file. At the end rank 0 (after a barrier) merges the row files
into the CSVs and completes the manifest: a killed run completed by a rerun gives the same bytes
as an uninterrupted one, and 1 or N processes give the same bytes (batches are global).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

from datamodules.generation import IMAGES, GenerationBatch, GenerationDataModule
from lit.distributed import all_gather_objects
from lit.errors import UserError
from lit.files import claim_folder, file_sha256, folder_lock, write_bytes_atomic, write_json, write_text_atomic
from models.generation import TextToImageGenerator

FORMAT = "lit-generate/1"
MARKER = ".lit-generate"
LOCK = ".lit-generate.lock"
BATCHES = ".lit-generate-batches"
MANIFEST = "generate_manifest.json"
GENERATIONS = "generations.csv"
PROMPTS = "prompts.csv"
COLUMNS = ("file", "prompt", "generated_prompt", "source_key", "seed", "memorization_score", "memorization_score_first",
           "prompt_index", "image_index", "variant")
PROMPT_COLUMNS = ("prompt_index", "prompt", "source_key", "variant", "images", "memorization_score",
                  "memorization_score_first")
#: Arguments a resumed run must share with the run it completes (each changes images or rows);
#: the pipeline and the prompts are compared by content (SHA-256), not by path.
RESUME_ARGUMENTS = ("ablate", "n", "seed", "replacement", "images_per_prompt", "batch_size", "steps", "guidance",
                    "scheduler", "height", "width", "negative_prompt", "score_only", "score_steps",
                    "embedding_noise", "random_words")
#: ``precision`` is compared by the dtype it runs in here (``auto`` and ``32`` are the same on a CPU).
_TEMPORARY = re.compile(r"^\..+\.tmp$")  # lit.files.atomic_path's temporary files
_ROW_FILE = re.compile(r"^b\d{6}\.json$")  # batch_file's names


class PromptTruncationWarning(UserWarning):
    """Prompts longer than the tokenizer's limit were truncated (as the pipeline does), and counted."""


def batch_file(out: Path, number: int) -> Path:
    return out / BATCHES / f"b{number:06d}.json"


def png_bytes(image: Any) -> bytes:
    """The image as PNG bytes (PIL's encoder, default settings: the bytes ``image.save(f)`` writes)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def batch_done(out: Path, batch: GenerationBatch) -> bool:
    """Whether ``batch`` is finished in ``out``: its row file holds exactly its jobs, and every image
    it names is there with the recorded SHA-256 (a missing or changed image makes the whole batch
    be generated again: a batch is one computation)."""
    try:
        rows = json.loads(batch_file(out, batch.number).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(rows, list) or len(rows) != len(batch.jobs):
        return False
    for row, job in zip(rows, batch.jobs):
        if not isinstance(row, dict) or (row.get("prompt"), row.get("seed"), row.get("prompt_index"),
                                         row.get("image_index")) != (job.prompt, job.seed, job.prompt_index,
                                                                     job.image_index):
            return False
        if row.get("file"):
            image = out / row["file"]
            if row["file"] != job.file or not image.is_file() or file_sha256(image) != row.get("sha256"):
                return False
    return True


def resume_differences(before: dict[str, Any], now: dict[str, Any]) -> str | None:
    """Why the run recorded in ``before`` (a manifest) cannot be completed by ``now``, or None."""
    old, new = before.get("arguments") or {}, now["arguments"]
    for name in RESUME_ARGUMENTS:
        if old.get(name) != new.get(name):
            return f"the run there has --{name} {_shown(old.get(name))}, this one --{name} {_shown(new.get(name))}"
    if old.get("dtype") != new.get("dtype"):
        return f"--precision {new['precision']} runs in {new['dtype']} here, the run there ran in {old.get('dtype')}"
    files_before = (before.get("pipeline") or {}).get("sha256") or {}
    files_now = now["pipeline"]["sha256"]
    if files_before != files_now:
        changed = sorted(set(files_before) ^ set(files_now)) or sorted(
            name for name in files_now if files_before.get(name) != files_now[name])
        return f"--pipeline {new['pipeline']}: not the pipeline the run there used (differs in {changed[0]})"
    if (before.get("prompts") or {}).get("sha256") != now["prompts"]["sha256"]:
        return f"--prompts {new.get('prompts') or new.get('ablate')}: not the prompts the run there used"
    return None


def _shown(value: Any) -> str:
    return "(not given)" if value is None else json.dumps(value) if isinstance(value, str) else str(value)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def csv_text(header: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in header])
    return buffer.getvalue()


def prompt_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per prompt (in index order): its images' count and mean scores."""
    grouped: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        grouped.setdefault(int(row["prompt_index"]), []).append(row)
    result = []
    for index in sorted(grouped):
        group = grouped[index]
        result.append({"prompt_index": index, "prompt": group[0]["prompt"], "source_key": group[0]["source_key"],
                       "variant": group[0]["variant"], "images": len(group),
                       "memorization_score": float(np.mean([r["memorization_score"] for r in group])),
                       "memorization_score_first": float(np.mean([r["memorization_score_first"] for r in group]))})
    return result


class GenerationWriter(BasePredictionWriter):
    """Writes ``lit generate``'s images, ``generations.csv``, ``prompts.csv`` and manifest into
    ``output_dir`` (new, empty, or an earlier run's to complete with the same arguments).

    After the run, on rank 0, :attr:`summary` says what was done (images written now, batches
    found done, the mean score, truncated prompts, seconds)."""

    def __init__(self, output_dir: str) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir).expanduser()
        self.summary: dict[str, Any] | None = None
        self._hold = ExitStack()
        self._manifest: dict[str, Any] = {}
        self._written = 0
        self._batches_done_before = 0
        self._started = 0.0

    # ------------------------------------------------------------------ set-up: claim, compare, plan
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        if not isinstance(pl_module, TextToImageGenerator):
            raise UserError(f"GenerationWriter needs model models.generation.TextToImageGenerator, "
                            f"got {type(pl_module).__name__}")
        datamodule = trainer.datamodule
        if not isinstance(datamodule, GenerationDataModule):
            raise UserError(f"GenerationWriter needs data datamodules.generation.GenerationDataModule, "
                            f"got {type(datamodule).__name__}")
        trainer.predict_loop.return_predictions = False  # the folder keeps them, not RAM
        error: str | None = None
        done: list[int] = []
        if trainer.is_global_zero:
            try:
                done = self._open(trainer, pl_module, datamodule)
            except UserError as refusal:
                self._hold.close()
                error = str(refusal)
        error, done = trainer.strategy.broadcast((error, done), src=0)
        if error is not None:
            raise UserError(error)
        self._batches_done_before = len(done)
        datamodule.configure(set(done), rank=trainer.global_rank, world_size=trainer.world_size)

    def _open(self, trainer: pl.Trainer, module: TextToImageGenerator, data: GenerationDataModule) -> list[int]:
        """Claim and lock OUT, check an earlier run against this one, write the starting manifest;
        the numbers of the batches already done."""
        out = self.output_dir
        prompts = data.prompts  # a bad prompt source is refused before OUT is touched
        manifest = self._start_manifest(trainer, module, data)
        claim_folder(out, MARKER, label=f"--out {out}", note="made by lit generate\n",
                     refusal=f"--out {out} is not empty and was not made by lit generate: its files are left "
                             "alone; choose a new or empty folder")
        self._hold.enter_context(folder_lock(out, label=f"--out {out}", name=LOCK))
        before = out / MANIFEST
        parts = out / BATCHES
        if before.is_file():
            try:
                previous = json.loads(before.read_text())
            except ValueError:
                previous = {}
            why = resume_differences(previous, manifest)
            if why is not None:
                raise UserError(f"--out {out} holds another run ({why}): rerun with its arguments to complete it, "
                                "or choose a new --out")
        elif parts.is_dir():  # row files without a manifest cannot be checked: ours, so regenerate them
            for stale in parts.iterdir():
                if _ROW_FILE.match(stale.name) and stale.is_file():
                    stale.unlink()
        for folder in (out / IMAGES, parts):
            if folder.is_dir():
                for stale in folder.iterdir():
                    if _TEMPORARY.match(stale.name) and stale.is_file():
                        stale.unlink()  # left by a killed run's atomic writes
        write_json(before, manifest)
        self._manifest = manifest
        truncated = manifest["prompts"]["truncated"]
        if truncated:
            limit = manifest["generation"]["tokenizer_max_length"]
            warnings.warn(f"{truncated} of {len(prompts)} prompts are longer than the tokenizer's {limit} tokens and "
                          f"are truncated, as the pipeline does (their indexes: {MANIFEST}, prompts.truncated_indexes)",
                          PromptTruncationWarning, stacklevel=2)
        return [batch.number for batch in data.batches if batch_done(out, batch)]

    def _start_manifest(self, trainer: pl.Trainer, module: TextToImageGenerator,
                        data: GenerationDataModule) -> dict[str, Any]:
        record = module.record(trainer.strategy.root_device)
        prompts = data.record()
        generation = record["generation"]
        # a prompt counts as truncated when the prompt of any of its images is (random words make them longer)
        generated = sorted({(job.prompt_index, module.generated_prompt(job.prompt, job.seed)) for job in data.jobs})
        truncated = sorted({index for (index, _), flag in zip(generated, module.too_long([t for _, t in generated]))
                            if flag})
        arguments = {
            "pipeline": record["pipeline"]["path"],
            "prompts": None if prompts["source"] is None else prompts["source"]["path"],
            "ablate": data.ablate, "n": data.n, "seed": data.seed, "replacement": data.replacement,
            "images_per_prompt": data.images_per_prompt, "batch_size": data.batch_size,
            "caption_column": data.caption_column, "key_column": data.key_column,
            "steps": generation["steps"], "guidance": generation["guidance"], "scheduler": record["scheduler"]["choice"],
            "height": generation["height"], "width": generation["width"],
            "negative_prompt": generation["negative_prompt"], "score_only": record["score"]["score_only"],
            "score_steps": module.score_steps, "precision": generation["precision"], "dtype": generation["dtype"],
            "embedding_noise": module.embedding_noise, "random_words": module.random_words,
        }
        return {
            "format": FORMAT, "complete": False, "arguments": arguments,
            "pipeline": record["pipeline"], "scheduler": record["scheduler"], "generation": generation,
            "mitigations": record["mitigations"],
            "score_only": module.score_only, "score": record["score"],
            "prompts": {"source": prompts["source"], "count": prompts["prompts"], "sha256": prompts["prompts_sha256"],
                        "truncated": len(truncated), "truncated_indexes": truncated},
            "images": 0 if module.score_only else len(data.jobs), "rows": len(data.jobs),
            "batches": len(data.batches),
            "run": {"accelerator": type(trainer.accelerator).__name__, "devices": trainer.world_size,
                    "device": str(trainer.strategy.root_device)},
        }

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._written = 0
        self._started = time.perf_counter()

    # ------------------------------------------------------------------ per batch
    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not prediction["rows"]:  # this rank had nothing left to do
            return
        images = prediction["images"]
        rows = []
        for position, row in enumerate(prediction["rows"]):
            image = None if images is None else images[position]
            digest = None
            if image is not None:
                data = png_bytes(image)
                write_bytes_atomic(self.output_dir / row["file"], data)
                digest = hashlib.sha256(data).hexdigest()
                self._written += 1
            rows.append({**row, "file": row["file"] if image is not None else "", "sha256": digest})
        write_json(batch_file(self.output_dir, prediction["batch"]),
                   {"batch": prediction["batch"], "score_steps": prediction["score_steps"], "rows": rows})

    # ------------------------------------------------------------------ the end: merge
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        written = sum(all_gather_objects([self._written]))
        trainer.strategy.barrier("generation_writer_done")
        if trainer.is_global_zero:
            self.summary = self._merge(trainer.datamodule, written)
        trainer.strategy.barrier("generation_writer_merged")

    def _merge(self, data: GenerationDataModule, written: int) -> dict[str, Any]:
        out = self.output_dir
        rows: list[dict[str, Any]] = []
        for batch in data.batches:
            if not batch_done(out, batch):
                raise RuntimeError(f"batch {batch.number} of {out} was not written")
            rows += json.loads(batch_file(out, batch.number).read_text())["rows"]
        rows.sort(key=lambda r: (r["prompt_index"], r["image_index"]))
        per_prompt = prompt_rows(rows)
        write_text_atomic(out / GENERATIONS, csv_text(COLUMNS, rows))
        write_text_atomic(out / PROMPTS, csv_text(PROMPT_COLUMNS, per_prompt))
        scores = np.array([r["memorization_score"] for r in rows], dtype=np.float64)
        firsts = np.array([r["memorization_score_first"] for r in rows], dtype=np.float64)
        seconds = time.perf_counter() - self._started
        summary = {
            "rows": len(rows), "images_written": written, "batches": len(data.batches),
            "batches_done_before": self._batches_done_before, "prompts": len(per_prompt),
            "mean_memorization_score": float(scores.mean()), "mean_memorization_score_first": float(firsts.mean()),
            "truncated_prompts": self._manifest["prompts"]["truncated"], "seconds": seconds,
            "score_only": self._manifest["score_only"],
        }
        write_json(out / MANIFEST, {**self._manifest, "complete": True,
                                    "summary": {k: v for k, v in summary.items() if k not in ("seconds", "images_written",
                                                                                            "batches_done_before")}})
        return summary

    # ------------------------------------------------------------------ release the lock
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._hold.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._hold.close()
