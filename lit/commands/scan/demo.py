"""The ``lit scan`` demo: planted copies among procedural "generations", found in a 20,000-image training set.

    python -m lit.commands.scan.demo --out runs/demo_scan

Renders ``--training`` procedural scenes (``datamodules.procedural``) as PNG files,
then ``--copies`` "generations" that copy a training scene (kornia colour jitter and
Gaussian blur: a near-pixel copy, as small DDPMs make them; geometric changes would
need a learned descriptor, not raw pixels) shuffled among ``--new`` new scenes, and
runs ``lit scan`` with the pixel descriptor on the CPU. The known answer
(``planted.csv``) is checked against the scan: the planted copies should be the
top rows of the report, each matched to its source. Timings go to ``demo.json``.
Files already rendered are kept on a rerun (the scan reuses its stores too).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from datamodules.procedural import ProceduralScenes
from lit.commands.scan.command import main as scan
from lit.errors import UserError
from lit.files import claim_folder, write_json, write_text_atomic
from lit.grids import save_png
from lit.io import load_image
from lit.seeding import derive_seed

MARKER = ".lit-scan-demo"


def copy_of(image: torch.Tensor, seed: int) -> torch.Tensor:
    """A near copy of a (3, H, W) scene: colour jitter and Gaussian blur drawn from ``seed``."""
    import kornia.augmentation as K

    augment = K.AugmentationSequential(
        K.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=1.0),
        K.RandomGaussianBlur((5, 5), sigma=(0.1, 1.0), p=1.0),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return augment(image[None])[0].clamp(0.0, 1.0)


def _render_range(job: tuple[int, int, int, int, str]) -> int:
    """Render scenes [start, stop) of seed ``seed`` at ``size`` px into ``folder`` (existing files kept)."""
    start, stop, size, seed, folder = job
    torch.set_num_threads(1)
    scenes = ProceduralScenes(stop, size, seed=seed)
    written = 0
    for i in range(start, stop):
        path = Path(folder) / f"{i:06d}.png"
        if not path.exists():
            save_png(scenes[i]["image"], path)
            written += 1
    return written


def render_training(folder: Path, count: int, size: int, seed: int, workers: int) -> int:
    """Training scenes ``000000.png`` ... in ``folder`` (in ``workers`` processes); returns how many were new."""
    folder.mkdir(parents=True, exist_ok=True)
    step = max(1, math.ceil(count / (workers * 8)))
    jobs = [(s, min(s + step, count), size, seed, str(folder)) for s in range(0, count, step)]
    if workers <= 1:
        return sum(_render_range(job) for job in jobs)
    from tqdm.auto import tqdm

    with get_context("spawn").Pool(workers) as pool:
        return sum(tqdm(pool.imap_unordered(_render_range, jobs), total=len(jobs), desc="render training",
                        unit="chunk"))


def render_generations(folder: Path, training: Path, count: int, copies: int, new: int, size: int,
                       seed: int) -> list[tuple[str, str]]:
    """``copies`` near copies of random training scenes shuffled among ``new`` new scenes;
    returns ``(generation file, source training file or "")`` per generation."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sources = rng.sample(range(count), copies)
    kinds = [("copy", s) for s in sources] + [("new", i) for i in range(new)]
    rng.shuffle(kinds)
    fresh = ProceduralScenes(new, size, seed=derive_seed(seed, "new scenes"))
    planted = []
    for number, (kind, which) in enumerate(kinds):
        path = folder / f"gen_{number:04d}.png"
        source = ""
        if kind == "copy":
            source_path = training / f"{which:06d}.png"
            image = load_image(source_path, strict=True)
            image = copy_of(image, derive_seed(seed, "copy", number))
            source = str(source_path)
        else:
            image = fresh[which]["image"]
        if not path.exists():
            save_png(image, path)
        planted.append((str(path), source))
    return planted


def check_planted(matches: Path, planted: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """How many of the top rows (by top-1 score) are the planted copies, and matched to their source."""
    with open(matches, newline="") as handle:
        firsts = [row for row in csv.DictReader(handle) if row["rank"] == "1"]
    firsts.sort(key=lambda row: -float(row["score"]))
    sources = {gen: src for gen, src in planted if src}
    top = firsts[: len(sources)]
    return {
        "planted": len(sources),
        "planted_in_top_rows": sum(row["generation"] in sources for row in top),
        "matched_to_source": sum(sources.get(row["generation"]) == row["training"] for row in firsts),
        "lowest_copy_score": min((float(r["score"]) for r in firsts if r["generation"] in sources), default=None),
        "highest_new_score": max((float(r["score"]) for r in firsts if r["generation"] not in sources), default=None),
    }


def prepare_root(root: Path) -> None:
    """Create the demo folder, or accept one the demo made; refuse any other non-empty folder."""
    claim_folder(root, MARKER, label=f"--out {root}", note="made by the lit scan demo\n",
                 refusal=f"--out {root} is not empty and was not made by the scan demo: choose a new folder")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Render the demo data, scan it, check the planted copies, print and record the figures."""
    parser = argparse.ArgumentParser(prog="python -m lit.commands.scan.demo", description=__doc__.splitlines()[0],
                                     allow_abbrev=False)
    parser.add_argument("--out", default="runs/demo_scan", help="demo folder (data/ and scan/ inside)")
    parser.add_argument("--training", type=int, default=20000, help="procedural training images")
    parser.add_argument("--copies", type=int, default=20, help="generations that copy a training image")
    parser.add_argument("--new", type=int, default=80, help="generations that are new scenes")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the scenes and copies")
    parser.add_argument("--baseline_sample", type=int, default=2000,
                        help="training images whose nearest other training image makes the baseline (seeded sample)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="rendering processes")
    parser.add_argument("--progress", type=int, choices=(0, 1), default=1, help="progress bars")
    args = parser.parse_args(argv)
    if args.training < 2 or args.copies < 1 or args.new < 0 or args.copies > args.training:
        raise UserError("need --training >= 2, 1 <= --copies <= --training and --new >= 0")
    root = Path(args.out)
    prepare_root(root)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    render_training(root / "data" / "training", args.training, args.size, args.seed, args.workers)
    planted = render_generations(root / "data" / "generations", root / "data" / "training", args.training,
                                 args.copies, args.new, args.size, args.seed)
    write_text_atomic(root / "data" / "planted.csv",
                      "generation,source\n" + "".join(f"{g},{s}\n" for g, s in planted))
    timings["render_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    paths = scan(["--generations", str(root / "data" / "generations"), "--training", str(root / "data" / "training"),
                  "--out", str(root / "scan"), "--descriptor.name", "pixel", "--device", "cpu", "--k", "5",
                  "--report_rows", str(args.copies + 10), "--thumb", "64", "--batch_size", "256",
                  "--baseline_sample", str(args.baseline_sample),
                  "--progress", str(bool(args.progress)).lower()])
    timings["scan_s"] = time.perf_counter() - clock
    images = args.training + args.copies + args.new
    check = check_planted(paths["matches"], planted)
    figures = {**timings, "total_s": timings["render_s"] + timings["scan_s"], "images": images,
               "scan_images_per_s": images / timings["scan_s"], "check": check,
               "settings": vars(args)}
    write_json(root / "demo.json", figures)
    print(f"planted copies in the top {check['planted']} rows: {check['planted_in_top_rows']}/{check['planted']}; "
          f"matched to their source: {check['matched_to_source']}/{check['planted']} "
          f"(lowest copy score {check['lowest_copy_score']:.3f}, highest new scene {check['highest_new_score']:.3f})")
    print(f"render {timings['render_s']:.1f} s, scan {timings['scan_s']:.1f} s "
          f"({figures['scan_images_per_s']:.0f} images/s); report: {paths['report']}")
    return figures


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # one line, as the lit command prints it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
