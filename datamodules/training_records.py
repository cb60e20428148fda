"""What a text-conditioned run trained on, written into its log folder for ``lit generate`` and ``lit scan``.

- ``training_images/<key>.png``: every training image as the run holds it (shorter side
  ``load_size``, before its crop), as PNG whatever the source (files, tar members or procedural
  scenes), so that ``lit scan`` can search them uniformly; the folder is claimed with a marker
  (:data:`IMAGES_MARKER`) and never written into when it holds files of someone else;
- ``training_captions.csv``: one row per (image, base caption a draw can pick), columns
  :data:`CAPTION_COLUMNS`: ``key``, ``file`` (the PNG, relative to the log folder), ``caption``,
  ``copies`` (the image's relative sampling weight: 1 unique, ``dup_weight`` duplicated),
  ``duplicated`` (0/1), ``caption_index`` (the caption's place among the image's captions),
  ``caption_share`` (the chance that a draw of the image starts from this caption) and
  ``verbatim_share`` (the chance that it trains on it unchanged by the caption mitigations), and
  ``source`` (where the image came from);
- ``skipped_images.tsv`` (as the DDPM data writes it) when images were skipped;
- ``training_records.json``: counts, options, the skipped images and the files above with
  their SHA-256. It is written first (incomplete) and last (complete): a folder holding one
  is the suite's, and its files are replaced on a rerun; a ``training_captions.csv`` or
  ``skipped_images.tsv`` without it is someone else's and is refused in one line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from datamodules.caption_draws import CaptionDraws
from datamodules.images import SKIPPED_FILE, write_skipped_file
from lit.errors import UserError
from lit.files import claim_folder, file_sha256, write_json, write_text_atomic
from lit.grids import save_png

CAPTIONS_FILE = "training_captions.csv"
IMAGES_DIR = "training_images"
RECORDS_FILE = "training_records.json"
IMAGES_MARKER = ".lit-training-images"
FORMAT = "lit-training-records/1"
CAPTION_COLUMNS = ("key", "file", "caption", "copies", "duplicated", "caption_index", "caption_share",
                   "verbatim_share", "source")


@dataclass(frozen=True)
class TrainingRecords:
    """What to write: per image its key, source, stored uint8 image and sampling weight, the caption
    draws (captions, duplication, policy), the skipped images, and the options to record."""

    keys: Sequence[str]
    sources: Sequence[str]
    images: Sequence[Tensor]
    weights: Sequence[float]
    draws: CaptionDraws
    skipped: Sequence[tuple[str, str]]
    owner: str
    options: Mapping[str, Any]


def caption_rows(records: TrainingRecords) -> list[dict[str, Any]]:
    """The rows of ``training_captions.csv`` (see the module docstring)."""
    rows = []
    verbatim = records.draws.policy.verbatim
    for row, key in enumerate(records.keys):
        pool = records.draws.pool(row)
        for index, caption in enumerate(pool):
            rows.append({"key": key, "file": f"{IMAGES_DIR}/{key}.png", "caption": caption,
                         "copies": f"{records.weights[row]:g}", "duplicated": int(records.draws.duplicated[row]),
                         "caption_index": index, "caption_share": f"{1.0 / len(pool):.6g}",
                         "verbatim_share": f"{verbatim / len(pool):.6g}", "source": records.sources[row]})
    return rows


def write_training_records(folder: str | Path, records: TrainingRecords) -> dict[str, Any]:
    """Write the training images, captions, skipped list and ``training_records.json`` into ``folder``
    (see the module docstring); returns what ``training_records.json`` holds."""
    root = Path(folder)
    previous = _claim(root)
    images_dir = root / IMAGES_DIR
    claim_folder(images_dir, IMAGES_MARKER, label=f"{images_dir} (the training images)",
                 note=f"training images written by lit ({records.owner}); see ../{RECORDS_FILE}\n")
    names = [f"{key}.png" for key in records.keys]
    summary: dict[str, Any] = {
        "format": FORMAT, "complete": False, "owner": records.owner, "images": len(records.keys),
        "duplicated_images": sum(records.draws.duplicated), "options": dict(records.options),
        "skipped_images": len(records.skipped), "skipped": [list(entry) for entry in records.skipped],
        "files": {}, "training_images": names,
    }
    write_json(root / RECORDS_FILE, summary)
    for name in sorted(set(previous.get("training_images", [])) - set(names)):  # ours, from an earlier write
        (images_dir / name).unlink(missing_ok=True)
    for name, image in zip(names, records.images):
        save_png(image.float() / 255.0, images_dir / name)
    write_text_atomic(root / CAPTIONS_FILE, _csv_text(caption_rows(records)))
    written = [CAPTIONS_FILE]
    if records.skipped:
        write_skipped_file(root, records.skipped, records.owner)
        written.append(SKIPPED_FILE)
    elif (root / SKIPPED_FILE).is_file() and SKIPPED_FILE in previous.get("files", {}):
        (root / SKIPPED_FILE).unlink()  # ours, from an earlier write that skipped images
    summary.update(complete=True, files={name: file_sha256(root / name, cached=False) for name in written})
    write_json(root / RECORDS_FILE, summary)
    return summary


def _claim(root: Path) -> dict[str, Any]:
    """The ``training_records.json`` already in ``root`` (empty when none); refuses a folder whose
    records file, captions or skipped list the suite did not write."""
    records = root / RECORDS_FILE
    if records.exists():
        try:
            previous = json.loads(records.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict) or previous.get("format") != FORMAT:
            raise UserError(f"{records} exists and was not written by lit; its files are left alone "
                            "(choose another log folder)")
        return previous
    for name in (CAPTIONS_FILE, SKIPPED_FILE):
        if (root / name).exists():
            raise UserError(f"{root / name} exists and was not written by lit (no {RECORDS_FILE} beside it); "
                            "it is left alone (choose another log folder)")
    return {}


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CAPTION_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


__all__ = ["CAPTIONS_FILE", "CAPTION_COLUMNS", "IMAGES_DIR", "IMAGES_MARKER", "RECORDS_FILE", "TrainingRecords",
           "caption_rows", "write_training_records"]
