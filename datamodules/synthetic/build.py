"""The build engine: :func:`build_synthetic` drives a :class:`~datamodules.synthetic.builder.SyntheticBuilder`
and owns everything but the pixels.

- **Determinism.** Images are quantised to uint8 and PNG-encoded with fixed settings
  (:func:`image_to_png`), so a seed gives byte-identical files in any process, whatever
  the number of workers.
- **Manifest.** A later build with a header equal to the manifest's
  (:mod:`datamodules.synthetic.manifest`) reuses the set, if every file is there with its
  recorded size; any difference rebuilds it.
- **Atomic, resumable writes.** Images go to a temporary file and are renamed into
  place; after each query a line is appended to ``<root>/.build/progress.jsonl``. A
  killed build leaves no manifest, so nothing half-built is ever read as a set; the
  next build with the same header resumes after the last recorded query (re-rendered
  items are identical bytes anyway), and one with another header starts over.
  ``manifest.json`` is written last, atomically.
- **Only its own files.** A build claims its ``output_dir`` first
  (:func:`~datamodules.synthetic.manifest.claim_output_dir`), and even in its own folder a
  rebuild deletes only ``images/NNNNNN_NN.png`` files.
- **Bad files.** An unreadable query skips that query (counted, with its reason, in the
  manifest); under ``strict`` the build stops at the first unreadable file instead.
- **Workers die with the build** (:mod:`datamodules.synthetic.workers`).
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datamodules.synthetic.builder import Skip, StageTimer, SyntheticBuilder
from datamodules.synthetic.manifest import (
    BUILD_DIR,
    IMAGE_DIR,
    MANIFEST,
    PNG_COMPRESS_LEVEL,
    claim_output_dir,
    jsonable,
    manifest_matches,
    read_manifest,
)
from datamodules.synthetic.sources import SourceRef
from datamodules.synthetic.workers import die_with_parent, worker_context
from lit.files import write_bytes_atomic, write_json
from lit.io import ImageLoadError, to_uint8

_OWN_IMAGE = re.compile(r"\d{6}_\d{2}\.png")
"""Names of the images a build writes (``images/<row>_<mix>.png``): the only ones it deletes."""


class SyntheticSkipWarning(UserWarning):
    """Queries were left out of a synthetic set (no usable region, unreadable image, ...)."""


@dataclass
class BuildReport:
    """What a call of :func:`build_synthetic` did."""

    root: Path
    reused: bool
    num_items: int
    num_skipped: int
    rendered_queries: int
    seconds: float
    stage_seconds: dict[str, float]
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)  # as read or written

    @property
    def items_per_second(self) -> float:
        return self.num_items / self.seconds if self.seconds > 0 else float("inf")


def build_synthetic(builder: SyntheticBuilder, root: str | Path, progress: bool = True,
                    num_workers: int = 0) -> BuildReport:
    """Build (or reuse, or resume) ``builder``'s set under ``root``; see the module docstring.

    ``num_workers`` > 0 renders and PNG-encodes batches of queries in that many worker
    processes (a torch ``DataLoader``, one thread each; the files do not depend on it);
    keep 0 for builders that use a GPU. Stage seconds are summed over workers."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    start = time.perf_counter()
    root = Path(root)
    header = builder.header()
    manifest = read_manifest(root)
    if manifest is not None and manifest_matches(manifest, header) and _files_intact(root, manifest):
        return BuildReport(root, True, len(manifest["items"]), len(manifest["skipped"]), 0,
                           time.perf_counter() - start, {}, manifest)
    claim_output_dir(root)
    (root / MANIFEST).unlink(missing_ok=True)  # never leave a stale manifest beside new images
    done = _resume_or_reset(root, header)
    queries = builder.queries()
    pending = [row for row in range(len(queries)) if row not in done]
    timer = StageTimer()
    bar = tqdm(total=len(queries), initial=len(queries) - len(pending), disable=not progress,
               desc=f"building {builder.kind} in {root}", unit="query")
    batches = [pending[i: i + builder.batch_size] for i in range(0, len(pending), builder.batch_size)]
    loader = DataLoader(_RenderJobs(builder, batches), batch_size=None, num_workers=num_workers,
                        collate_fn=_identity, multiprocessing_context=worker_context(num_workers),
                        worker_init_fn=functools.partial(die_with_parent, os.getpid()))
    with open(root / BUILD_DIR / "progress.jsonl", "a", encoding="utf-8") as log:
        for rows, outputs, stage_seconds in loader:
            for stage, seconds in stage_seconds.items():
                timer.seconds[stage] += seconds
            for row, output in zip(rows, outputs):
                if isinstance(output, Skip) and output.fatal:
                    bar.close()
                    raise ImageLoadError(f"{output.reason} (strict: the build stops at the first unreadable "
                                         "file; set strict: false to skip and count such files)")
                record = _write_query(root, row, queries[row].id, output, timer)
                log.write(json.dumps(record) + "\n")
                log.flush()
                done[row] = record
                bar.update(1)
    bar.close()
    manifest = _assemble_manifest(header, queries, done)
    write_json(root / MANIFEST, manifest)
    shutil.rmtree(root / BUILD_DIR, ignore_errors=True)
    if manifest["skipped"]:
        first = manifest["skipped"][0]
        warnings.warn(f"{builder.kind}: {len(manifest['skipped'])} of {len(queries)} queries skipped "
                      f"(first: {first['query_id']}: {first['reason']})", SyntheticSkipWarning, stacklevel=2)
    return BuildReport(root, False, len(manifest["items"]), len(manifest["skipped"]), len(pending),
                       time.perf_counter() - start, dict(timer.seconds), manifest)

def image_to_png(image: Tensor, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Quantise a (3, H, W) [0, 1] image to uint8 and encode it as PNG (no metadata: same
    pixels, same bytes)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    array = np.ascontiguousarray(to_uint8(image.detach().cpu()).numpy().transpose(1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


class _RenderJobs(Dataset):
    """Batches of query rows -> (rows, encoded outputs, stage seconds): the work a build
    hands to ``DataLoader`` workers (rendering and PNG encoding, not writing)."""

    def __init__(self, builder: SyntheticBuilder, batches: list[list[int]]) -> None:
        self.builder = builder
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[list[int], list[_Encoded], dict[str, float]]:
        rows = self.batches[index]
        timer = StageTimer()
        outputs = self.builder.render(rows, timer)
        if len(outputs) != len(rows):
            raise RuntimeError(f"{type(self.builder).__name__}.render returned {len(outputs)} outputs "
                               f"for {len(rows)} rows")
        encoded: list[_Encoded] = []
        for output in outputs:
            if isinstance(output, Skip):
                encoded.append(output)
                continue
            with timer("encode"):
                encoded.append([(image_to_png(item.image), item.provenance) for item in output])
        return rows, encoded, dict(timer.seconds)


_Encoded = list[tuple[bytes, dict[str, Any]]] | Skip


def _identity(batch: Any) -> Any:
    return batch


def _write_query(root: Path, row: int, query_id: str, output: _Encoded, timer: StageTimer) -> dict[str, Any]:
    """Write one query's encoded images; return its progress record."""
    if isinstance(output, Skip):
        return {"row": row, "query_id": query_id, "skip": output.reason}
    items = []
    for mix, (data, provenance) in enumerate(output):
        name = f"{IMAGE_DIR}/{row:06d}_{mix:02d}.png"
        with timer("write"):
            write_bytes_atomic(root / name, data)
        items.append({"file": name, "bytes": len(data), "query": row, "query_id": query_id,
                      **jsonable(provenance)})
    if not items:
        return {"row": row, "query_id": query_id, "skip": "the builder produced no image"}
    return {"row": row, "query_id": query_id, "items": items}


def _resume_or_reset(root: Path, header: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Progress records of an interrupted build with the same header; else a clean start."""
    build = root / BUILD_DIR
    images = root / IMAGE_DIR
    try:
        previous = json.loads((build / "header.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        previous = None
    for stray in images.glob(".*.png.*.tmp"):  # a killed write's leftovers (nothing when images/ is absent)
        stray.unlink(missing_ok=True)
    if previous == header:
        return _read_progress(root, build / "progress.jsonl")
    shutil.rmtree(build, ignore_errors=True)
    for old in images.glob("*.png"):
        if _OWN_IMAGE.fullmatch(old.name):
            old.unlink()
    build.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    write_json(build / "header.json", header)
    (build / "progress.jsonl").write_text("", encoding="utf-8")
    return {}


def _read_progress(root: Path, path: Path) -> dict[int, dict[str, Any]]:
    """Completed queries from the progress log; a torn last line or a missing file ends it."""
    done: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break
        if all((root / item["file"]).is_file() for item in record.get("items", [])):
            done[int(record["row"])] = record
    return done


def _assemble_manifest(header: dict[str, Any], queries: Sequence[SourceRef],
                       done: dict[int, dict[str, Any]]) -> dict[str, Any]:
    rows = sorted(done)
    return {
        **header,
        "query_paths": [str(ref.path) for ref in queries],
        "items": [item for row in rows for item in done[row].get("items", [])],
        "skipped": [{"query": row, "query_id": done[row]["query_id"], "reason": done[row]["skip"]}
                    for row in rows if "skip" in done[row]],
    }


def _files_intact(root: Path, manifest: dict[str, Any]) -> bool:
    """Every item file exists with its recorded size (cheap; no decoding)."""
    for item in manifest.get("items", []):
        path = root / item["file"]
        if not path.is_file() or path.stat().st_size != item.get("bytes", -1):
            return False
    return True


__all__ = ["BuildReport", "SyntheticSkipWarning", "build_synthetic", "image_to_png"]
