"""Revisited Oxford 5k and Paris 6k (Radenović et al., CVPR 2018) in the revisitop layout.

``root`` holds ``gnd_roxford5k.pkl`` (or ``gnd_rparis6k.pkl``) and ``jpg/<name>.jpg``.
The pickle is a dict with ``imlist`` (database names), ``qimlist`` (query names) and
``gnd``: one dict per query with ``bbx`` (x1, y1, x2, y2) and the database indices
``easy``, ``hard``, ``junk``. Queries are the query images **cropped by bbx**; the
gallery is the whole database. The three protocols (revisitop ``compute_map``):

========  =================  ===============
protocol  positives          junk (ignored)
========  =================  ===============
easy      easy               junk + hard
medium    easy + hard        junk
hard      hard               junk + easy
========  =================  ===============

Queries with no positives under a protocol are dropped and counted (revisitop
leaves them out of the mean as well). Evaluate with ``ap: revisited``.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pytorch_lightning.utilities import rank_zero_warn

from datamodules.real.common import Box, CroppedImageDataset, DatasetLayoutError, require_files, require_root
from datamodules.retrieval import ImageFileDataset, RetrievalDataModule, RetrievalSet
from lit.io import DEFAULT_MAX_PIXELS, shorten

RevisitedName = Literal["roxford5k", "rparis6k"]
Protocol = Literal["easy", "medium", "hard"]

_DISPLAY = {"roxford5k": "rOxford5k", "rparis6k": "rParis6k"}
_SIZES = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}  # database images, queries


@dataclass(frozen=True)
class RevisitedGroundTruth:
    """The content of a ``gnd_*.pkl`` file, type-checked."""

    imlist: list[str]
    qimlist: list[str]
    boxes: list[Box]
    easy: list[list[int]]
    hard: list[list[int]]
    junk: list[list[int]]


def protocol_ground_truth(
    easy: Sequence[Sequence[int]],
    hard: Sequence[Sequence[int]],
    junk: Sequence[Sequence[int]],
    protocol: Protocol,
) -> tuple[list[list[int]], list[list[int]]]:
    """Per query (positives, junk) under ``protocol``, each sorted (see the module table)."""
    if protocol == "easy":
        pairs = [(e, [*j, *h]) for e, h, j in zip(easy, hard, junk)]
    elif protocol == "medium":
        pairs = [([*e, *h], j) for e, h, j in zip(easy, hard, junk)]
    elif protocol == "hard":
        pairs = [(h, [*j, *e]) for e, h, j in zip(easy, hard, junk)]
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected 'easy', 'medium' or 'hard'")
    return [sorted(set(p)) for p, _ in pairs], [sorted(set(j)) for _, j in pairs]


def read_revisited_ground_truth(root: Path, name: RevisitedName) -> RevisitedGroundTruth:
    """Load and check ``root/gnd_<name>.pkl``; every problem is one :class:`DatasetLayoutError`."""
    display = _DISPLAY[name]
    source = root / f"gnd_{name}.pkl"
    if not source.is_file():
        found = sorted(p.name for p in root.glob("gnd_*.pkl"))
        nested = root / name / source.name
        hint = (
            f"; did you mean root={root / name}?" if nested.is_file()
            else f"; found {found} instead" if found else ""
        )
        raise DatasetLayoutError(
            f"{display}: ground-truth file {source.name} not found in {root} (expected {_layout(name)}){hint}"
        )
    try:
        with source.open("rb") as handle:
            data = pickle.load(handle)  # noqa: S301 - the official format is a pickle
    except Exception as error:  # noqa: BLE001 - any unreadable pickle gets one message
        raise DatasetLayoutError(
            f"{display}: cannot read {source} as a pickle ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(data, Mapping) or not all(k in data for k in ("imlist", "qimlist", "gnd")):
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise DatasetLayoutError(f"{display}: {source} must be a dict with keys 'imlist', 'qimlist', 'gnd'; got {keys}")
    imlist, qimlist, gnd = [str(n) for n in data["imlist"]], [str(n) for n in data["qimlist"]], list(data["gnd"])
    if len(gnd) != len(qimlist):
        raise DatasetLayoutError(f"{display}: {source} has {len(qimlist)} query names but {len(gnd)} 'gnd' entries")
    boxes, easy, hard, junk = [], [], [], []
    for q, entry in enumerate(gnd):
        where = f"{display}: {source} gnd[{q}] ({qimlist[q]})"
        if not isinstance(entry, Mapping):
            raise DatasetLayoutError(
                f"{where} must be a dict with keys 'bbx', 'easy', 'hard', 'junk'; got {type(entry).__name__}"
            )
        if lack := [k for k in ("bbx", "easy", "hard", "junk") if k not in entry]:
            raise DatasetLayoutError(f"{where} lacks key(s) {lack}; expected 'bbx', 'easy', 'hard', 'junk'")
        boxes.append(_box(entry["bbx"], where))
        for key, out in (("easy", easy), ("hard", hard), ("junk", junk)):
            out.append(_rows(entry[key], len(imlist), f"{where} '{key}'"))
    return RevisitedGroundTruth(imlist, qimlist, boxes, easy, hard, junk)


class RevisitedOxfordParis(RetrievalDataModule):
    """Revisited Oxford 5k / Paris 6k with the Easy, Medium or Hard protocol.

    Args:
        root: folder with ``gnd_<dataset>.pkl`` and ``jpg/<name>.jpg``.
        dataset: ``roxford5k`` or ``rparis6k``.
        protocol: ``easy``, ``medium`` (the usual headline number) or ``hard``.
        max_pixels: images larger than this are downscaled on load (crops follow).
        strict: stop at the first unreadable image (default: skip and count it).
    """

    def __init__(
        self,
        root: str,
        dataset: RevisitedName = "roxford5k",
        protocol: Protocol = "medium",
        batch_size: int = 32,
        num_workers: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        strict: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, strict=strict)
        if dataset not in _DISPLAY:
            raise ValueError(f"unknown dataset {dataset!r}; expected 'roxford5k' or 'rparis6k'")
        if protocol not in ("easy", "medium", "hard"):
            raise ValueError(f"unknown protocol {protocol!r}; expected 'easy', 'medium' or 'hard'")
        self.root = root
        self.dataset = dataset
        self.protocol = protocol
        self.max_pixels = max_pixels
        self.dropped_queries: list[str] = []

    @property
    def name(self) -> str:
        """Table 1 column: ``rOxford5k-Medium`` etc. (the two sets and three protocols differ)."""
        return f"{_DISPLAY[self.dataset]}-{self.protocol.title()}"

    def build(self) -> RetrievalSet:
        display = _DISPLAY[self.dataset]
        root = require_root(self.root, display, _layout(self.dataset))
        truth = read_revisited_ground_truth(root, self.dataset)
        if not (root / "jpg").is_dir():
            raise DatasetLayoutError(
                f"{display}: image folder jpg/ not found in {root} (expected {_layout(self.dataset)})"
            )
        names = [f"jpg/{n}.jpg" for n in [*truth.imlist, *truth.qimlist]]
        require_files(root, names, display, f"gnd_{self.dataset}.pkl")
        expected = _SIZES[self.dataset]
        if (len(truth.imlist), len(truth.qimlist)) != expected:
            rank_zero_warn(
                f"{display}: gnd_{self.dataset}.pkl lists {len(truth.imlist)} database images and "
                f"{len(truth.qimlist)} queries; the official file has {expected[0]} and {expected[1]}"
            )
        positives, junk = protocol_ground_truth(truth.easy, truth.hard, truth.junk, self.protocol)
        keep = [q for q, rows in enumerate(positives) if rows]
        self.dropped_queries = [truth.qimlist[q] for q in range(len(positives)) if not positives[q]]
        if self.dropped_queries:
            rank_zero_warn(
                f"{display} {self.protocol}: {len(self.dropped_queries)} of {len(positives)} queries have no "
                f"positives and are dropped: {shorten(self.dropped_queries)}"
            )
        if not keep:
            raise DatasetLayoutError(f"{display} {self.protocol}: no query has a positive; nothing to evaluate")
        jpg = root / "jpg"
        return RetrievalSet(
            queries=CroppedImageDataset(
                [jpg / f"{truth.qimlist[q]}.jpg" for q in keep], [truth.boxes[q] for q in keep], self.max_pixels,
                self.strict,
            ),
            gallery=ImageFileDataset([jpg / f"{n}.jpg" for n in truth.imlist], self.max_pixels, self.strict),
            positives=[positives[q] for q in keep],
            junk=[junk[q] for q in keep],
        )


def _layout(name: str) -> str:
    return f"gnd_{name}.pkl and jpg/<name>.jpg, as in revisitop's data/datasets/{name}"


def _box(value: Any, where: str) -> Box:
    """A bbx as four floats with x2 > x1 and y2 > y1."""
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError) as error:
        raise DatasetLayoutError(f"{where} 'bbx' must be four numbers x1, y1, x2, y2; got {value!r}") from error
    if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
        raise DatasetLayoutError(
            f"{where} 'bbx' must be four numbers x1, y1, x2, y2 with x2 > x1, y2 > y1; got {value!r}"
        )
    return box  # type: ignore[return-value]


def _rows(value: Any, size: int, where: str) -> list[int]:
    """Database indices as ints within 0..size-1."""
    try:
        rows = [int(v) for v in value]
    except (TypeError, ValueError) as error:
        raise DatasetLayoutError(f"{where} must be a list of database indices; got {value!r}") from error
    if bad := [r for r in rows if not 0 <= r < size]:
        raise DatasetLayoutError(f"{where}: indices {bad[:5]} are outside 0..{size - 1} (imlist has {size} names)")
    return rows


__all__ = [
    "Protocol",
    "RevisitedGroundTruth",
    "RevisitedName",
    "RevisitedOxfordParis",
    "protocol_ground_truth",
    "read_revisited_ground_truth",
]
