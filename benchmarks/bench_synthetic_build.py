"""Build time, throughput, disk size and time split of the synthetic sets (Segmix, Cutmix).

Builds each set from ``../shared/data/bsds300`` with the 100 val images as queries and
the 200 train images as the (disjoint) pool, ``--mixes`` items per query (default 10, so
1,000 synthetic images per set), at ``--output-size`` pixels, once per worker count in
``--workers`` (0: in the main process with ``--threads`` torch threads, default 1, i.e.
one core; 2: two rendering processes, i.e. two cores); then rebuilds with a matching
manifest (the reuse check). Prints items/s, seconds per 1,000 items, MB on disk, the
split of time over stages (decode: JPEG + masks; resize: the pool canvas; augment: the
region's resize and photometric ops; composite; PNG encode; write) plus the driver's
own overhead, and peak RSS. Saves a grid per set (source, region mask, pool crop,
synthetic image with the pasted box in red) to
``benchmarks/results/{segmix,cutmix}_grid.png``.

    .venv/bin/python benchmarks/bench_synthetic_build.py            # full run (~ minutes)
    .venv/bin/python benchmarks/bench_synthetic_build.py --queries 10 --mixes 2   # quick look
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from datamodules.cutmix import CutmixBuilder  # noqa: E402
from datamodules.masks import VocMaskSource  # noqa: E402
from datamodules.segmix import SegmixBuilder  # noqa: E402
from datamodules.synthetic import (  # noqa: E402
    PNG_COMPRESS_LEVEL, BuildReport, SyntheticBuilder, build_synthetic, folder_refs,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds300"
RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("decode", "resize", "augment", "composite", "encode", "write")


def make_builders(queries: int, mixes: int, size: int, seed: int) -> dict[str, SyntheticBuilder]:
    val = VocMaskSource(DATA / "val" / "images", DATA / "val" / "masks")
    pool = folder_refs(DATA / "train" / "images")
    rows = list(range(min(queries, len(val))))
    query_refs = [ref for ref in folder_refs(DATA / "val" / "images") if ref.id in {val.ids[r] for r in rows}]
    return {
        "segmix": SegmixBuilder(val, pool, rows, seed=seed, mixes_per_query=mixes, output_size=size),
        "cutmix": CutmixBuilder(query_refs, pool, seed=seed, mixes_per_query=mixes, output_size=size),
    }


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def describe(name: str, workers: int, report: BuildReport, root: Path) -> dict[str, float]:
    stages = {s: report.stage_seconds.get(s, 0.0) for s in STAGES}
    busy = sum(stages.values())
    # with workers, stage seconds are summed over processes: scale to the wall clock
    share = {s: v / busy for s, v in stages.items()} if busy else {}
    overhead = max(0.0, report.seconds - busy) if workers == 0 else float("nan")
    row = {"set": name, "workers": workers, "items": report.num_items, "seconds": report.seconds,
           "items_per_s": report.items_per_second, "s_per_1000_items": 1000 * report.seconds / report.num_items,
           "MB": disk_bytes(root) / 1e6, "kB_per_item": disk_bytes(root) / 1e3 / report.num_items,
           "driver_overhead_s": overhead, **{f"share_{s}": share.get(s, 0.0) for s in STAGES}}
    split = ", ".join(f"{s} {100 * share.get(s, 0):.0f}%" for s in STAGES)
    extra = f", driver overhead {overhead:.2f} s ({100 * overhead / report.seconds:.1f}%)" if workers == 0 else ""
    print(f"{name:7s} workers={workers}: {report.num_items} items in {report.seconds:.1f} s = "
          f"{report.items_per_second:.1f} items/s ({row['s_per_1000_items']:.0f} s per 1,000 items), "
          f"{row['MB']:.1f} MB ({row['kB_per_item']:.0f} kB/item); time split: {split}{extra}")
    return row


def compare_png_levels(root: Path, count: int = 100) -> None:
    """Our PNG level (1) against PIL's default (6) on the same built images: time and size."""
    arrays = [Image.open(p).convert("RGB") for p in sorted((root / "images").glob("*.png"))[:count]]
    results = {}
    for level in (PNG_COMPRESS_LEVEL, 6):
        start = time.perf_counter()
        sizes = []
        for image in arrays:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=level)
            sizes.append(buffer.tell())
        results[level] = ((time.perf_counter() - start) / len(arrays) * 1000, sum(sizes) / len(sizes) / 1000)
    (t1, s1), (t6, s6) = results[PNG_COMPRESS_LEVEL], results[6]
    print(f"PNG encode on {len(arrays)} items: level {PNG_COMPRESS_LEVEL} {t1:.1f} ms / {s1:.0f} kB, "
          f"level 6 (PIL default) {t6:.1f} ms / {s6:.0f} kB: {t6 / t1:.1f}x slower for {100 * (1 - s6 / s1):.0f}% "
          "fewer bytes")


def tile(image: Image.Image, size: int) -> Image.Image:
    """Letterbox ``image`` into a ``size`` x ``size`` gray tile."""
    image = image.copy()
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas


def region_mask(name: str, item: dict, source: VocMaskSource, query_path: Path) -> Image.Image:
    """White where the pasted content came from in the source image."""
    with Image.open(query_path) as image:
        width, height = image.size
    if name == "segmix":
        masked = source[source.ids.index(item["query_id"])]
        region = item["region"]
        mask = masked.background if region == "background" else masked.instances[int(region.split(":")[1])]
        return Image.fromarray(mask.numpy().astype("uint8") * 255).convert("RGB")
    mask = Image.new("RGB", (width, height))
    ImageDraw.Draw(mask).rectangle([v - (1 if i > 1 else 0) for i, v in enumerate(item["placement"]["source_box"])],
                                   fill=(255, 255, 255))
    return mask


def save_grid(name: str, root: Path, builder: SyntheticBuilder, out: Path, rows: int = 6, size: int = 160) -> None:
    """Rows of (source, region mask, pool crop, synthetic + pasted box); Segmix shows
    objects and backgrounds alternately."""
    manifest = json.loads((root / "manifest.json").read_text())
    items = manifest["items"]
    if name == "segmix":
        objects = [i for i in items if i["region"] != "background"]
        backgrounds = [i for i in items if i["region"] == "background"]
        chosen = [x for pair in zip(objects[::7], backgrounds[::7]) for x in pair][:rows]
    else:
        chosen = items[:: max(1, len(items) // rows)][:rows]
    queries = {ref.id: ref.path for ref in builder.queries()}
    pool = {ref.id: ref.path for ref in builder.pool()}
    source = builder.source if isinstance(builder, SegmixBuilder) else None
    grid = Image.new("RGB", (4 * size, len(chosen) * size + 14), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for col, label in enumerate(("source", "region mask", "pool crop", "synthetic (box: paste)")):
        draw.text((col * size + 4, 1), label, fill=(0, 0, 0))
    for row, item in enumerate(chosen):
        y = row * size + 14
        query = Image.open(queries[item["query_id"]]).convert("RGB")
        grid.paste(tile(query, size), (0, y))
        grid.paste(tile(region_mask(name, item, source, queries[item["query_id"]]), size), (size, y))
        grid.paste(tile(Image.open(pool[item["pool_id"]]).convert("RGB").crop(item["pool_box"]), size), (2 * size, y))
        synthetic = Image.open(root / item["file"]).convert("RGB")
        scale = size / synthetic.width
        synthetic = tile(synthetic, size)
        box = item["placement"].get("box")
        if box and item.get("region") != "background":
            ImageDraw.Draw(synthetic).rectangle([v * scale for v in box], outline=(255, 0, 0), width=2)
        grid.paste(synthetic, (3 * size, y))
        draw.text((3 * size + 4, y + 2), item.get("region", ""), fill=(255, 255, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, optimize=True)
    if out.stat().st_size > 500_000:  # keep results small: 256-colour palette
        grid.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"grid: {out} ({out.stat().st_size / 1e3:.0f} kB, {len(chosen)} rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--mixes", type=int, default=10)
    parser.add_argument("--output-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--sets", nargs="+", default=["segmix", "cutmix"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (workers always use 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} (other processes compete for the cores when > 0)")
    builders = make_builders(args.queries, args.mixes, args.output_size, args.seed)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_synthetic_"))
    try:
        for name in args.sets:
            builder = builders[name]
            for workers in args.workers:
                root = work / f"{name}_{workers}"
                report = build_synthetic(builder, root, progress=False, num_workers=workers)
                rows.append(describe(name, workers, report, root))
            reuse = build_synthetic(builder, root, progress=False)
            assert reuse.reused
            same = all((work / f"{name}_{args.workers[0]}" / f).read_bytes() == (root / f).read_bytes()
                       for f in (i["file"] for i in json.loads((root / "manifest.json").read_text())["items"]))
            print(f"{name:7s} reuse check (manifest matches): {reuse.seconds * 1000:.0f} ms; "
                  f"files identical across worker counts: {same}")
            compare_png_levels(root)
            save_grid(name, root, builder, RESULTS / f"{name}_grid.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: main process {peak_self:.0f} MB ({baseline:.0f} MB of it after the imports), "
          f"largest worker {peak_children:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
