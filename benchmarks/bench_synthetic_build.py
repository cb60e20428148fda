"""Build time, throughput, disk size and time split of the synthetic sets, and their grids.

Sets: Segmix, Cutmix, Dif-Patch and Dif-Diagonal (outpainting with diffusers' RePaint and a
seeded random-init 64 px UNet: the outpainted area is noise, the kept region is exact).

``--source bsds`` (default) builds from the BSDS300-like root given as ``--data`` (see
``benchmarks/data_layout.py``): the 100 val images are the queries and the 200 train images
the (disjoint) pool, ``--mixes`` items per query
(default 10, so 1,000 synthetic images per set). ``--source procedural`` renders
``--queries`` procedural scenes with instance masks (plus half as many pool scenes) into a
temporary image+mask folder first: bsds300 has 300 images, this is how a 1,000-query build
is timed. Each set is built once per worker count in ``--workers`` (0: in the main process
with ``--threads`` torch threads, default 1, i.e. one core; 2: two rendering processes,
i.e. two cores); then rebuilt with a matching manifest (the reuse check). Prints items/s,
seconds per 1,000 items, MB on disk, the split of time over stages (decode: JPEG + masks;
resize: the pool canvas; augment: the region's resize and photometric ops; composite;
PNG encode; write; mask and diffusion for outpainting) plus the driver's own overhead,
and peak RSS. With ``--grids`` saves a grid per set to ``benchmarks/results/<set>_grid.png``:
source, region mask, pool crop, synthetic (pasted box in red) for Segmix / Cutmix; source
(crop box in red), kept-region mask, kept pixels, synthetic for the outpainting sets.

    .venv/bin/python benchmarks/bench_synthetic_build.py --data /path/to/bsds300 --grids   # 1,000 items per set
    .venv/bin/python benchmarks/bench_synthetic_build.py --source procedural --queries 1000 --mixes 1 \
        --sets segmix cutmix dif_patch dif_diagonal                   # 1,000 queries per set
    .venv/bin/python benchmarks/bench_synthetic_build.py --source procedural --queries 10 --mixes 2  # quick look
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from table1_bsds import random_unet  # noqa: E402

from datamodules.procedural import ProceduralScenes  # noqa: E402
from datamodules.synthetic.build import BuildReport, build_synthetic  # noqa: E402
from datamodules.synthetic.builder import SyntheticBuilder  # noqa: E402
from datamodules.synthetic.cutmix import CutmixBuilder  # noqa: E402
from datamodules.synthetic.manifest import PNG_COMPRESS_LEVEL  # noqa: E402
from datamodules.synthetic.masks import FolderMaskSource, VocMaskSource, _LabelMapSource  # noqa: E402
from datamodules.synthetic.outpainting import OutpaintBuilder, kept_mask  # noqa: E402
from datamodules.synthetic.segmix import SegmixBuilder  # noqa: E402
from datamodules.synthetic.sources import folder_refs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("decode", "resize", "augment", "composite", "mask", "load_model", "diffusion", "encode", "write")
OUTPAINT = {"dif_patch": "patch", "dif_diagonal": "diagonal"}


def render_procedural(folder: Path, count: int, size: int, seed: int) -> tuple[Path, Path]:
    """``count`` procedural scenes as ``folder/images/*.png`` + ``folder/masks/*.png`` (instance ids)."""
    images, masks = folder / "images", folder / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    scenes = ProceduralScenes(count, size=size, seed=seed)
    for index in range(count):
        item = scenes[index]
        pixels = (item["image"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(images / f"{index:05d}.png", compress_level=1)
        Image.fromarray(item["mask"].to(torch.uint8).numpy()).save(masks / f"{index:05d}.png")
    return images, masks


def make_sources(source: str, data: Path | None, queries: int, size: int, seed: int,
                 work: Path) -> tuple[_LabelMapSource, Path]:
    """(query images with instance masks, pool folder) from the BSDS300-like ``data`` or freshly
    rendered scenes."""
    if source == "bsds":
        assert data is not None, "--source bsds needs --data"
        return VocMaskSource(data / "val" / "images", data / "val" / "masks"), data / "train" / "images"
    start = time.perf_counter()
    images, masks = render_procedural(work / "procedural_queries", queries, size, seed)
    pool, _ = render_procedural(work / "procedural_pool", max(1, queries // 2), size, seed + 1)
    print(f"rendered {queries} query + {max(1, queries // 2)} pool procedural scenes at {size} px "
          f"in {time.perf_counter() - start:.0f} s (not part of the build times)")
    return FolderMaskSource(images, masks), pool


def make_builder(name: str, source: _LabelMapSource, pool_dir: Path, args: argparse.Namespace,
                 work: Path) -> SyntheticBuilder:
    rows = list(range(min(args.queries, len(source))))
    pool = folder_refs(pool_dir)
    chosen = {source.ids[r] for r in rows}
    query_refs = [ref for ref in folder_refs(source.images) if ref.id in chosen]
    if name == "segmix":
        return SegmixBuilder(source, pool, rows, seed=args.seed, mixes_per_query=args.mixes,
                             output_size=args.output_size)
    if name == "cutmix":
        return CutmixBuilder(query_refs, pool, seed=args.seed, mixes_per_query=args.mixes,
                             output_size=args.output_size)
    unet = random_unet(work / "unet", args.outpaint_resolution, args.seed)
    return OutpaintBuilder(query_refs, unet, seed=args.seed, mode=OUTPAINT[name], mixes_per_query=args.mixes,
                           resolution=args.outpaint_resolution, num_inference_steps=args.outpaint_steps,
                           jump_length=args.outpaint_jump, jump_n_sample=args.outpaint_jump, device="cpu")


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def describe(name: str, workers: int, report: BuildReport, root: Path) -> dict[str, float]:
    stages = {s: report.stage_seconds.get(s, 0.0) for s in STAGES}
    busy = sum(stages.values())
    # with workers, stage seconds are summed over processes: scale to the wall clock
    share = {s: v / busy for s, v in stages.items()} if busy else {}
    overhead = max(0.0, report.seconds - busy) if workers == 0 else float("nan")
    disk = disk_bytes(root)
    row = {"set": name, "workers": workers, "items": report.num_items, "seconds": report.seconds,
           "items_per_s": report.items_per_second, "s_per_1000_items": 1000 * report.seconds / report.num_items,
           "MB": disk / 1e6, "kB_per_item": disk / 1e3 / report.num_items,
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
    """Fit ``image`` into a ``size`` x ``size`` gray tile: shrunk with Lanczos, small images
    (64 px outpaintings) enlarged with nearest neighbour so that their pixels stay visible."""
    scale = min(size / image.width, size / image.height)
    shape = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    image = image.resize(shape, resample)
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas


def region_mask(name: str, item: dict, source: _LabelMapSource | None, size: tuple[int, int]) -> Image.Image:
    """White where the pasted content came from in the source image."""
    width, height = size
    if name == "segmix":
        masked = source[source.ids.index(item["query_id"])]
        region = item["region"]
        mask = masked.background if region == "background" else masked.instances[int(region.split(":")[1])]
        return Image.fromarray(mask.numpy().astype("uint8") * 255).convert("RGB")
    mask = Image.new("RGB", (width, height))
    ImageDraw.Draw(mask).rectangle([v - (1 if i > 1 else 0) for i, v in enumerate(item["placement"]["source_box"])],
                                   fill=(255, 255, 255))
    return mask


def labelled_canvas(labels: tuple[str, ...], rows: int, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A white grid of ``rows`` x ``len(labels)`` tiles under a 14 px header of column labels."""
    grid = Image.new("RGB", (len(labels) * size, rows * size + 14), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for col, label in enumerate(labels):
        draw.text((col * size + 4, 1), label, fill=(0, 0, 0))
    return grid, draw


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
    grid, draw = labelled_canvas(("source", "region mask", "pool crop", "synthetic (box: paste)"), len(chosen), size)
    for row, item in enumerate(chosen):
        y = row * size + 14
        query = Image.open(queries[item["query_id"]]).convert("RGB")
        grid.paste(tile(query, size), (0, y))
        grid.paste(tile(region_mask(name, item, source, query.size), size), (size, y))
        grid.paste(tile(Image.open(pool[item["pool_id"]]).convert("RGB").crop(item["pool_box"]), size), (2 * size, y))
        synthetic = Image.open(root / item["file"]).convert("RGB")
        scale = size / synthetic.width
        synthetic = tile(synthetic, size)
        box = item["placement"].get("box")
        if box and item.get("region") != "background":
            ImageDraw.Draw(synthetic).rectangle([v * scale for v in box], outline=(255, 0, 0), width=2)
        grid.paste(synthetic, (3 * size, y))
        draw.text((3 * size + 4, y + 2), item.get("region", ""), fill=(255, 255, 0))
    _save_small(grid, out, len(chosen))


def _save_small(grid: Image.Image, out: Path, rows: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out, optimize=True)
    if out.stat().st_size > 500_000:  # keep results small: 256-colour palette
        grid.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"grid: {out} ({out.stat().st_size / 1e3:.0f} kB, {rows} rows)")


def save_outpaint_grid(root: Path, builder: OutpaintBuilder, out: Path, rows: int = 6, size: int = 160) -> None:
    """Rows of (source with the cropped square in red, kept-region mask, kept pixels of the
    crop, synthetic): the kept region must reappear unchanged in the synthetic image."""
    items = json.loads((root / "manifest.json").read_text())["items"]
    chosen = items[:: max(1, len(items) // rows)][:rows]
    queries = {ref.id: ref.path for ref in builder.queries()}
    resolution = builder.resolution
    grid, draw = labelled_canvas(("source (crop box)", "kept-region mask", "kept pixels", "synthetic"), len(chosen), size)
    for row, item in enumerate(chosen):
        y = row * size + 14
        source = Image.open(queries[item["query_id"]]).convert("RGB")
        box = item["placement"]["source_box"]
        crop = source.crop(box).resize((resolution, resolution), Image.Resampling.BILINEAR)
        framed = source.copy()
        ImageDraw.Draw(framed).rectangle(box, outline=(255, 0, 0), width=max(2, source.width // 80))
        kept = item["placement"]["kept"]
        mask = kept_mask(kept, resolution)
        mask_image = Image.fromarray((mask.numpy() * 255).astype("uint8")).convert("RGB")
        gray = Image.new("RGB", crop.size, (40, 40, 40))
        kept_pixels = Image.composite(crop, gray, mask_image.convert("L"))
        synthetic = Image.open(root / item["file"]).convert("RGB")
        for col, picture in enumerate((framed, mask_image, kept_pixels, synthetic)):
            grid.paste(tile(picture, size - 4), (col * size + 2, y + 2))
        draw.text((3 * size + 4, y + 2), kept.get("diagonal", "") + " " + kept.get("half", ""), fill=(255, 255, 0))
    _save_small(grid, out, len(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=["bsds", "procedural"], default="bsds")
    parser.add_argument("--data", type=Path, default=None,
                        help="BSDS300-like root (train/images, val/images + val/masks) for --source bsds")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--mixes", type=int, default=10)
    parser.add_argument("--output-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--sets", nargs="+", default=["segmix", "cutmix"],
                        choices=["segmix", "cutmix", *OUTPAINT])
    parser.add_argument("--outpaint-resolution", type=int, default=64)
    parser.add_argument("--outpaint-steps", type=int, default=10, help="RePaint steps (paper: 250)")
    parser.add_argument("--outpaint-jump", type=int, default=1, help="RePaint jump length and samples (paper: 10)")
    parser.add_argument("--grids", action="store_true", help="save a PNG grid per set to benchmarks/results/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the main process (workers always use 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.source == "bsds" and args.data is None:
        parser.error("--source bsds builds from a BSDS300-like root: pass --data /path/to/bsds300 "
                     "(train/images, val/images + val/masks), or --source procedural")
    torch.set_num_threads(args.threads)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} (other processes compete for the cores when > 0)")
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bench_synthetic_"))
    try:
        source, pool_dir = make_sources(args.source, args.data, args.queries, args.output_size, args.seed, work)
        for name in args.sets:
            builder = make_builder(name, source, pool_dir, args, work)
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
            if name in ("segmix", "cutmix"):
                compare_png_levels(root)
            if args.grids and name in OUTPAINT:
                save_outpaint_grid(root, builder, RESULTS / f"{name}_grid.png")
            elif args.grids:
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
