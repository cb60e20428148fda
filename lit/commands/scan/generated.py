"""A ``lit generate`` output folder as the generations of a scan.

``lit scan --generations OUT`` knows a folder that ``lit generate`` wrote (``OUT/generations.csv``
and ``OUT/generate_manifest.json`` beside the images in ``OUT/images/``): every scanned image is
joined, by its path relative to ``OUT``, to its row of ``generations.csv`` (prompt, source key,
seed, memorization scores, prompt index, image index, ablation variant, and the prompt the image
was generated from when ``--random_words`` changed it), and the rows' source keys
are looked up among the training set's keys (:func:`match_source_keys`).

- :func:`is_generate_folder`, :func:`read_generate_folder`: detect and read the folder (columns
  checked: a missing column is a one-line error naming the file; a row that cannot be read is
  skipped and counted);
- :func:`join_generations`: rows to the scan's generation rows; rows whose image was not scanned
  (missing or unreadable) and images without a row are counted, never fatal;
- :func:`match_source_keys`: the training row of each source key (the rule is in its docstring);
- :class:`GeneratedScan`: all of it, joined, for the engine (source rows), ``matches.csv``,
  ``summary.json`` and the report.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch import Tensor

from lit.commands.scan.sources import FeatureSource, StoreSource
from lit.errors import UserError

GENERATIONS_CSV = "generations.csv"
PROMPTS_CSV = "prompts.csv"
MANIFEST = "generate_manifest.json"
#: The manifest format this scan reads (``lit generate``'s ``format``: ``lit-generate/<version>``).
FORMAT = "lit-generate/1"
#: Columns every ``generations.csv`` has (the issue's contract); the rest have defaults.
REQUIRED = ("file", "prompt", "source_key", "seed", "memorization_score", "memorization_score_first")
OPTIONAL = ("prompt_index", "image_index", "variant", "generated_prompt")
#: The columns a generate folder adds to matches.csv, in order (then ``generated_prompt`` when a
#: prompt was changed by ``lit generate --random_words``, and ``source_similarity`` with source keys).
MATCH_COLUMNS = ("prompt", "source_key", "seed", "memorization_score", "memorization_score_first", "variant")
#: How many names each counted problem lists in summary.json (the count is always whole).
LISTED = 20
#: How a row without a file name is listed among the rows without an image.
NO_FILE = "(no file name)"


@dataclass(frozen=True)
class Generation:
    """One row of ``generations.csv``."""

    file: str  # relative to the folder, POSIX separators
    prompt: str
    source_key: str | None
    seed: int
    memorization_score: float
    memorization_score_first: float
    prompt_index: int
    image_index: int
    variant: str = ""
    generated_prompt: str = ""  # the prompt the image was made from (``prompt`` plus added words); "" read as prompt


@dataclass
class GenerateFolder:
    """A ``lit generate`` folder as read: its manifest, its good rows, the rows skipped (line, reason)."""

    folder: Path
    manifest: dict[str, Any]
    rows: list[Generation]
    bad_rows: list[tuple[int, str]] = field(default_factory=list)

    @property
    def score_only(self) -> bool:
        """Written by ``lit generate --score_only``: scores, no images."""
        return bool(self.manifest.get("score_only")) or (bool(self.rows) and not any(r.file for r in self.rows))


def is_generate_folder(path: str | Path) -> bool:
    """A folder holding both ``generations.csv`` and ``generate_manifest.json``."""
    folder = Path(path).expanduser()
    return folder.is_dir() and (folder / GENERATIONS_CSV).is_file() and (folder / MANIFEST).is_file()


def normalized_file(name: str) -> str:
    """A relative file name in one spelling: POSIX separators, no ``./`` parts."""
    parts = [p for p in PurePosixPath(name.strip().replace("\\", "/")).parts if p not in ("", ".")]
    return "/".join(parts)


def read_generate_folder(path: str | Path) -> GenerateFolder:
    """Read and check ``generations.csv`` and ``generate_manifest.json`` of a ``lit generate`` folder.

    A manifest that is not JSON or of another format, or a CSV without a required column, is a
    :class:`UserError` naming the file; a row whose values cannot be read (a seed that is not an
    integer, a score that is not a finite number, a file named twice) is skipped and counted."""
    folder = Path(path).expanduser()
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{manifest_path}: not a readable lit generate manifest ({error})") from None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("lit-generate/"):
        raise UserError(f"{manifest_path}: not a lit generate manifest (no \"format\": \"{FORMAT}\")")
    if manifest["format"] != FORMAT:
        raise UserError(f"{manifest_path}: format {manifest['format']!r}, this lit scan reads {FORMAT!r}")
    table = folder / GENERATIONS_CSV
    try:
        with open(table, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or [])
            missing = [name for name in REQUIRED if name not in header]
            if missing:
                raise UserError(f"{table}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                                f"(lit generate writes {', '.join(REQUIRED + OPTIONAL)})")
            rows, bad = _rows(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{table}: cannot be read ({error})") from None
    return GenerateFolder(folder, manifest, rows, bad)


def _rows(reader: csv.DictReader) -> tuple[list[Generation], list[tuple[int, str]]]:
    rows: list[Generation] = []
    bad: list[tuple[int, str]] = []
    seen: set[str] = set()
    for number, record in enumerate(reader):
        line = reader.line_num
        try:
            row = _generation(record, number)
        except ValueError as error:
            bad.append((line, str(error)))
            continue
        if row.file and row.file in seen:
            bad.append((line, f"file {row.file} named twice"))
            continue
        seen.add(row.file)
        rows.append(row)
    return rows, bad


def _generation(record: dict[str, str | None], number: int) -> Generation:
    """One CSV record as a :class:`Generation` (``ValueError`` naming the column that cannot be read)."""
    def text(name: str) -> str:
        value = record.get(name)
        return "" if value is None else str(value)

    def integer(name: str, default: int | None = None) -> int:
        value = text(name).strip()
        if not value and default is not None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} {value!r} is not an integer") from None

    def score(name: str) -> float:
        value = text(name).strip()
        try:
            number_ = float(value)
        except ValueError:
            raise ValueError(f"{name} {value!r} is not a number") from None
        if not math.isfinite(number_):
            raise ValueError(f"{name} {value!r} is not a finite number")
        return number_

    key = text("source_key").strip()
    return Generation(file=normalized_file(text("file")), prompt=text("prompt"), source_key=key or None,
                      seed=integer("seed"), memorization_score=score("memorization_score"),
                      memorization_score_first=score("memorization_score_first"),
                      prompt_index=integer("prompt_index", number), image_index=integer("image_index", 0),
                      variant=text("variant").strip(), generated_prompt=text("generated_prompt") or text("prompt"))


def relative_keys(source: FeatureSource, folder: Path | None = None) -> list[str]:
    """Each row's key as its input named it: the path relative to the input folder for a folder
    (a store's own keys), the key of a store, tar or list; for features in memory the key, made
    relative to ``folder`` when it lies inside."""
    if isinstance(source, StoreSource):
        return [normalized_file(key) for key in source.store.keys]
    keys = []
    root = None if folder is None else folder.expanduser().resolve()
    for key in source.keys:
        path = Path(key)
        if root is not None and path.is_absolute():
            try:
                key = path.resolve().relative_to(root).as_posix()
            except ValueError:
                pass
        keys.append(normalized_file(key))
    return keys


def join_generations(folder: GenerateFolder, files: Sequence[str]) -> tuple[list[Generation | None], list[str], list[str]]:
    """Rows of ``generations.csv`` for the scan's generation rows (named by ``files``, relative to the
    folder): ``(row per generation or None, files of rows without a scanned image, scanned images
    without a row)``; a row with an empty file name is listed as :data:`NO_FILE`."""
    by_file = {row.file: row for row in folder.rows if row.file}
    joined = [by_file.get(normalized_file(name)) for name in files]
    scanned = {normalized_file(name) for name in files}
    without_image = [row.file or NO_FILE for row in folder.rows if not row.file or row.file not in scanned]
    without_row = [name for name, row in zip(files, joined) if row is None]
    return joined, without_image, without_row


# ----------------------------------------------------------------------------- source keys


def _parts(key: str) -> tuple[str, ...]:
    return tuple(p for p in PurePosixPath(key.strip().replace("\\", "/")).parts if p not in ("", ".", "/"))


def _stem(name: str) -> str:
    return PurePosixPath(name).stem if PurePosixPath(name).suffix else name


def _match_quality(source: tuple[str, ...], training: tuple[str, ...]) -> tuple[int, int]:
    """``(common trailing components, last name equal with its extension)``; ``(0, 0)`` for no match.

    The last names match whole, or when one of them has no extension and equals the other without
    its extension; every earlier component of the shorter path must equal the longer one's."""
    a, b = source[-1], training[-1]
    if not (a == b or _stem(a) == b or a == _stem(b)):
        return 0, 0
    n = min(len(source), len(training))
    if source[len(source) - n:-1] != training[len(training) - n:-1]:
        return 0, 0
    return n, int(a == b)


@dataclass(frozen=True)
class SourceLookup:
    """Where each generation's source key was found: its training row (-1: none) and the counts."""

    rows: Tensor  # (G,) int64
    with_key: int
    not_found: list[str]  # distinct keys found in no training row
    ambiguous: list[str]  # distinct keys that name two training rows equally well
    missing_generations: int  # generations whose key was not found (or was ambiguous)

    def record(self) -> dict[str, Any]:
        """JSON-able counts (and the first :data:`LISTED` keys of each problem)."""
        return {"generations_with_source_key": self.with_key,
                "generations_with_source_found": int((self.rows >= 0).sum()),
                "generations_with_source_not_found": self.missing_generations,
                "keys_not_found": len(self.not_found), "keys_not_found_listed": self.not_found[:LISTED],
                "keys_ambiguous": len(self.ambiguous), "keys_ambiguous_listed": self.ambiguous[:LISTED],
                "rule": MATCH_RULE}


#: The source-key rule in words (summary.json carries it).
MATCH_RULE = ("a source key names the training image whose key (its path relative to the training folder, or "
              "the store / tar / list key) shares the longest trailing path with it: one path's components "
              "are the other's last ones, the last names equal whole or with the extension left out on one "
              "side; two training images matching equally well leave the key ambiguous (not found)")


def match_source_keys(source_keys: Sequence[str | None], training_keys: Iterable[str]) -> SourceLookup:
    """The training row named by each source key (``None``: no key), read in one pass over
    ``training_keys`` (only the rows whose last name could match are kept).

    Rule: a source key and a training key match when the components of one path are the last
    components of the other (``laion/00012/000120034.jpg`` matches ``00012/000120034.jpg`` and
    ``000120034.jpg``), the last names equal whole or once the extension is left out on one side
    (``000120034`` matches ``000120034.jpg``; ``a.png`` never matches ``a.jpg``). Of the training
    keys that match, the one sharing the most trailing components wins, then the one whose last
    name equals with its extension; a tie between two training rows leaves the key ambiguous,
    counted as not found."""
    wanted: set[str] = set()
    parsed: dict[str, tuple[str, ...]] = {}
    for key in source_keys:
        if key is not None and key not in parsed:
            parts = _parts(key)
            parsed[key] = parts
            if parts:
                wanted.update({parts[-1], _stem(parts[-1])})
    candidates: dict[str, list[tuple[int, tuple[str, ...]]]] = {}
    for row, key in enumerate(training_keys):
        last = key.rsplit("/", 1)[-1]
        if last in wanted or _stem(last) in wanted:
            parts = _parts(key)
            if parts:
                for name in {parts[-1], _stem(parts[-1])}:
                    candidates.setdefault(name, []).append((row, parts))
    found: dict[str, int] = {}
    ambiguous: list[str] = []
    for key, parts in parsed.items():
        if not parts:
            continue
        best: tuple[int, int] = (0, 0)
        rows: set[int] = set()
        for name in {parts[-1], _stem(parts[-1])}:
            for row, training in candidates.get(name, []):
                quality = _match_quality(parts, training)
                if quality[0] == 0:
                    continue
                if quality > best:
                    best, rows = quality, {row}
                elif quality == best:
                    rows.add(row)
        if len(rows) == 1:
            found[key] = rows.pop()
        elif rows:
            ambiguous.append(key)
    result = torch.tensor([found.get(key, -1) if key is not None else -1 for key in source_keys], dtype=torch.int64)
    with_key = sum(key is not None for key in source_keys)
    not_found = [key for key in parsed if key not in found and key not in ambiguous]
    return SourceLookup(result, with_key, not_found, ambiguous, with_key - int((result >= 0).sum()))


# ----------------------------------------------------------------------------- the joined scan


@dataclass
class GeneratedScan:
    """A generate folder joined to a scan: one :class:`Generation` (or None) per generation row,
    the counted problems, and where the source keys were found (None: no generation has a key)."""

    folder: GenerateFolder
    generations: list[Generation | None]
    rows_without_image: list[str]
    images_without_row: list[str]
    sources: SourceLookup | None

    @property
    def source_rows(self) -> Tensor | None:
        """Each generation's caption-source training row (-1: none), or None when none was found."""
        if self.sources is None or not bool((self.sources.rows >= 0).any()):
            return None
        return self.sources.rows

    def record(self) -> dict[str, Any]:
        """summary.json's account of the folder: where, what wrote it, and what did not join."""
        bad = self.folder.bad_rows
        return {"folder": str(self.folder.folder), "manifest": self.folder.manifest,
                "rows": len(self.folder.rows) + len(bad), "joined": sum(g is not None for g in self.generations),
                "bad_rows": len(bad), "bad_rows_listed": [{"line": line, "reason": reason} for line, reason in bad[:LISTED]],
                "rows_without_image": len(self.rows_without_image),
                "rows_without_image_listed": self.rows_without_image[:LISTED],
                "images_without_row": len(self.images_without_row),
                "images_without_row_listed": self.images_without_row[:LISTED],
                "source_keys": None if self.sources is None else self.sources.record()}

    def warnings(self) -> list[str]:
        """What the console says about rows and images that did not join, and source keys not found."""
        lines = []
        name = self.folder.folder / GENERATIONS_CSV
        if self.folder.bad_rows:
            line, reason = self.folder.bad_rows[0]
            lines.append(f"warning: {name}: {len(self.folder.bad_rows)} rows could not be read and were left out "
                         f"(first: line {line}, {reason})")
        if self.rows_without_image:
            lines.append(f"warning: {name}: {len(self.rows_without_image)} rows name images that were not scanned "
                         f"(missing or unreadable; first: {self.rows_without_image[0]})")
        if self.images_without_row:
            lines.append(f"warning: {len(self.images_without_row)} scanned images have no row in {name} (no prompt "
                         f"or score; first: {self.images_without_row[0]})")
        if self.sources is not None and self.sources.missing_generations:
            s = self.sources
            lines.append(f"warning: {s.missing_generations} of {s.with_key} generations name a source key found in "
                         f"no training image ({len(s.not_found)} keys not found"
                         f"{f', {len(s.ambiguous)} ambiguous' if s.ambiguous else ''}"
                         f"{f'; first: {(s.not_found or s.ambiguous)[0]}' if s.not_found or s.ambiguous else ''})")
        return lines


def generated_scan(folder: GenerateFolder, generations: FeatureSource, training: FeatureSource) -> GeneratedScan:
    """Join ``folder`` to the scan's generation rows and find the source keys among the training keys."""
    joined, without_image, without_row = join_generations(folder, relative_keys(generations, folder.folder))
    keys = [None if g is None else g.source_key for g in joined]
    sources = match_source_keys(keys, relative_keys(training)) if any(k is not None for k in keys) else None
    return GeneratedScan(folder, joined, without_image, without_row, sources)
