"""Captioned training images from an image folder, a caption list, webdataset shards or procedural scenes.

Every reader gives a :class:`CaptionedSet`: the images (uint8, converted on load by the caller's
``store`` function so a large set is never held at full size), a unique key per image, where
each came from, its captions (one or several, in source order: the first is the image's own
caption) and the images skipped with the reason.

- a folder (recursive): every image with a sidecar ``NAME.txt`` beside it; each non-blank line of
  the sidecar is a caption. Key: the path relative to the folder without its suffix;
- a ``.csv`` or ``.jsonl`` list of ``(file, caption)`` rows (columns found by name: ``file``,
  ``path``, ``image`` or ``filename`` / ``caption``, ``text`` or ``prompt``, or given), or a ``.tsv``
  ``path<TAB>caption`` list (:func:`datamodules.extraction_inputs.read_file_list`); several rows
  per file give several captions, blank captions are ignored; relative paths are relative to the
  list's folder. Key: the file as listed, without its suffix;
- webdataset tars (a ``.tar``, a folder of them, a glob or ``shards/{00000..00009}.tar``): each
  sample's image (``jpg``, ``jpeg``, ``png``, ``webp``), captions from ``.txt`` (a caption a line)
  or else ``.json`` (``caption``, ``text`` or ``prompt``: a string or a list). Key:
  ``<tar name>/<sample key>``;
- procedural: scene ``i`` of :class:`datamodules.procedural.ProceduralScenes` with its
  paraphrased captions (:func:`datamodules.scene_captions.seed_captions`). Key: ``scene_00000``.

Keys are made safe as relative file names (:func:`safe_keys`: letters, digits, ``._-`` in each
``/``-separated part, a suffix ``~2``, ``~3`` on a clash). An image that cannot be read, or has no
caption, is skipped and listed with the reason (``strict``: the first one ends the run).
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from torch import Tensor

from datamodules.extraction_inputs import (
    IMAGE_SUFFIXES,
    expand_tar_pattern,
    read_file_list,
    tar_samples,
)
from datamodules.procedural import ProceduralScenes
from datamodules.prompts import CAPTION_COLUMNS, pick_column
from datamodules.scene_captions import seed_captions
from lit.errors import UserError
from lit.io import ImageLoadError, load_image, load_image_bytes, scan_images, shorten

FILE_COLUMNS = ("file", "path", "image", "filename")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

#: Converts a loaded float [0, 1] image into the form the set keeps (e.g. resized uint8).
Store = Callable[[Tensor], Tensor]


@dataclass
class CaptionedSet:
    """Captioned training images in source order (``keys``, ``sources``, ``captions`` and ``images``
    line up) and the skipped ones as ``(name, reason)``."""

    keys: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    captions: list[tuple[str, ...]] = field(default_factory=list)
    images: list[Tensor] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_captioned(source: str, store: Store, *, strict: bool = False, caption_column: str | None = None,
                   file_column: str | None = None) -> CaptionedSet:
    """The captioned images of ``source`` (a folder, a ``.csv`` / ``.jsonl`` / ``.tsv`` list, or tars)."""
    path = Path(source).expanduser()
    reader = _Reader(store, strict)
    if path.is_dir() and not any(path.glob("*.tar")):
        reader.folder(path)
    elif path.is_file() and path.suffix.lower() in (".csv", ".jsonl", ".tsv"):
        reader.listed(path, _rows(path, caption_column, file_column))
    else:
        tars = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else expand_tar_pattern(str(path))
        if not tars:
            raise UserError(f"captioned source {source} not found (an image folder with .txt captions, a .csv / "
                            ".jsonl / .tsv list of file and caption, a .tar shard or a pattern such as "
                            "shards/{00000..00009}.tar)")
        for tar in tars:
            reader.tar(tar)
    return reader.finish(source)


def procedural_set(count: int, store: Store, *, seed: int = 0, size: int = 32, captions: int = 1) -> CaptionedSet:
    """``count`` procedural scenes (scene ``i`` is ``ProceduralScenes(count, size, seed)[i]``), each with
    ``captions`` paraphrases made from its parameters."""
    scenes = ProceduralScenes(count, size=size, seed=seed)
    width = max(5, len(str(count - 1)))
    result = CaptionedSet()
    for index in range(count):
        result.keys.append(f"scene_{index:0{width}d}")
        result.sources.append(scenes.path(index))
        result.captions.append(tuple(seed_captions(scenes.scene_seed(index), captions, scenes.num_objects)))
        result.images.append(store(scenes[index]["image"]))
    return result


def safe_keys(names: list[str]) -> list[str]:
    """One unique relative file name (no suffix) per name: the path without its suffix, each ``/`` part
    reduced to letters, digits and ``._-`` (no empty, ``.`` or ``..`` parts); clashes get ``~2``, ``~3``."""
    keys: list[str] = []
    taken: set[str] = set()
    for name in names:
        path = PurePosixPath(name.replace("\\", "/"))
        parts = [_UNSAFE.sub("_", part) for part in path.with_suffix("").parts if part not in ("/", ".", "..")]
        base = "/".join(part for part in parts if part.strip("._")) or "image"
        key, number = base, 1
        while key in taken:
            number += 1
            key = f"{base}~{number}"
        taken.add(key)
        keys.append(key)
    return keys


class _Reader:
    """Collects images and skips for one source."""

    def __init__(self, store: Store, strict: bool) -> None:
        self.store = store
        self.strict = strict
        self.names: list[str] = []
        self.result = CaptionedSet()

    def skip(self, name: str, reason: str) -> None:
        if self.strict:
            raise ImageLoadError(f"cannot use image {name}: {reason} (strict)")
        self.result.skipped.append((name, reason))

    def add(self, name: str, source: str, captions: tuple[str, ...], image: Tensor | None) -> None:
        if image is None:
            return
        self.names.append(name)
        self.result.sources.append(source)
        self.result.captions.append(captions)
        self.result.images.append(self.store(image))

    def load(self, path: Path) -> Tensor | None:
        """The image at ``path``, or None with the file skipped."""
        try:
            return load_image(path, strict=True)
        except ImageLoadError as error:
            self.skip(str(path), str(error).removeprefix(f"cannot load image {path}: "))
            return None

    def folder(self, root: Path) -> None:
        listing = scan_images(root)
        for path, reason in listing.skipped:
            self.skip(str(path), reason)
        for path in listing.paths:
            sidecar = path.with_suffix(".txt")
            captions = _lines(sidecar.read_text(encoding="utf-8", errors="replace")) if sidecar.is_file() else ()
            if not captions:
                self.skip(str(path), f"no caption ({sidecar.name} {'is empty' if sidecar.is_file() else 'missing'})")
                continue
            self.add(path.relative_to(root).as_posix(), str(path), captions, self.load(path))

    def listed(self, listing: Path, rows: list[tuple[str, str]]) -> None:
        captions: dict[str, list[str]] = {}
        for name, caption in rows:
            captions.setdefault(name, [])
            if caption.strip():
                captions[name].append(caption.strip())
        for name, texts in captions.items():
            file = Path(name).expanduser()
            file = file if file.is_absolute() else listing.parent / file
            if not texts:
                self.skip(str(file), f"no caption in {listing.name}")
                continue
            self.add(name, str(file), tuple(texts), self.load(file))

    def tar(self, tar: str) -> None:
        problems: list[str] = []
        stem = Path(tar).name.removesuffix(".tar")
        for sample in tar_samples(tar, problems):
            key = str(sample.get("__key__", "?"))
            name = f"{tar}:{key}"
            suffix = next((s for s in IMAGE_SUFFIXES if s in sample), None)
            captions = _sample_captions(sample)
            if suffix is None:
                self.skip(name, f"no image ({', '.join(IMAGE_SUFFIXES)})")
            elif not captions:
                self.skip(name, "no caption (.txt or .json)")
            else:
                try:
                    image = load_image_bytes(sample[suffix], f"{name}.{suffix}", strict=True)
                except ImageLoadError as error:
                    self.skip(name, str(error).removeprefix(f"cannot load image {name}.{suffix}: "))
                    continue
                self.add(f"{stem}/{key}", f"{name}.{suffix}", captions, image)
        for problem in problems:
            self.skip(tar, problem.removeprefix(f"{tar}: "))

    def finish(self, source: str) -> CaptionedSet:
        result = self.result
        result.keys = safe_keys(self.names)
        if result.skipped:
            warnings.warn(f"{len(result.skipped)} image(s) of {source} skipped: "
                          f"{shorten([f'{name} ({reason})' for name, reason in result.skipped], 3)}",
                          UserWarning, stacklevel=3)
        if not result.images:
            first = f" (e.g. {result.skipped[0][0]}: {result.skipped[0][1]})" if result.skipped else ""
            raise UserError(f"no captioned image could be read from {source}{first}")
        return result


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _sample_captions(sample: dict[str, Any]) -> tuple[str, ...]:
    """A tar sample's captions: the lines of its ``.txt``, else its ``.json`` caption / text / prompt."""
    if sample.get("txt") is not None and _lines(sample["txt"].decode("utf-8", "replace")):
        return _lines(sample["txt"].decode("utf-8", "replace"))
    if sample.get("json") is None:
        return ()
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError):
        return ()
    value = next((meta[c] for c in CAPTION_COLUMNS if isinstance(meta, dict) and meta.get(c)), None)
    texts = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
    return tuple(t.strip() for t in texts if isinstance(t, str) and t.strip())


def _rows(path: Path, caption_column: str | None, file_column: str | None) -> list[tuple[str, str]]:
    """``(file, caption)`` rows of a ``.csv``, ``.jsonl`` or ``.tsv`` list."""
    if path.suffix.lower() == ".tsv":
        return [(item.key, item.caption or "") for item in read_file_list(path)]
    records = list(_records(path))
    if not records:
        raise UserError(f"{path} lists no images")
    columns = list(records[0])
    file_key = pick_column(str(path), columns, file_column, FILE_COLUMNS, "file", required=True)
    caption_key = pick_column(str(path), columns, caption_column, CAPTION_COLUMNS, "caption", required=True)
    rows = []
    for number, record in enumerate(records, start=1):
        name = record.get(file_key)
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{path}: row {number} has no {file_key}")
        caption = record.get(caption_key)
        rows.append((name.strip(), caption if isinstance(caption, str) else ""))
    return rows


def _records(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            yield from csv.DictReader(handle)
        return
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise UserError(f"{path}:{number}: not a JSON object ({error})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: not a JSON object")
        yield record


__all__ = ["CAPTION_COLUMNS", "FILE_COLUMNS", "CaptionedSet", "procedural_set", "read_captioned", "safe_keys"]
