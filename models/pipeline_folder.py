"""Write a diffusers pipeline as a folder that ``load_text_pipeline`` and ``lit generate`` read, safely.

:func:`write_pipeline_folder` saves the pipeline (``save_pretrained``: ``model_index.json`` and one
folder per component) into a hidden sibling folder first, records what it wrote in
``lit_pipeline.json`` (:data:`MARKER`), then moves the folder into place. The destination must be
new or empty, or a folder this function wrote before (its marker lists every file in it) when
``overwrite`` is given; a folder holding anything else is refused in one line and left alone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from lit.errors import UserError
from lit.files import write_json
from models.text_pipeline import quiet_libraries

MARKER = "lit_pipeline.json"
FORMAT = "lit-pipeline/1"


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def check_pipeline_destination(folder: str | Path, overwrite: bool) -> Path:
    """Refuse (UserError) a destination :func:`write_pipeline_folder` may not write; returns it as a Path."""
    folder = Path(folder).expanduser()
    if not folder.exists() and not folder.is_symlink():
        return folder
    if not folder.is_dir() or folder.is_symlink():
        raise UserError(f"{folder} exists and is not a folder; give a new or empty folder for the pipeline")
    present = _files_under(folder)
    if not present and not any(folder.iterdir()):
        return folder
    marker = folder / MARKER
    try:
        record = json.loads(marker.read_text()) if marker.is_file() else None
    except ValueError:
        record = None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{folder} is not empty and was not written by lit (no {MARKER}); its files are left "
                        "alone: choose a new or empty folder")
    if not overwrite:
        raise UserError(f"{folder} holds a pipeline lit wrote earlier; pass --overwrite to replace it")
    foreign = sorted(set(present) - set(record.get("files", [])) - {MARKER})
    if foreign:
        raise UserError(f"{folder} holds files lit did not write ({foreign[0]}{', ...' if len(foreign) > 1 else ''}); "
                        "they are left alone: move them or choose another folder")
    return folder


def write_pipeline_folder(pipeline: DiffusionPipeline, folder: str | Path, *, overwrite: bool = False,
                          provenance: dict[str, Any] | None = None) -> Path:
    """Save ``pipeline`` as ``folder`` (see the module docstring); returns the folder."""
    folder = check_pipeline_destination(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)  # our own leftover: the name carries this process's id
    try:
        with quiet_libraries():  # no "Writing model shards" bar for a few small files
            pipeline.save_pretrained(partial, safe_serialization=True)
        write_json(partial / MARKER, {"format": FORMAT, "files": _files_under(partial), **(provenance or {})})
        if folder.exists():
            shutil.rmtree(folder)  # empty, or only files an earlier export listed (checked above)
        os.replace(partial, folder)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return folder
