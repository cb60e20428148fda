"""Where the benchmark scripts read images from and write results to.

- :func:`detect_layout`: any image folder: a BSDS300-like root (``train/images`` +
  ``val/images``, masks beside them), an ``images/`` (+ ``masks/``) folder, or a flat
  folder of images (searched recursively).
- :func:`output_dir`: a new timestamped folder under the default base unless ``--out``
  is given; an existing non-empty ``--out`` is refused without ``--overwrite``, so a run
  never writes over results committed in ``benchmarks/results/`` by accident.

The figures in ``benchmarks/README.md`` were measured on BSDS300 (the Berkeley Segmentation
Dataset's 200 train and 100 val photographs, 481 x 321) laid out as ``<split>/images/<id>.jpg``,
``<split>/masks/<id>.png`` (VOC ``SegmentationObject`` palette PNGs: 0 background, 1..N one
region each) and ``<split>/annotations.json`` (the same regions as a COCO instances file, RLE).
No folder is assumed: the scripts that need photographs require ``--data`` (:data:`DATA_HELP`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from lit.io import IMAGE_EXTENSIONS

DATA_HELP = ("image folder: a BSDS300-like root (train/images and val/images, masks/ and annotations.json "
             "beside them), an images/ (+ masks/) folder, or a flat folder of images")
"""The ``--data`` help of every benchmark that reads photographs."""


@dataclass(frozen=True)
class ImageLayout:
    """The folders a benchmark uses.

    ``queries``: images the sets are built from; ``pool``: paste targets (None: a seeded
    share of ``queries``, disjoint from the queries); ``segmix_root``: a root with
    ``images/`` and ``masks/`` for Segmix (None: no masks, no Segmix); ``mask_format``: how
    those masks are stored; ``train_images``: the images a DDPM trains on."""

    kind: str
    queries: Path
    pool: Path | None
    segmix_root: Path | None
    mask_format: str
    train_images: Path


def detect_layout(folder: str | Path, pool: str | Path | None = None, mask_format: str | None = None,
                  ) -> ImageLayout:
    """The layout of ``folder`` (see the module docstring); ``pool`` overrides the paste
    targets, ``mask_format`` the mask format (default: ``voc`` for BSDS300-like roots,
    ``folder`` otherwise). Raises ``SystemExit`` naming the folder when it holds no images."""
    root = Path(folder)
    if not root.is_dir():
        raise SystemExit(f"image folder not found: {root}")
    explicit_pool = Path(pool) if pool is not None else None
    if (root / "val" / "images").is_dir() and (root / "train" / "images").is_dir():
        val = root / "val"
        return ImageLayout("bsds", val / "images", explicit_pool or root / "train" / "images",
                           val if (val / "masks").is_dir() else None, mask_format or "voc", root / "train" / "images")
    if (root / "images").is_dir():
        images = root / "images"
        _require_images(images)
        return ImageLayout("images+masks" if (root / "masks").is_dir() else "images", images, explicit_pool,
                           root if (root / "masks").is_dir() else None, mask_format or "folder", images)
    _require_images(root)
    return ImageLayout("flat", root, explicit_pool, None, mask_format or "folder", root)


def _require_images(folder: Path) -> None:
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*")):
        raise SystemExit(f"no images under {folder} (expected a folder of images, an images/ (+ masks/) folder, "
                         "or a BSDS300-like root with train/images and val/images)")


def output_dir(out: str | Path | None, default_base: Path, overwrite: bool = False) -> Path:
    """``out`` when given (refused if it exists with files in it, unless ``overwrite``),
    else a new ``default_base/<YYYYmmdd-HHMMSS>[-n]`` folder; created and returned."""
    if out is not None:
        path = Path(out)
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
            raise SystemExit(f"--out {path} already holds files (perhaps committed results): choose a new folder, "
                             "leave --out out for a fresh timestamped one, or pass --overwrite")
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for number in range(1, 1000):
        path = default_base / (stamp if number == 1 else f"{stamp}-{number}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise SystemExit(f"could not create a new output folder under {default_base}")
