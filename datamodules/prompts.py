"""Prompt sources for text-to-image generation: reading, seeded drawing, and the word-ablation study.

A **prompt source** is one of:

- a ``.txt`` file: one prompt a line (a blank line is skipped and counted; a prompt may start with
  ``#``: there are no comments);
- a ``.csv`` / ``.tsv`` / ``.jsonl`` file with a caption column and an optional key column (the
  training image the caption belongs to). Columns are found by name, case-insensitively: the caption
  in ``caption``, ``text`` or ``prompt``, the key in ``key``, ``file``, ``id`` or ``url`` (first match
  in that order); ``caption_column`` / ``key_column`` name them explicitly. CSV and TSV have a header
  row and are quoted as Python's ``csv`` module and pandas write them; JSON Lines hold one object a line;
- a feature store folder (:mod:`lit.store`) whose shards recorded captions (extracted from
  webdataset tars with ``.txt`` captions, or a ``path<TAB>caption`` list): the keys are the store's row
  keys, so a prompt knows its caption-source image in that store. Reading them checks every shard of
  the store once (its SHA-256), as every use of a store does;
- webdataset tars (a ``.tar`` file, a folder of ``.tar`` shards read in sorted name order, or a pattern
  such as ``shards/{00000..00099}.tar``): the caption is a sample's ``.txt``, else the
  ``caption`` / ``text`` / ``prompt`` field of its ``.json``; the key is the sample's ``__key__``.

Files are read as UTF-8 (a byte-order mark is ignored). Each prompt loses its surrounding whitespace and
nothing else (inner spaces, newlines of a quoted CSV field and any Unicode are kept). A row that cannot
give a prompt (blank, malformed JSON, empty caption, not UTF-8, a sample without caption...) is skipped
and counted by reason in :attr:`PromptSourceRows.skipped`, never an error; a missing source, an unknown
kind, a named column that does not exist or a source without a single usable prompt is a one-line
:class:`~lit.errors.UserError` naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.extraction_inputs import tar_samples, expand_tar_pattern
from lit.errors import UserError
from lit.seeding import derive_seed
from lit.store import is_store, open_store

CAPTION_COLUMNS = ("caption", "text", "prompt")
"""Column (or JSON field) names taken as the caption, in this order of preference (case-insensitive)."""
KEY_COLUMNS = ("key", "file", "id", "url")
"""Column names taken as the source key, in this order of preference (case-insensitive)."""
TABLE_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl"}
KINDS = ("txt", "csv", "tsv", "jsonl", "store", "webdataset")
"""What :attr:`PromptSourceRows.kind` can be."""

# Reasons a row is skipped: nouns that take a plural "s" (see prompt_source_summary).
BLANK = "blank line"
EMPTY = "empty caption"
MISSING = "missing caption"
NOT_TEXT = "non-text caption"
BAD_JSON = "bad JSON line"
NOT_OBJECT = "non-object JSON line"
MALFORMED = "malformed row"
NOT_UTF8 = "non-UTF-8 row"
DAMAGED_TAR = "unreadable tar end"

_UNDECODABLE = re.compile("[\udc80-\udcff]")
"""Lone surrogates that ``surrogateescape`` decoding leaves for bytes that are not UTF-8."""


@dataclass(frozen=True, slots=True)
class PromptRow:
    """One usable row of a prompt source, in source order: the caption (surrounding whitespace removed)
    and the source key (the training image it came from), None when the source has none."""

    caption: str
    key: str | None


@dataclass(frozen=True)
class PromptSourceRows:
    """What :func:`read_prompt_source` read.

    Attributes:
        rows: the usable rows, in source order.
        skipped: reason -> count of the rows skipped (``"blank line"``, ``"bad JSON line"``, ...).
        kind: one of :data:`KINDS`.
        path: the source as given, made absolute.
        caption_column, key_column: the columns read (CSV / TSV / JSON Lines; None otherwise, and
            ``key_column`` None when the table has no key column).
    """

    rows: list[PromptRow]
    skipped: dict[str, int]
    kind: str
    path: Path
    caption_column: str | None = None
    key_column: str | None = None

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True, slots=True)
class Prompt:
    """A prompt to generate from: its position in the run (``index``), the text, the key of its
    caption-source image (None when the source has none) and the ablation variant it is ("" unless
    it comes from :func:`ablation_prompts`)."""

    index: int
    text: str
    source_key: str | None
    variant: str = ""


# --------------------------------------------------------------------------- reading


def read_prompt_source(path: str | Path, *, caption_column: str | None = None,
                       key_column: str | None = None) -> PromptSourceRows:
    """Read every usable prompt of the source at ``path`` (module docstring: what a source can be).

    ``caption_column`` / ``key_column`` name the columns of a CSV / TSV / JSON Lines source (exactly,
    or else case-insensitively); they are refused for the other kinds, which have no columns.
    """
    source = Path(path).expanduser().absolute()
    kind, tars = _kind_of(source, str(path))
    if kind not in TABLE_KINDS.values() and (caption_column is not None or key_column is not None):
        raise UserError(f"{source} is a {_KIND_NAMES[kind]}: it has no columns to choose "
                        "(a caption or key column applies to .csv, .tsv and .jsonl sources)")
    skipped: Counter[str] = Counter()
    columns: tuple[str | None, str | None] = (None, None)
    if kind == "txt":
        rows = list(_txt_rows(source, skipped))
    elif kind in ("csv", "tsv"):
        rows, columns = _table_rows(source, kind, caption_column, key_column, skipped)
    elif kind == "jsonl":
        rows, columns = _jsonl_rows(source, caption_column, key_column, skipped)
    elif kind == "store":
        rows = _store_rows(source, skipped)
    else:
        rows = list(_tar_rows(tars, skipped))
    result = PromptSourceRows(rows, dict(skipped), kind, source, *columns)
    if not rows:
        detail = f" ({_skipped_text(result.skipped)} skipped)" if result.skipped else ""
        raise UserError(f"prompt source {source} holds no usable prompt{detail}")
    return result


_KIND_NAMES = {"txt": ".txt file (one prompt a line)", "csv": ".csv file", "tsv": ".tsv file",
               "jsonl": ".jsonl file", "store": "feature store", "webdataset": "webdataset source"}


def _kind_of(source: Path, given: str) -> tuple[str, list[str]]:
    """The kind of source at ``source`` and, for webdataset sources, its tar files in reading order."""
    if source.is_dir():
        if is_store(source):
            return "store", []
        tars = sorted(str(p) for p in source.glob("*.tar") if p.is_file())
        if not tars:
            raise UserError(f"prompt source {source} is a folder that is neither a feature store nor a folder "
                            "of .tar shards")
        return "webdataset", tars
    if source.is_file():
        suffix = source.suffix.lower()
        if suffix == ".txt":
            return "txt", []
        if suffix in TABLE_KINDS:
            return TABLE_KINDS[suffix], []
        if suffix == ".tar":
            return "webdataset", [str(source)]
        raise UserError(f"prompt source {source}: expected a .txt, .csv, .tsv or .jsonl file, a feature store "
                        "folder, a .tar shard or a folder of them")
    tars = expand_tar_pattern(str(source)) if any(c in given for c in "*?[{") else []
    if tars:
        return "webdataset", tars
    raise UserError(f"prompt source {source} not found")


def _text(source: Path) -> str:
    """The file decoded as UTF-8 (BOM dropped); bytes that are not UTF-8 become lone surrogates, so the
    rows holding them are skipped, not the file refused."""
    try:
        data = source.read_bytes()
    except OSError as error:
        raise UserError(f"prompt source {source} cannot be read ({error.strerror or error})") from None
    return data.decode("utf-8-sig", errors="surrogateescape")


def _lines(text: str) -> Iterator[str]:
    """Lines split at ``\\n`` only (a ``\\r`` before it dropped): Unicode line separators inside a
    prompt stay in it. A final newline does not make a last, blank line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for line in lines:
        yield line.removesuffix("\r")


def _caption(value: Any, skipped: Counter[str]) -> str | None:
    """``value`` as a prompt (surrounding whitespace removed), or None with the reason counted."""
    if value is None:
        skipped[MISSING] += 1
        return None
    if not isinstance(value, str):
        skipped[NOT_TEXT] += 1
        return None
    if _UNDECODABLE.search(value):
        skipped[NOT_UTF8] += 1
        return None
    text = value.strip()
    if not text:
        skipped[EMPTY] += 1
        return None
    return text


def _key(value: Any) -> str | None:
    if value is None:
        return None
    key = (value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict))
           else str(value)).strip()
    return key or None


def _txt_rows(source: Path, skipped: Counter[str]) -> Iterator[PromptRow]:
    for line in _lines(_text(source)):
        if not line.strip():
            skipped[BLANK] += 1
            continue
        caption = _caption(line, skipped)
        if caption is not None:
            yield PromptRow(caption, None)


def _folded(names: Iterable[str]) -> dict[str, str]:
    """Case-folded name -> the first name that folds to it."""
    folded: dict[str, str] = {}
    for name in names:
        folded.setdefault(name.strip().casefold(), name)
    return folded


def _preferred(names: Iterable[str], preferred: Sequence[str]) -> str | None:
    """The first of ``preferred`` among ``names`` (case-insensitively), as ``names`` spells it."""
    folded = _folded(names)
    return next((folded[p] for p in preferred if p in folded), None)


def pick_column(label: str, names: Sequence[str], wanted: str | None, preferred: Sequence[str], what: str, *,
                required: bool = False) -> str | None:
    """The ``what`` column of a table whose columns are ``names``: ``wanted`` (exactly, else
    case-insensitively; a one-line error naming ``label`` when it is not there) or the first of
    ``preferred`` present, case-insensitively (None when none is, or a one-line error if ``required``).
    Prompt sources and captioned training lists find their columns with it."""
    folded = _folded(names)
    shown = ", ".join(repr(n) for n in names) or "none"
    if wanted is not None:
        if wanted in names:
            return wanted
        if wanted.strip().casefold() in folded:
            return folded[wanted.strip().casefold()]
        raise UserError(f"{label} has no {what} column {wanted!r} (its columns: {shown})")
    found = _preferred(names, preferred)
    if found is None and required:
        raise UserError(f"{label} has no {what} column (looked for {', '.join(preferred)}; its columns: {shown}); "
                        f"name one with {what}_column")
    return found


def _caption_column(source: Path, names: Sequence[str], wanted: str | None) -> str:
    column = pick_column(f"prompt source {source}", names, wanted, CAPTION_COLUMNS, "caption", required=True)
    assert column is not None
    return column


def _table_rows(source: Path, kind: str, caption_column: str | None, key_column: str | None,
                skipped: Counter[str]) -> tuple[list[PromptRow], tuple[str | None, str | None]]:
    dialect = csv.excel_tab if kind == "tsv" else csv.excel
    reader = csv.reader(io.StringIO(_text(source), newline=""), dialect=dialect)
    try:
        header = next(reader, None)
        if header is None:
            raise UserError(f"prompt source {source} is empty (a {kind.upper()} file needs a header row)")
        caption_name = _caption_column(source, header, caption_column)
        key_name = pick_column(f"prompt source {source}", header, key_column, KEY_COLUMNS, "key")
        caption_at = header.index(caption_name)
        key_at = None if key_name is None else header.index(key_name)
        rows = []
        for record in reader:
            if not record or (len(record) == 1 and not record[0].strip()):
                skipped[BLANK] += 1
                continue
            if len(record) != len(header):
                skipped[MALFORMED] += 1  # a stray separator would shift the columns: never guess
                continue
            caption = _caption(record[caption_at], skipped)
            if caption is not None:
                key = None if key_at is None else record[key_at]
                if key is not None and _UNDECODABLE.search(key):
                    skipped[NOT_UTF8] += 1
                    continue
                rows.append(PromptRow(caption, _key(key)))
    except csv.Error as error:  # e.g. a NUL byte: the file is not a table
        raise UserError(f"prompt source {source} is not a readable {kind.upper()} file (line {reader.line_num}: "
                        f"{error})") from None
    return rows, (caption_name, key_name)


def _jsonl_rows(source: Path, caption_column: str | None, key_column: str | None,
                skipped: Counter[str]) -> tuple[list[PromptRow], tuple[str | None, str | None]]:
    objects: list[dict[str, Any]] = []
    fields: dict[str, None] = {}
    for line in _lines(_text(source)):
        if not line.strip():
            skipped[BLANK] += 1
            continue
        if _UNDECODABLE.search(line):
            skipped[NOT_UTF8] += 1
            continue
        try:
            value = json.loads(line)
        except ValueError:
            skipped[BAD_JSON] += 1
            continue
        if not isinstance(value, dict):
            skipped[NOT_OBJECT] += 1
            continue
        objects.append(value)
        fields.update(dict.fromkeys(value))
    names = list(fields)
    if not objects:
        return [], (None, None)
    caption_name = _caption_column(source, names, caption_column)
    key_name = pick_column(f"prompt source {source}", names, key_column, KEY_COLUMNS, "key")
    rows = []
    for value in objects:
        caption = _caption(value.get(caption_name), skipped)
        if caption is not None:
            rows.append(PromptRow(caption, None if key_name is None else _key(value.get(key_name))))
    return rows, (caption_name, key_name)


def _store_rows(source: Path, skipped: Counter[str]) -> list[PromptRow]:
    store = open_store(source)
    captions = store.captions
    if captions is None:
        raise UserError(f"feature store {source} records no captions (extract it from captioned inputs: webdataset "
                        "tars with .txt captions, or a .tsv list path<TAB>caption)")
    rows = []
    for caption, key in zip(captions, store.keys, strict=True):
        text = _caption(caption, skipped)
        if text is not None:
            rows.append(PromptRow(text, key))
    return rows


def _tar_rows(tars: Iterable[str], skipped: Counter[str]) -> Iterator[PromptRow]:
    for tar in tars:
        problems: list[str] = []
        for sample in tar_samples(tar, problems):
            caption = _sample_caption(sample, skipped)
            if caption is not None:
                yield PromptRow(caption, _key(sample.get("__key__")))
        if problems:
            skipped[DAMAGED_TAR] += 1


def _sample_caption(sample: dict[str, Any], skipped: Counter[str]) -> str | None:
    """A webdataset sample's caption: its ``.txt``, else a caption field of its ``.json``."""
    if sample.get("txt") is not None:
        return _caption(bytes(sample["txt"]).decode("utf-8", errors="surrogateescape"), skipped)
    if sample.get("json") is not None:
        try:
            value = json.loads(bytes(sample["json"]))
        except ValueError:
            skipped[BAD_JSON] += 1
            return None
        if isinstance(value, dict):
            name = _preferred(value, CAPTION_COLUMNS)
            return _caption(None if name is None else value[name], skipped)
    skipped[MISSING] += 1
    return None


def _skipped_text(skipped: dict[str, int]) -> str:
    return ", ".join(f"{count:,} {reason}{'' if count == 1 else 's'}" for reason, count in skipped.items())


def prompt_source_summary(source: PromptSourceRows) -> str:
    """One console line: ``read 1,234 prompts from X (csv, caption 'text', key 'url'; 3 blank lines
    skipped)``."""
    details = [source.kind]
    if source.caption_column is not None:
        details.append(f"caption {source.caption_column!r}")
    if source.key_column is not None:
        details.append(f"key {source.key_column!r}")
    elif source.kind in ("store", "webdataset"):
        details.append("keyed")
    detail = ", ".join(details) + (f"; {_skipped_text(source.skipped)} skipped" if source.skipped else "")
    count = len(source.rows)
    return f"read {count:,} prompt{'' if count == 1 else 's'} from {source.path} ({detail})"


# --------------------------------------------------------------------------- drawing


def draw_prompts(rows: PromptSourceRows | Sequence[PromptRow], n: int | None, seed: int,
                 replacement: bool = False) -> list[Prompt]:
    """The prompts of a run, ``index`` 0, 1, ... in the order returned.

    ``n`` None: every row once, in source order. Otherwise ``n`` rows drawn with ``seed`` (the same on
    every machine): without replacement (``n`` at most the number of rows), the first ``n`` of a seeded
    permutation of all rows; with replacement, ``n`` independent uniform draws. Either way the rows
    drawn with ``n`` are the first ones drawn with any larger ``n`` (same seed), so a run can be extended.
    """
    listed = rows.rows if isinstance(rows, PromptSourceRows) else list(rows)
    if n is None:
        return [Prompt(i, row.caption, row.key) for i, row in enumerate(listed)]
    where = f" of {rows.path}" if isinstance(rows, PromptSourceRows) else ""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"the number of prompts to draw must be a positive integer, got {n!r}")
    if not listed:
        raise UserError(f"cannot draw {n:,} prompts: the source{where} has no rows")
    generator = np.random.Generator(np.random.PCG64(derive_seed("draw_prompts", int(seed))))
    if replacement:
        chosen = generator.integers(0, len(listed), size=int(n))
    else:
        if n > len(listed):
            raise UserError(f"cannot draw {n:,} prompts without replacement from the {len(listed):,} rows{where}; "
                            "draw at most that many, or draw with replacement")
        chosen = generator.permutation(len(listed))[: int(n)]
    return [Prompt(i, listed[j].caption, listed[j].key) for i, j in enumerate(chosen.tolist())]


# --------------------------------------------------------------------------- the word-ablation study


def ablation_variants(text: str) -> list[tuple[str, str]]:
    """The prompt study of the paper's Fig. 10: ``(variant, text)`` pairs.

    First ``("full", text)`` (surrounding whitespace removed), then each word dropped in turn
    (``"drop 3: castle"``, 1-based), then the prompt cut word by word from the end
    (``"first 4 words"`` for 4 = words - 1 down to ``"first 1 words"``). Words are split on
    whitespace and the variants are joined with single spaces. Variants with identical texts are
    all kept (dropping the last word equals the first ``words - 1``; dropping either of two equal
    words gives the same text): they are different edits, generated with the same seeds. Dropping
    the only word of a one-word prompt would leave the empty prompt and is left out.
    """
    full = text.strip()
    words = full.split()
    if not words:
        raise UserError("the prompt to ablate is empty: give a prompt with at least one word")
    variants = [("full", full)]
    if len(words) > 1:
        variants += [(f"drop {i + 1}: {word}", " ".join(words[:i] + words[i + 1:])) for i, word in enumerate(words)]
        variants += [(f"first {k} words", " ".join(words[:k])) for k in range(len(words) - 1, 0, -1)]
    return variants


def ablation_prompts(text: str) -> list[Prompt]:
    """:func:`ablation_variants` as prompts (``index`` 0, 1, ..., ``variant`` set, no source key)."""
    return [Prompt(i, variant_text, None, variant) for i, (variant, variant_text) in enumerate(ablation_variants(text))]


__all__ = [
    "CAPTION_COLUMNS", "KEY_COLUMNS", "KINDS", "Prompt", "PromptRow", "PromptSourceRows", "ablation_prompts",
    "ablation_variants", "draw_prompts", "prompt_source_summary", "read_prompt_source",
]
