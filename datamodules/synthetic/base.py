"""Synthetic copy-detection sets on disk: build once from a seed, reuse, resume, read back.

A *builder* (:class:`SyntheticBuilder`) knows how to turn query ``row`` into zero
or more synthetic images (Segmix, Cutmix, diffusion outpainting, ...).
:func:`build_synthetic` drives it and owns everything else:

- **Determinism.** Every random draw of item ``(query id, mix)`` comes from its own
  ``torch.Generator`` seeded with :func:`derive_seed` ``(seed, kind, query id, mix)``
  (:meth:`SyntheticBuilder.generator`), augmentations are called with explicit
  parameters, and images are quantised to uint8 and PNG-encoded with fixed
  settings. So a seed gives byte-identical files in any process, on any DDP rank,
  whatever order or batching the queries are rendered in.
- **Manifest.** ``<root>/manifest.json`` holds the *header* (format version, kind,
  seed, PNG level, parameters, query ids, pool ids) plus the query paths, one provenance record
  per item (file, query row and id, pool image id, region, placement, augmentation
  parameters) and the skipped queries with their reasons. A later build with an
  equal header reuses the set (if every file is there with its recorded size); any
  difference rebuilds it.
- **Atomic, resumable writes.** Images go to a temporary file and are renamed into
  place; after each query a line is appended to ``<root>/.build/progress.jsonl``. A
  killed build leaves no manifest, so nothing half-built is ever read as a set; the
  next build with the same header resumes after the last recorded query (re-rendered
  items are identical bytes anyway), and one with another header starts over.
  ``manifest.json`` is written last, atomically.
- **Only its own files.** A build writes into, and deletes from, only an ``output_dir``
  that is new, empty, or marked as the suite's own by a ``.lit-synthetic`` file (written
  when the suite claims the folder; sets built before the mark existed are recognised by
  their manifest). Anything else is refused with a :class:`~lit.errors.UserError`; and
  even in its own folder a rebuild deletes only ``images/NNNNNN_NN.png`` files.
- **Bad files.** An unreadable query skips that query (counted, with its reason, in the
  manifest and in :attr:`RetrievalSet.skipped_queries`); an unreadable pool image is
  replaced by a seeded redraw (:meth:`SyntheticBuilder.load_pool_image`). With
  ``strict`` the build stops at the first unreadable file instead.
- **Workers die with the build.** Build workers ask the kernel to kill them when their
  parent dies (``PR_SET_PDEATHSIG``; a parent-pid watchdog elsewhere), so a ``kill -9``
  of the build leaves no orphan renderers.
- **Reading back.** :class:`SyntheticRetrievalDataModule` builds in ``prepare_data``
  (global rank 0 only under DDP) and turns the manifest into a
  :class:`~datamodules.retrieval.RetrievalSet`: queries = source images, gallery =
  synthetic images (then optional distractors), positives of a query = the
  synthetic images made from it. Skipped queries (no usable content) are left out,
  since every query needs a positive.
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datamodules.retrieval import ImageFileDataset, RetrievalDataModule, RetrievalSet
from lit.distributed import world_size
from lit.files import claim_folder, write_bytes_atomic, write_json, write_text_atomic
from lit.io import DEFAULT_MAX_PIXELS, ImageLoadError, list_images, load_image, to_uint8
from lit.seeding import derive_seed

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_DIR = "images"
_BUILD_DIR = ".build"
OWNER_MARK = ".lit-synthetic"
"""File that marks an output folder as the suite's own: only there does a build delete files."""
_OWN_IMAGE = re.compile(r"\d{6}_\d{2}\.png")
"""Names of the images a build writes (``images/<row>_<mix>.png``): the only ones it deletes."""
PNG_COMPRESS_LEVEL = 1
"""zlib level of the written PNGs: 1 encodes ~3x faster than PIL's default 6 for ~9% more
bytes on photos (measured in benchmarks/bench_synthetic_build.py); part of the header."""
_HEADER_KEYS = ("format_version", "kind", "seed", "png_compress_level", "parameters", "query_ids", "pool_ids")


class SyntheticSkipWarning(UserWarning):
    """Queries were left out of a synthetic set (no usable region, unreadable image, ...)."""


@dataclass(frozen=True)
class SourceRef:
    """A source image: stable ``id`` (seeds and manifests use it) and its file."""

    id: str
    path: Path


@dataclass
class RenderedItem:
    """One synthetic image, (3, S, S) float in [0, 1], and its JSON-able provenance."""

    image: Tensor
    provenance: dict[str, Any]


@dataclass(frozen=True)
class Skip:
    """A query that gave no synthetic image, and why. ``fatal``: an unreadable file under
    ``strict``, which stops the build (raised in the main process, one line)."""

    reason: str
    fatal: bool = False


QueryOutput = list[RenderedItem] | Skip


@dataclass
class StageTimer:
    """Accumulates wall-clock seconds per named stage (``with timer("decode"): ...``)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start


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


class SyntheticBuilder(ABC):
    """Renders the synthetic images of query rows; subclasses set ``kind`` and implement
    :meth:`parameters`, :meth:`queries` and :meth:`render_query` (or :meth:`render` for
    batched renderers such as diffusion, with ``batch_size`` > 1)."""

    kind: ClassVar[str]

    def __init__(self, seed: int, batch_size: int = 1, strict: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.seed = int(seed)
        self.batch_size = batch_size
        self.strict = strict
        self._bad_pool: dict[int, str] = {}  # pool row -> why it cannot be read (per process)

    @abstractmethod
    def parameters(self) -> dict[str, Any]:
        """JSON-able parameters that determine the pixels (a change triggers a rebuild)."""

    @abstractmethod
    def queries(self) -> list[SourceRef]:
        """Candidate query images, in row order."""

    def pool(self) -> list[SourceRef]:
        """Images that backgrounds / paste targets come from (none by default)."""
        return []

    def render_query(self, row: int, timer: StageTimer) -> QueryOutput:
        """Synthetic images of query ``row`` (or a :class:`Skip`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement render_query() or render()")

    def render(self, rows: Sequence[int], timer: StageTimer) -> list[QueryOutput]:
        """Outputs of several query rows (default: one :meth:`render_query` call each)."""
        return [self.render_query(row, timer) for row in rows]

    def unreadable(self, error: ImageLoadError) -> Skip:
        """The skip for an unreadable query / pool file: fatal (stops the build) under ``strict``."""
        return Skip(str(error), fatal=self.strict)

    def load_pool_image(self, first_row: int, max_pixels: int, *redraw_parts: int | str,
                        ) -> tuple[Tensor, int, list[dict[str, str]]]:
        """Pool image ``first_row``, or, when it cannot be read, a seeded redraw among the pool
        rows not tried yet (generator ``(seed, kind, *redraw_parts, "pool-redraw")``, so a bad
        file changes only the canvas of the items that drew it, the same way in any process).
        Returns (image, the row used, [{"pool_id", "reason"}] of each unreadable draw).
        Under ``strict`` the first unreadable pool file raises :class:`ImageLoadError`."""
        pool = self.pool()
        row, tried, replaced = first_row, {first_row}, []
        redraw: torch.Generator | None = None
        while True:
            reason = self._bad_pool.get(row)
            if reason is None:
                try:
                    image = load_image(pool[row].path, strict=True, max_pixels=max_pixels)
                    assert image is not None
                    return image, row, replaced
                except ImageLoadError as error:
                    if self.strict:
                        raise
                    reason = self._bad_pool[row] = str(error)
            elif self.strict:
                raise ImageLoadError(reason)
            replaced.append({"pool_id": pool[row].id, "reason": reason})
            left = [r for r in range(len(pool)) if r not in tried]
            if not left:
                raise ImageLoadError(f"none of the {len(pool)} pool images can be read "
                                     f"(first: {replaced[0]['reason']})")
            if redraw is None:
                redraw = self.generator(*redraw_parts, "pool-redraw")
            row = left[randint(redraw, len(left))]
            tried.add(row)

    def generator(self, *parts: int | str) -> torch.Generator:
        """A CPU generator seeded from ``(seed, kind, *parts)``: e.g. ``(query id, mix)``."""
        return torch.Generator().manual_seed(derive_seed(self.seed, self.kind, *parts))

    def header(self) -> dict[str, Any]:
        """What a manifest must match to be reused."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "seed": self.seed,
            "png_compress_level": PNG_COMPRESS_LEVEL,
            "parameters": _jsonable(self.parameters()),
            "query_ids": [ref.id for ref in self.queries()],
            "pool_ids": [ref.id for ref in self.pool()],
        }


# ----------------------------------------------------------------------------- building
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
                        collate_fn=_identity, multiprocessing_context=_worker_context(num_workers),
                        worker_init_fn=functools.partial(die_with_parent, os.getpid()))
    with open(root / _BUILD_DIR / "progress.jsonl", "a", encoding="utf-8") as log:
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
    shutil.rmtree(root / _BUILD_DIR, ignore_errors=True)
    if manifest["skipped"]:
        first = manifest["skipped"][0]
        warnings.warn(f"{builder.kind}: {len(manifest['skipped'])} of {len(queries)} queries skipped "
                      f"(first: {first['query_id']}: {first['reason']})", SyntheticSkipWarning, stacklevel=2)
    return BuildReport(root, False, len(manifest["items"]), len(manifest["skipped"]), len(pending),
                       time.perf_counter() - start, dict(timer.seconds), manifest)


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """The manifest under ``root``, or None when there is none (a corrupt one counts as none)."""
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def manifest_matches(manifest: dict[str, Any], header: dict[str, Any]) -> bool:
    """Whether ``manifest`` was built with exactly ``header`` (kind, seed, parameters, ids)."""
    return all(manifest.get(key) == header[key] for key in _HEADER_KEYS)


def image_to_png(image: Tensor, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """Quantise a (3, H, W) [0, 1] image to uint8 and encode it as PNG (no metadata: same
    pixels, same bytes)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    array = np.ascontiguousarray(to_uint8(image.detach().cpu()).numpy().transpose(1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def claim_output_dir(root: Path) -> None:
    """Make ``root`` a folder this suite may write and delete in, or refuse.

    New or empty folders are claimed (``OWNER_MARK`` written); a folder with the mark, or
    with a manifest / interrupted build of this suite from before the mark existed, is
    ours already. Any other non-empty folder raises :class:`UserError` naming it: a
    user's files there must never be deleted or replaced."""
    claim_folder(root, OWNER_MARK, label=f"output_dir {root}",
                 is_ours=lambda folder: (folder / OWNER_MARK).is_file() or _legacy_suite_folder(folder),
                 refusal=f"output_dir {root} is not empty and was not created by lit (no {OWNER_MARK} file): "
                         "its files are left alone; choose an empty or new folder for the synthetic set")
    if not (root / OWNER_MARK).is_file():
        write_text_atomic(root / OWNER_MARK, "This folder holds a synthetic set written by lit-replication; lit "
                      "rebuilds may replace its images/ and manifest.json.\n")


def _legacy_suite_folder(root: Path) -> bool:
    """A set (or interrupted build) this suite wrote before folders were marked: its manifest
    or build header carries every header key, and nothing else is beside them."""
    def signed(path: Path) -> bool:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return False
        return isinstance(data, dict) and all(key in data for key in _HEADER_KEYS)

    if not (signed(root / MANIFEST) or signed(root / _BUILD_DIR / "header.json")):
        return False
    return all(entry.name in (MANIFEST, IMAGE_DIR, _BUILD_DIR) for entry in root.iterdir())


def die_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """``worker_init_fn`` of build workers: end this worker when ``parent_pid`` dies (a
    ``kill -9`` of the build must not leave renderers holding memory for minutes).

    On Linux the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``);
    elsewhere, or if that call fails, a daemon thread checks the parent id every second.
    Either way a parent that died before this ran is caught by the ``getppid`` check."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="die-with-parent").start()


def _watch_parent(parent_pid: int, interval: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(interval)
    os._exit(1)


def _worker_context(num_workers: int) -> str | None:
    """``fork`` for build workers on Linux, whatever the process default: inside a spawned
    process (``ddp_spawn``, a spawned benchmark) the default becomes ``spawn``, and every
    worker re-imports torch (a 6 s Segmix build took 25 s). Not once CUDA is initialised,
    where a forked child cannot use it."""
    if num_workers == 0 or sys.platform != "linux" or torch.cuda.is_initialized():
        return None
    return "fork"


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
                      **_jsonable(provenance)})
    if not items:
        return {"row": row, "query_id": query_id, "skip": "the builder produced no image"}
    return {"row": row, "query_id": query_id, "items": items}


def _resume_or_reset(root: Path, header: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Progress records of an interrupted build with the same header; else a clean start."""
    build = root / _BUILD_DIR
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


# ----------------------------------------------------------------------------- shared helpers
def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One float in [low, high) from ``generator`` (always exactly one draw)."""
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def randint(generator: torch.Generator, high: int) -> int:
    """One int in [0, high) from ``generator`` (always exactly one draw)."""
    return int(torch.randint(high, (), generator=generator))


def random_square(shape: tuple[int, int], side: int, generator: torch.Generator) -> tuple[int, int]:
    """Top-left (y, x) of a random ``side`` x ``side`` window inside ``shape`` (two draws)."""
    height, width = shape
    if side > min(height, width):
        raise ValueError(f"a {side} px square does not fit in {height}x{width}")
    return randint(generator, height - side + 1), randint(generator, width - side + 1)


def random_square_resized(image: Tensor, size: int, generator: torch.Generator) -> tuple[Tensor, list[int]]:
    """The largest square at a random place in (C, H, W) ``image``, resized to ``size``
    (antialiased bilinear; two draws). Returns it and its [x0, y0, x1, y1] box in ``image``
    pixels. Equivalent to resizing the shorter side to ``size`` and cropping, but only the
    square is resampled."""
    side = min(image.shape[-2:])
    y0, x0 = random_square(tuple(image.shape[-2:]), side, generator)
    square = image[:, y0:y0 + side, x0:x0 + side]
    if side != size:
        square = F.interpolate(square[None], size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)[0].clamp(0, 1)
    return square, [x0, y0, x0 + side, y0 + side]


def split_queries_and_pool(
    count: int, seed: int, num_queries: int | None, pool_fraction: float, has_pool: bool
) -> tuple[list[int], list[int]]:
    """Seeded, disjoint (query rows, pool rows) over ``count`` sources, both sorted.

    A permutation from ``derive_seed(seed, "split")``; without an explicit pool its
    first ``round(count * pool_fraction)`` entries are the pool; queries are the next
    ``num_queries`` (None: all the rest)."""
    if count == 0:
        raise ValueError("no source images")
    if num_queries is not None and num_queries < 1:
        raise ValueError(f"num_queries must be >= 1 or null (all), got {num_queries}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(derive_seed(seed, "split"))).tolist()
    num_pool = 0
    if not has_pool:
        if not 0.0 < pool_fraction < 1.0:
            raise ValueError(f"pool_fraction must be in (0, 1), got {pool_fraction}")
        num_pool = round(count * pool_fraction)
        if num_pool == 0 or num_pool == count:
            raise ValueError(f"pool_fraction {pool_fraction} of {count} images leaves no pool or no queries")
    candidates = order[num_pool:]
    if num_queries is not None:
        if num_queries > len(candidates):
            raise ValueError(f"num_queries {num_queries} exceeds the {len(candidates)} images left for queries "
                             f"({count} sources, {num_pool} in the pool); set num_queries to at most "
                             f"{len(candidates)}, or null for all of them")
        candidates = candidates[:num_queries]
    return sorted(candidates), sorted(order[:num_pool])


def split_sources(sources: Sequence[SourceRef], seed: int, num_queries: int | None, pool_fraction: float,
                  pool_dir: str | Path | None) -> tuple[list[int], list[SourceRef]]:
    """Query rows of ``sources`` and the paste pool: the images of ``pool_dir`` when given,
    else the seeded ``pool_fraction`` of ``sources`` that :func:`split_queries_and_pool`
    keeps apart from the queries."""
    query_rows, pool_rows = split_queries_and_pool(len(sources), seed, num_queries, pool_fraction,
                                                   has_pool=pool_dir is not None)
    pool = folder_refs(pool_dir) if pool_dir is not None else [sources[r] for r in pool_rows]
    return query_rows, pool


def folder_refs(folder: str | Path) -> list[SourceRef]:
    """Images under ``folder`` as refs with id = path relative to it, without suffix."""
    folder = Path(folder)
    return [SourceRef(str(p.relative_to(folder).with_suffix("")), p) for p in list_images(folder)]


def require_disjoint(queries: Sequence[SourceRef], pool: Sequence[SourceRef]) -> None:
    """Each synthetic image must have exactly one source: no pool image may be a query."""
    shared = {p.path.resolve() for p in queries} & {p.path.resolve() for p in pool}
    if shared:
        raise ValueError(f"the pool shares {len(shared)} image(s) with the queries (e.g. {sorted(shared)[0]}); "
                         "use a pool folder disjoint from the query images")


def _jsonable(value: Any) -> Any:
    """Tuples -> lists, numpy/torch scalars -> Python, recursively (so headers compare equal
    to what JSON gives back)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, Tensor)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


# ----------------------------------------------------------------------------- datamodule
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

    def __init__(self, output_dir: str, distractors: str | None = None, num_distractors: int | None = None,
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


__all__ = [
    "OWNER_MARK",
    "BuildReport",
    "RenderedItem",
    "Skip",
    "SourceRef",
    "StageTimer",
    "SyntheticBuilder",
    "SyntheticRetrievalDataModule",
    "SyntheticSkipWarning",
    "build_synthetic",
    "claim_output_dir",
    "die_with_parent",
    "folder_refs",
    "image_to_png",
    "manifest_matches",
    "manifest_to_retrieval_set",
    "random_square",
    "random_square_resized",
    "read_manifest",
    "require_disjoint",
    "split_queries_and_pool",
    "split_sources",
    "uniform",
]
