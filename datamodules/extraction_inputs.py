"""Inputs of an extraction (``lit predict`` into a feature store): folders, file lists, webdataset tars.

An input is cut into **store shards** that do not depend on the number of processes:

- an image folder (recursive, sorted paths) or a file list (``.txt``: one path a line;
  ``.tsv``: ``path<TAB>caption[<TAB>label]``) is one sequence of rows; shard ``j`` is rows
  ``[j*S, (j+1)*S)`` (``S`` = shard size), named ``{j:06d}``;
- webdataset tars in the img2dataset / LAION layout (``KEY.jpg|png|webp``, ``KEY.txt``
  caption, ``KEY.json``; a ``.tar`` file, a folder of them, a glob or a brace pattern
  ``shards/{00000..00099}.tar``) are read with the ``webdataset`` package; tar ``i`` (in
  sorted order) is cut into chunks of ``S`` samples, named ``{i:06d}-{j:06d}``.

Work is handed out by shard (tars: by tar), round-robin over ranks and then data-loader
workers, so every input row is embedded by exactly one process (no padded duplicates) and
a shard is always embedded in the same batches. Shards already in the store are skipped
(tars: their samples are read but not decoded). Batches never cross a shard boundary and
the last batch of a shard says so; a batch is a dict::

    images   (B, 3, S, S) crops in [0, 1] (or a list of full images when no crop is set)
    index    (B,) input row (folder / list) or sample number within the tar
    keys     B image keys: the path as listed (relative to the folder) or the tar sample key
    captions B captions or None; labels B labels or None
    shard, start, source   the store shard the rows belong to
    skipped  inputs of this batch that could not be read; last   whether the shard ends here

Bad images (corrupt, empty, missing, samples without an image) are skipped with a warning
and listed in the shard's ``skipped``; ``strict=True`` stops at the first one instead.
"""

from __future__ import annotations

import glob
import hashlib
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lit.errors import UserError
from lit.io import load_image, load_image_bytes, scan_images, shorten, warn_skipped
from models.preprocessing import Preprocessing, center_crop, resize_short_side

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
"""Sample fields read as the image of a webdataset sample, in this order of preference."""
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


# --------------------------------------------------------------------------- what an input is


@dataclass(frozen=True)
class ImageItem:
    """One row of a folder or file list."""

    key: str
    path: Path
    caption: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class ShardPlan:
    """One store shard to produce: map rows ``items`` (folder / list) or chunk ``chunk`` of ``tar``."""

    name: str
    start: int | None
    items: tuple[ImageItem, ...] = ()
    first_row: int = 0
    tar: str | None = None
    chunk: int = 0


@dataclass(frozen=True)
class TarUnit:
    """One input tar: store shards ``{number:06d}-{j:06d}`` of at most ``shard_size`` samples each."""

    number: int
    path: str
    done: frozenset[str] = field(default_factory=frozenset)
    prefix: str = ""


@dataclass(frozen=True)
class ImageSource:
    """An input resolved: ``kind`` is ``folder``, ``list`` or ``tars``."""

    kind: str
    location: str
    items: tuple[ImageItem, ...] = ()
    tars: tuple[str, ...] = ()
    #: entries of a folder named like images that are not image files (dangling symlinks, folders
    #: called ``x.png``): ``(name relative to the folder, reason)``, counted as skipped by the store
    skipped: tuple[tuple[str, str], ...] = ()

    @classmethod
    def resolve(cls, source: str, labels_from_folders: bool = False) -> ImageSource:
        """Find out what ``source`` is (a one-line ``UserError`` when it is nothing readable)."""
        path = Path(source).expanduser().absolute()
        if path.is_dir():
            tars = sorted(str(p) for p in path.glob("*.tar"))
            listing = scan_images(path)
            warn_skipped(path, listing)
            images = listing.paths
            if tars and not images:
                return cls("tars", str(path), tars=tuple(tars))
            if not images:
                raise UserError(f"no images under {path} (looked for {', '.join(sorted({'.jpg', '.png', '.webp'}))}"
                                f" ... recursively, and for .tar shards)")
            items = tuple(
                ImageItem(p.relative_to(path).as_posix(), p,
                          label=p.parent.relative_to(path).as_posix() if labels_from_folders else None)
                for p in images
            )
            skipped = tuple((p.relative_to(path).as_posix(), reason) for p, reason in listing.skipped)
            return cls("folder", str(path), items=items, skipped=skipped)
        if path.is_file() and path.suffix.lower() == ".tar":
            return cls("tars", str(path), tars=(str(path),))
        if path.is_file() and path.suffix.lower() in (".txt", ".tsv"):
            return cls("list", str(path), items=tuple(read_file_list(path)))
        if path.is_file():
            raise UserError(f"{path}: expected an image folder, a .txt / .tsv file list or a .tar shard")
        tars = expand_tar_pattern(str(path))
        if tars:
            return cls("tars", str(path), tars=tuple(tars))
        raise UserError(f"input {source} not found (an image folder, a .txt / .tsv file list, a .tar shard, "
                        "or a pattern such as shards/{00000..00009}.tar)")

    def plan(
        self,
        shard_size: int,
        done: Mapping[str, Mapping[str, Any] | None] | None = None,
        prefix: str = "",
        base: int = 0,
    ) -> tuple[list[ShardPlan], list[TarUnit]]:
        """The shards still to write (folder / list) or the tars still to read (each with its done shards).

        ``done`` maps the names of this input's shards already in the store to their ``info`` (a
        tar whose ``final`` chunk is there is finished). ``prefix`` starts every shard name and
        ``base`` is added to the shards' order keys (an input appended to a store comes after)."""
        done = done or {}
        if shard_size < 1:
            raise UserError(f"shard_size must be >= 1, got {shard_size}")
        if self.kind != "tars":
            shards = [
                ShardPlan(f"{prefix}{j:06d}", base + j * shard_size, self.items[j * shard_size:(j + 1) * shard_size],
                          j * shard_size)
                for j in range(math.ceil(len(self.items) / shard_size))
            ]
            return [s for s in shards if s.name not in done], []
        units = []
        for number, tar in enumerate(self.tars):
            mine = {name: info for name, info in done.items() if name.startswith(f"{prefix}{number:06d}-")}
            if not any((info or {}).get("final") for info in mine.values()):
                units.append(TarUnit(number, tar, frozenset(mine), prefix))
        return [], units


# --------------------------------------------------------------------------- what an input held


#: One file an input is read from: ``(name, size in bytes, modification time in ns)``; -1, -1 when missing.
ListingEntry = tuple[str, int, int]


def input_listing(source: ImageSource) -> list[ListingEntry]:
    """Every file ``source`` is read from, sorted by name: a folder's images by their path relative
    to it (the store's keys) and its skipped entries, a list's images as listed plus the list file
    itself (``<list>``), a pattern's tars by their path."""
    def entry(name: str, path: Path) -> ListingEntry:
        try:
            stat = path.stat()
        except OSError:
            return name, -1, -1
        return name, int(stat.st_size), int(stat.st_mtime_ns)

    if source.kind == "tars":
        entries = [entry(tar, Path(tar)) for tar in source.tars]
    else:
        entries = [entry(item.key, item.path) for item in source.items]
        entries += [(name, -1, -1) for name, _ in source.skipped]
        if source.kind == "list":
            entries.append(entry("<list>", Path(source.location)))
    return sorted(entries)


def listing_fingerprint(entries: Sequence[ListingEntry]) -> str:
    """SHA-256 over the sorted names, sizes and modification times of an input's files (one
    fingerprint for every caller: the store writer's resume check, ``lit scan``'s store names)."""
    digest = hashlib.sha256()
    for name, size, mtime in sorted(entries):
        digest.update(f"{name}\0{size}\0{mtime}\n".encode())
    return digest.hexdigest()


def listing_changes(before: Sequence[Sequence[Any]], after: Sequence[ListingEntry]) -> str | None:
    """How an input's files changed between two listings (``N added (first names), N removed (...),
    N modified (...)``), or None when they are the same."""
    old = {str(e[0]): (int(e[1]), int(e[2])) for e in before}
    new = {name: (size, mtime) for name, size, mtime in after}
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    modified = sorted(name for name in set(old) & set(new) if old[name] != new[name])
    parts = [f"{len(names)} {what}" + (f" ({shorten(names, 3)})" if names else "")
             for what, names in (("added", added), ("removed", removed), ("modified", modified))]
    return None if not (added or removed or modified) else ", ".join(parts)


def read_file_list(path: Path) -> list[ImageItem]:
    """Rows of a ``.txt`` (a path a line) or ``.tsv`` (``path<TAB>caption[<TAB>label]``) list; relative
    paths are relative to the list's folder; blank lines and ``#`` comments are ignored."""
    items = []
    tsv = path.suffix.lower() == ".tsv"
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        columns = line.split("\t") if tsv else [line.strip()]
        if tsv and number == 1 and columns[0].strip().lower() in ("path", "file", "image"):
            continue  # a header row
        if len(columns) > 3:
            raise UserError(f"{path}:{number}: expected path<TAB>caption[<TAB>label], got {len(columns)} columns")
        name = columns[0].strip()
        file = Path(name).expanduser()
        items.append(ImageItem(
            name, file if file.is_absolute() else path.parent / file,
            caption=columns[1] if len(columns) > 1 else None,
            label=columns[2].strip() if len(columns) > 2 else None,
        ))
    if not items:
        raise UserError(f"{path} lists no images")
    return items


def expand_tar_pattern(pattern: str) -> list[str]:
    """Files matching a brace pattern (``{000..009}``, zero-padded as written) or a glob, sorted."""
    names = [pattern]
    while any(_BRACES.search(n) for n in names):
        expanded = []
        for name in names:
            match = _BRACES.search(name)
            if match is None:
                expanded.append(name)
                continue
            low, high = match.group(1), match.group(2)
            width = len(low)
            expanded += [name[:match.start()] + f"{i:0{width}d}" + name[match.end():]
                         for i in range(int(low), int(high) + 1)]
        names = expanded
    files = sorted({f for name in names for f in glob.glob(name)})
    missing = [n for n in names if not glob.has_magic(n) and not Path(n).is_file()]
    if files and missing:
        raise UserError(f"tar shard {missing[0]} of {pattern} not found")
    return files


# --------------------------------------------------------------------------- streaming batches


def crop_image(image: Tensor, preprocessing: Preprocessing) -> Tensor:
    """One (3, H, W) image resized and centre-cropped exactly as ``Descriptor.preprocess`` does."""
    resized = resize_short_side(image[None], preprocessing.resize_size, preprocessing.interpolation)
    return center_crop(resized, preprocessing.input_size)[0]


class ShardStream(IterableDataset):
    """This rank's shards as a stream of batches (see the module docstring); split further over
    data-loader workers by shard (tars: by tar)."""

    def __init__(
        self,
        shards: Sequence[ShardPlan],
        tars: Sequence[TarUnit],
        shard_size: int,
        batch_size: int,
        preprocessing: Preprocessing | None,
        strict: bool = False,
        input_id: str = "",
    ) -> None:
        self.input_id = input_id
        self.shards = list(shards)
        self.tars = list(tars)
        self.shard_size = shard_size
        self.batch_size = batch_size
        self.preprocessing = preprocessing
        self.strict = strict

    def __len__(self) -> int:
        """Batches in all, for the progress bar: exact for folders / lists; unknown for tars (TypeError,
        which Lightning reads as "no length": a lower bound would end the loop early)."""
        if self.tars:
            raise TypeError("the number of batches of tar shards is known only after reading them")
        return sum(math.ceil(len(s.items) / self.batch_size) or 1 for s in self.shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for shard in self.shards[worker::workers]:
            yield from self._map_shard(shard)
        for unit in self.tars[worker::workers]:
            yield from self._tar_shards(unit)

    def _crop(self, image: Tensor | None) -> Tensor | None:
        if image is None or self.preprocessing is None:
            return image
        return crop_image(image, self.preprocessing)

    def _map_shard(self, shard: ShardPlan) -> Iterator[dict[str, Any]]:
        rows = list(enumerate(shard.items, start=shard.first_row))
        if not rows:
            yield self._batch(shard.name, shard.start, None, [], [], last=True)
            return
        for begin in range(0, len(rows), self.batch_size):
            part = rows[begin:begin + self.batch_size]
            loaded = [(row, item, self._crop(load_image(item.path, strict=self.strict))) for row, item in part]
            good = [(row, {"key": item.key, "caption": item.caption, "label": item.label}, image)
                    for row, item, image in loaded if image is not None]
            skipped = [item.key for _, item, image in loaded if image is None]
            yield self._batch(shard.name, shard.start, None, good, skipped,
                              last=begin + self.batch_size >= len(rows))

    def _tar_shards(self, unit: TarUnit) -> Iterator[dict[str, Any]]:
        """Chunks of ``shard_size`` samples of one tar; its last chunk is marked ``final`` (a damaged
        tar's problem is listed there, and an empty tar gives one empty final chunk)."""
        def name(chunk: int) -> str:
            return f"{unit.prefix}{unit.number:06d}-{chunk:06d}"

        rows: list[tuple[int, dict[str, Any], Tensor]] = []
        skipped: list[str] = []
        problems: list[str] = []
        count = 0
        for number, sample, is_last in _with_last(tar_samples(unit.path, problems)):
            count = number + 1
            chunk = number // self.shard_size
            if name(chunk) in unit.done:
                continue  # read, not decoded: that shard is in the store
            row = self._tar_row(unit, sample, skipped)
            if row is not None:
                rows.append((number, *row))
            end_of_chunk = count % self.shard_size == 0 or is_last
            if end_of_chunk or len(rows) + len(skipped) >= self.batch_size:
                if is_last:
                    skipped += problems
                yield self._batch(name(chunk), None, unit.path, rows, skipped, last=end_of_chunk, final=is_last)
                rows, skipped = [], []
        if count == 0 and name(0) not in unit.done:  # an empty or unreadable tar: one empty final shard
            yield self._batch(name(0), None, unit.path, [], problems, last=True, final=True)

    def _tar_row(self, unit: TarUnit, sample: dict[str, Any], skipped: list[str]) -> tuple[dict, Tensor] | None:
        key = str(sample.get("__key__", "?"))
        field_name = next((s for s in IMAGE_SUFFIXES if s in sample), None)
        if field_name is None:
            skipped.append(key)
            if self.strict:
                raise UserError(f"{unit.path}: sample {key} has no image ({', '.join(IMAGE_SUFFIXES)})")
            return None
        image = self._crop(load_image_bytes(sample[field_name], f"{unit.path}:{key}.{field_name}", strict=self.strict))
        if image is None:
            skipped.append(key)
            return None
        caption = sample.get("txt")
        meta = {"key": key, "caption": caption.decode("utf-8", "replace") if caption is not None else None,
                "label": None}
        return meta, image

    def _batch(self, shard: str, start: int | None, source: str | None,
               rows: Sequence[tuple[int, dict[str, Any], Tensor]], skipped: Sequence[str], last: bool,
               final: bool = False) -> dict[str, Any]:
        images: Tensor | list[Tensor]
        if self.preprocessing is not None:
            size = self.preprocessing.input_size
            images = torch.stack([r[2] for r in rows]) if rows else torch.empty(0, 3, size, size)
        else:
            images = [r[2] for r in rows]
        return {
            "images": images,
            "index": torch.tensor([r[0] for r in rows], dtype=torch.long),
            "keys": [r[1]["key"] for r in rows],
            "captions": [r[1]["caption"] for r in rows],
            "labels": [r[1]["label"] for r in rows],
            "shard": shard, "start": start, "source": source,
            "skipped": list(skipped), "last": last,
            "info": {"input": self.input_id, **({"final": True} if final else {})},
        }


def tar_samples(path: str, problems: list[str]) -> Iterator[dict[str, Any]]:
    """Samples of one tar via ``webdataset`` (no shuffling, no node / worker splitting: the caller
    assigns whole tars); a damaged tar ends early with its problem listed in ``problems``."""
    import webdataset as wds

    def handler(error: Exception) -> bool:
        problems.append(f"{path}: unreadable after this point ({type(error).__name__}: {error})")
        return False  # stop reading this tar

    damage = _tar_damage(path)
    if damage:  # a header cut short reads as a clean end of the archive: say so
        problems.append(f"{path}: {damage}")
    yield from wds.tarfile_samples([{"url": path}], handler=handler)


def _tar_damage(path: str) -> str | None:
    """Why a local tar is visibly truncated (size not whole 512-byte blocks, or no end-of-archive
    zero blocks), or None."""
    file = Path(path)
    if not file.is_file():
        return None
    size = file.stat().st_size
    if size % 512:
        return f"truncated ({size} bytes is not a whole number of 512-byte tar blocks)"
    with open(file, "rb") as handle:
        handle.seek(max(0, size - 1024))
        if handle.read().strip(b"\0"):
            return "truncated (no end-of-archive marker)"
    return None


def _with_last(items: Iterator[Any]) -> Iterator[tuple[int, Any, bool]]:
    """``(number, item, is_last)`` with one item of look-ahead."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    number = 0
    for following in iterator:
        yield number, current, False
        current, number = following, number + 1
    yield number, current, True


def _collate_identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def self_batching_loader(stream: IterableDataset, num_workers: int = 0) -> DataLoader:
    """A loader over a stream that yields whole batches with an exact length per rank (this rank's
    share, planned by the caller): no sampler, no collation, and none of Lightning's warnings about
    such streams (their length, batch indices it cannot infer, a rank with nothing to do)."""
    warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
    warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices.*")
    warnings.filterwarnings("ignore", message=r".*Total length of `DataLoader` across ranks is zero.*")
    return DataLoader(stream, batch_size=None, num_workers=num_workers, collate_fn=_collate_identity,
                      persistent_workers=False)


# --------------------------------------------------------------------------- datamodule


class ExtractionDataModule(pl.LightningDataModule):
    """Images to embed into a feature store (used with ``callbacks.store_writer.StoreWriterCallback``).

    Args:
        source: an image folder (recursive), a ``.txt`` / ``.tsv`` file list, a ``.tar`` shard,
            a folder of ``.tar`` shards, or a glob / brace pattern of them.
        batch_size: images per batch (a batch never crosses a store shard).
        num_workers: data-loader processes decoding and cropping images.
        labels_from_folders: use each image's sub-folder as its class label (folder inputs).
        strict: stop at the first unreadable image instead of skipping it.
        shard_prefix: starts the names of this input's shards; needed to add a second input to
            an existing store (its shards are ordered after those already there).
    """

    def __init__(
        self,
        source: str,
        batch_size: int = 64,
        num_workers: int = 0,
        labels_from_folders: bool = False,
        strict: bool = False,
        shard_prefix: str = "",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.labels_from_folders = labels_from_folders
        self.strict = strict
        if shard_prefix and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", shard_prefix):
            raise UserError(f"shard_prefix must be letters, digits, '_', '-', '.', got {shard_prefix!r}")
        self.shard_prefix = shard_prefix
        self._input: ImageSource | None = None
        self._stream: ShardStream | None = None

    @property
    def input(self) -> ImageSource:
        """The resolved input (listed once)."""
        if self._input is None:
            self._input = ImageSource.resolve(self.source, self.labels_from_folders)
        return self._input

    def configure(
        self,
        shard_size: int,
        preprocessing: Preprocessing | None,
        done: Mapping[str, Mapping[str, Any] | None] | None = None,
        rank: int = 0,
        world_size: int = 1,
        base: int = 0,
    ) -> ShardStream:
        """Set this rank's share of the work (called by the store writer before predicting)."""
        shards, tars = self.input.plan(shard_size, done, self.shard_prefix, base)
        self._stream = ShardStream(shards[rank::world_size], tars[rank::world_size], shard_size,
                                   self.batch_size, preprocessing, self.strict, self.input.location)
        return self._stream

    def predict_dataloader(self) -> DataLoader:
        if self._stream is None:
            raise UserError("ExtractionDataModule needs a StoreWriterCallback in trainer.callbacks "
                            "(it says where the store goes and which shards are left)")
        return self_batching_loader(self._stream, self.num_workers)
