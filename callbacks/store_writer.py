"""Write ``lit predict`` features into a feature store, shard by shard, on every rank.

Used with :class:`models.extract.DescriptorExtractor` and
:class:`datamodules.extraction_inputs.ExtractionDataModule`. Before predicting, rank 0 opens the
store (creating it, or checking that an existing one was made by the same descriptor,
weights and dtype) and lists the shards already written; every rank then gets its share of
the remaining shards from the datamodule. Each rank accumulates the rows of a shard until
its last batch and writes it atomically; after all ranks finished, rank 0 writes the
manifest, in shard order (independent of the number of ranks), and prints
``N images in T s (X img/s)``. A killed run rerun with the same arguments skips the
shards already written and ends with the same store. The store records each input's absolute
path and listing (:data:`INPUTS_FILE`, fingerprint in the manifest); a rerun against an input
whose files were added, removed or modified since is refused with one line (:func:`check_input`).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info

from datamodules.extraction_inputs import (
    ExtractionDataModule,
    ImageSource,
    input_listing,
    listing_changes,
    listing_fingerprint,
)
from lit.distributed import all_gather_objects
from lit.errors import UserError
from lit.files import write_json
from lit.store import StoreWriter
from models.descriptor_config import DescriptorConfig
from models.extract import DescriptorExtractor

DEFAULT_SHARD_BYTES = 64 * 2**20
"""Target size of a shard when ``shard_size`` is not given (bounds a rank's buffered rows)."""


def default_shard_size(feature_shape: tuple[int, ...], dtype: str) -> int:
    """Rows per shard for about :data:`DEFAULT_SHARD_BYTES` of features (512-d float16: 65,536)."""
    row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
    return max(1, DEFAULT_SHARD_BYTES // row_bytes)


def _resume_plan(writer: StoreWriter, location: str, prefix: str) -> tuple[dict[str, Any], int]:
    """(this input's shards already written: name -> info, the order key after every other input's shards).

    Another input's shards under the same names would be taken for done work: refused."""
    ours = re.compile(re.escape(prefix) + r"\d{6}(-\d{6})?")  # the names this input's shards get
    done: dict[str, Any] = {}
    base = 0
    for path in sorted(writer.root.glob("shard-*.json")):
        name = path.stem[len("shard-"):]
        meta = writer.shard_meta(name)
        if meta is None:
            continue
        info = meta.get("info") or {}
        if info.get("input") == location and ours.fullmatch(name):
            done[name] = info
            continue
        if ours.fullmatch(name):
            raise UserError(
                f"feature store {writer.root} already holds shard {name} of input {info.get('input') or '?'}; "
                f"to add {location} to it, set --data.init_args.shard_prefix to a new prefix"
            )
        if meta.get("start") is not None:
            base = max(base, int(meta["start"]) + int(meta["rows"]) + len(meta.get("skipped", ())))
    return done, base


#: File in a store that records, for each input extracted into it, the listing it was extracted from.
INPUTS_FILE = "inputs.json"


def check_input(root: Path, source: ImageSource, resuming: bool) -> dict[str, Any]:
    """The record of ``source`` in the store ``root`` (absolute location, kind, fingerprint of the
    listing, the listing itself and the skipped entries), written into :data:`INPUTS_FILE`.

    When ``resuming`` (shards of this input are already in the store) and the input's files changed
    since they were listed (added, removed or modified), a one-line ``UserError`` says what changed:
    shards are fixed slices of the sorted listing, so an added name shifts every later shard and the
    store would duplicate or drop rows. A store written before inputs were recorded is trusted as it is."""
    entries = input_listing(source)
    record = {"kind": source.kind, "fingerprint": listing_fingerprint(entries), "files": len(entries),
              "entries": [list(e) for e in entries], "skipped_entries": [list(e) for e in source.skipped]}
    path = root / INPUTS_FILE
    try:
        inputs = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        inputs = {}
    inputs = inputs if isinstance(inputs, dict) else {}
    before = inputs.get(source.location)
    if resuming and isinstance(before, dict) and before.get("fingerprint") != record["fingerprint"]:
        changes = listing_changes(before.get("entries") or [], entries) or "its files were listed differently"
        raise UserError(f"feature store {root} was extracted from {source.location}, which changed since: "
                        f"{changes}; extract into a new folder (a store's shards are fixed slices of the "
                        "listing it started from)")
    if before != record:
        write_json(path, {**inputs, source.location: record})
    return record


class StoreWriterCallback(BasePredictionWriter):
    """Writes the features of ``lit predict`` into the feature store ``output_dir``.

    Args:
        output_dir: the store folder (new, empty, or a store of the same descriptor to complete).
        dtype: ``float16`` (default; 1 KiB per 512-d row) or ``float32``.
        shard_size: rows per shard of a folder or list, samples per shard of a tar (default:
            about 64 MiB of features). Shards are the unit of resumption; keep it between runs.
    """

    def __init__(
        self,
        output_dir: str,
        dtype: Literal["float16", "float32"] = "float16",
        shard_size: int | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.dtype = dtype
        self.shard_size = shard_size
        self.writer: StoreWriter | None = None
        self._open_shards: dict[str, dict[str, Any]] = {}
        self._written_rows = 0
        self._written_shards = 0
        self._skipped = 0
        self._done_before = 0
        self._started = 0.0
        self._input_record: dict[str, Any] = {}

    # ------------------------------------------------------------------ set-up: store, plan

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        if not isinstance(pl_module, DescriptorExtractor):
            raise UserError(f"StoreWriterCallback needs model models.extract.DescriptorExtractor, "
                            f"got {type(pl_module).__name__}")
        datamodule = trainer.datamodule
        if not isinstance(datamodule, ExtractionDataModule):
            raise UserError(f"StoreWriterCallback needs data datamodules.extraction_inputs.ExtractionDataModule, "
                            f"got {type(datamodule).__name__}")
        trainer.predict_loop.return_predictions = False  # the store keeps them, not RAM
        record, shape = pl_module.record(), pl_module.feature_shape
        shard_size = self.shard_size or default_shard_size(shape, self.dtype)
        strategy = trainer.strategy
        plan: tuple[dict[str, Any], int] = ({}, 0)
        error: str | None = None
        if trainer.is_global_zero:  # one process creates the store; a refusal reaches every rank
            try:
                location = datamodule.input.location  # list the input (fail on a bad one) before creating the store
                self.writer = StoreWriter(self.output_dir, record, shape, self.dtype,
                                          compare=DescriptorConfig.differences)
                plan = _resume_plan(self.writer, location, datamodule.shard_prefix)
                resuming = bool(plan[0]) or (self.output_dir / "manifest.json").is_file()
                self._input_record = check_input(self.writer.root, datamodule.input, resuming)
            except UserError as refusal:
                error = str(refusal)
        error, (done, base) = strategy.broadcast((error, plan), src=0)
        if error is not None:
            raise UserError(error)
        if not trainer.is_global_zero:  # rank 0 made and cleaned the store; the others only add shards
            self.writer = StoreWriter(self.output_dir, record, shape, self.dtype, clean=False,
                                      compare=DescriptorConfig.differences)
        self._done_before = len(done)
        self._shard_size = shard_size
        self._precision = pl_module.effective_precision()
        datamodule.configure(shard_size, pl_module.preprocessing, done,
                             rank=trainer.global_rank, world_size=trainer.world_size, base=base)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._open_shards.clear()
        self._written_rows = self._written_shards = self._skipped = 0
        self._started = time.perf_counter()

    # ------------------------------------------------------------------ per batch

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        name = prediction["shard"]
        shard = self._open_shards.setdefault(name, {
            "features": [], "keys": [], "captions": [], "labels": [], "skipped": [],
            "start": prediction["start"], "source": prediction["source"],
        })
        shard["features"].append(prediction["features"])
        for column in ("keys", "captions", "labels", "skipped"):
            shard[column].extend(prediction[column])
        if prediction["last"]:
            self._write(name, self._open_shards.pop(name), prediction.get("info"))

    def _write(self, name: str, shard: dict[str, Any], info: dict[str, Any] | None) -> None:
        assert self.writer is not None
        features = torch.cat(shard["features"]) if shard["features"] else np.empty((0, *self.writer.feature_shape))
        known = lambda column: column if any(v is not None for v in column) else None  # noqa: E731
        self.writer.write_shard(
            name, features, shard["keys"], captions=known(shard["captions"]), labels=known(shard["labels"]),
            skipped=shard["skipped"], start=shard["start"], source=shard["source"], info=info,
        )
        self._written_rows += len(shard["keys"])
        self._written_shards += 1
        self._skipped += len(shard["skipped"])

    # ------------------------------------------------------------------ the end: manifest

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._open_shards:
            raise RuntimeError(f"shards {sorted(self._open_shards)} ended without their last batch")
        counts = all_gather_objects([(self._written_rows, self._written_shards, self._skipped)])
        trainer.strategy.barrier("store_writer_done")
        if trainer.is_global_zero:
            assert self.writer is not None
            datamodule = trainer.datamodule
            record = self._input_record
            manifest = self.writer.finalize(extra={
                "input": datamodule.input.location,  # absolute: a scan from another folder finds the images
                "input_kind": datamodule.input.kind,
                "input_fingerprint": record["fingerprint"],
                "input_files": record["files"],
                "shard_size": self._shard_size,
                "precision": self._precision,
            }, skipped_entries=_skipped_entries(self.writer.root))
            rows, shards, skipped = (sum(c[i] for c in counts) for i in range(3))
            seconds = time.perf_counter() - self._started
            rate = (rows + skipped) / seconds if seconds > 0 else float("inf")
            rank_zero_info(
                f"{rows + skipped} images in {seconds:.1f} s ({rate:.1f} img/s): {rows} stored in {shards} new "
                f"shards, {skipped} skipped, {self._done_before} shards already done; store {self.output_dir} "
                f"has {manifest['num_rows']} rows in {len(manifest['shards'])} shards "
                f"({manifest['num_skipped']} inputs skipped)"
            )
        trainer.strategy.barrier("store_writer_manifest")


def _skipped_entries(root: Path) -> list[tuple[str, str]]:
    """The skipped entries of every input recorded in the store's :data:`INPUTS_FILE`."""
    inputs = json.loads((root / INPUTS_FILE).read_text())
    return [(str(name), str(reason)) for record in inputs.values() for name, reason in record["skipped_entries"]]
