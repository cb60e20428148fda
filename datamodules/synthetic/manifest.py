"""The on-disk form of a synthetic set, and which folders a build may write in.

``<root>/manifest.json`` holds the *header* (format version, kind, seed, PNG level,
parameters, query ids, pool ids: :data:`HEADER_KEYS`) plus the query paths, one
provenance record per item (file, query row and id, pool image id, region, placement,
augmentation parameters) and the skipped queries with their reasons. Images live in
``<root>/images/``; an interrupted build keeps its header and progress in ``<root>/.build/``.

A build writes into, and deletes from, only an ``output_dir`` that is new, empty, or
marked as the suite's own by a ``.lit-synthetic`` file (:func:`claim_output_dir`; sets
built before the mark existed are recognised by their manifest). Anything else is
refused with a :class:`~lit.errors.UserError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from lit.files import claim_folder, write_text_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_DIR = "images"
BUILD_DIR = ".build"
"""Header and progress log of an interrupted build (removed once the manifest is written)."""
OWNER_MARK = ".lit-synthetic"
"""File that marks an output folder as the suite's own: only there does a build delete files."""
PNG_COMPRESS_LEVEL = 1
"""zlib level of the written PNGs: 1 encodes ~3x faster than PIL's default 6 for ~9% more
bytes on photos (measured in benchmarks/bench_synthetic_build.py); part of the header."""
HEADER_KEYS = ("format_version", "kind", "seed", "png_compress_level", "parameters", "query_ids", "pool_ids")
"""What a manifest must match to be reused (:meth:`~datamodules.synthetic.builder.SyntheticBuilder.header`)."""


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
    return all(manifest.get(key) == header[key] for key in HEADER_KEYS)


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
        return isinstance(data, dict) and all(key in data for key in HEADER_KEYS)

    if not (signed(root / MANIFEST) or signed(root / BUILD_DIR / "header.json")):
        return False
    return all(entry.name in (MANIFEST, IMAGE_DIR, BUILD_DIR) for entry in root.iterdir())


def jsonable(value: Any) -> Any:
    """Tuples -> lists, numpy/torch scalars -> Python, recursively (so headers compare equal
    to what JSON gives back)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.generic, Tensor)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


__all__ = [
    "BUILD_DIR",
    "FORMAT_VERSION",
    "HEADER_KEYS",
    "IMAGE_DIR",
    "MANIFEST",
    "OWNER_MARK",
    "PNG_COMPRESS_LEVEL",
    "claim_output_dir",
    "jsonable",
    "manifest_matches",
    "read_manifest",
]
