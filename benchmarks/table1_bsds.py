"""The paper's Table 1 on sets built from BSDS300 (or any image folder): Segmix, Cutmix and
Dif-Patch, for every descriptor usable without downloaded weights (``pixel``, and
random-init networks as a floor).

``--data`` (required) is any image folder (see
``benchmarks/data_layout.py``): a BSDS300-like root (queries = the 100 val images,
Segmix and Cutmix paste into the 200 train images, VOC masks), an ``images/`` +
``masks/`` folder (Segmix with ``--mask-format``, default ``folder``), or a flat folder
of images (no masks: Segmix is left out). Without a BSDS-like ``train/`` or ``--pool``,
the paste pool is a seeded half of the images, disjoint from the queries. Each set is built once,
through the same ``lit`` config parser that ``lit test`` uses (so the runs find a
matching manifest and reuse it), into ``--work`` (outside the repository by default).
Every (dataset, descriptor) pair is then one real ``lit test`` subprocess
(``python -m lit.commands.cli test -c configs/X.yaml ...``) with ``OMP_NUM_THREADS=--threads``;
``lit report`` pivots the metrics.json files into Table 1 (mAP, average rank) plus
Recall@1/@10 and MRR tables, which are copied to ``--out`` with the build figures and
the wall time and peak RSS of every run. ``--out`` defaults to a new timestamped folder
under ``runs/table1/``; an existing non-empty ``--out`` (such as the committed
``benchmarks/results/table1``) is refused unless ``--overwrite`` is given.

Dif-Patch needs a DDPM. Offline there are no trained weights, so by default the script
saves a small *random-init* diffusers ``UNet2DModel`` (``--resolution`` px) with a linear
DDPM schedule into the work folder and runs a few RePaint steps: the outpainted 80% is
then structured noise, and Dif-Patch measures how well a descriptor matches the kept 20%
patch only. Pass ``--unet`` (a diffusers UNet folder or a ``models.ddpm.DDPMModule``
checkpoint, with ``--resolution`` equal to its training resolution) to use a trained one.

    .venv/bin/python benchmarks/table1_bsds.py --data /path/to/bsds300 --fresh    # full run, ~24-28 min on 2 cores
    .venv/bin/python benchmarks/table1_bsds.py --data /my/photos --datasets cutmix --descriptors pixel
    .venv/bin/python benchmarks/table1_bsds.py --data /path/to/bsds300 --fresh \
        --out benchmarks/results/table1 --overwrite                                # the committed one
    .venv/bin/python benchmarks/table1_bsds.py --data /path/to/bsds300 --resume   # re-render, keeping finished runs
    .venv/bin/python benchmarks/table1_bsds.py --data /path/to/bsds300 --descriptors pixel vit_s16_in1k  # a quick look
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.data_layout import DATA_HELP, ImageLayout, detect_layout, output_dir  # noqa: E402

DEFAULT_OUT_BASE = REPO / "runs" / "table1"
WORK_MARK = ".table1-work"
"""File that marks a --work folder as this script's own (``--fresh`` deletes only such a folder)."""
DEFAULT_DESCRIPTORS = ("pixel", "sscd_resnet50", "dino_vit_b16", "clip_vit_b16", "vit_s16_in1k", "swin_b_in1k")
DATASETS = ("segmix", "cutmix", "dif_patch")
CONFIGS = {"segmix": "configs/segmix_voc.yaml", "cutmix": "configs/cutmix.yaml", "dif_patch": "configs/dif_patch.yaml"}
MAX_PNG_BYTES = 300_000
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """Everything that determines the sets and the runs (saved beside the results)."""

    data: ImageLayout
    work: Path
    input_size: int
    threads: int
    unet: Path | None
    resolution: int
    repaint_steps: int
    jump_length: int
    jump_n_sample: int
    seed: int


@dataclass
class RunRecord:
    """One ``lit test`` subprocess: what it evaluated, how long it took, where its logs are."""

    dataset: str
    descriptor: str
    wall_s: float
    peak_rss_mib: float
    returncode: int
    rebuilt_set: bool
    log_dir: str


# ----------------------------------------------------------------------------- arguments
def data_args(dataset: str, settings: Settings, unet: Path) -> list[str]:
    """``--data.init_args.*`` overrides that point a config at the image folders and the work folder."""
    layout = settings.data
    out = settings.work / "sets" / dataset
    common = [f"--data.init_args.output_dir={out}", f"--data.init_args.seed={settings.seed}",
              "--data.init_args.num_queries=null", "--data.init_args.progress=false"]
    pool = [f"--data.init_args.pool={layout.pool if layout.pool is not None else 'null'}"]
    if dataset == "segmix":
        if layout.segmix_root is None:
            raise ValueError(f"Segmix needs masks: {layout.queries} has no masks/ folder beside it")
        return common + pool + [f"--data.init_args.root={layout.segmix_root}",
                                f"--data.init_args.mask_format={layout.mask_format}",
                                "--data.init_args.images=images", "--data.init_args.masks=masks",
                                "--data.init_args.image_set=null"]
    if dataset == "cutmix":
        return common + pool + [f"--data.init_args.root={layout.queries}"]
    if dataset == "dif_patch":
        return common + [f"--data.init_args.root={layout.queries}", f"--data.init_args.unet={unet}",
                         f"--data.init_args.resolution={settings.resolution}",
                         f"--data.init_args.num_inference_steps={settings.repaint_steps}",
                         f"--data.init_args.jump_length={settings.jump_length}",
                         f"--data.init_args.jump_n_sample={settings.jump_n_sample}",
                         "--data.init_args.device=cpu"]
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def run_name(descriptor: str) -> str:
    """Row label in Table 1: random-init networks are marked as such."""
    return descriptor if descriptor == "pixel" else f"{descriptor} (random init)"


def model_args(descriptor: str, settings: Settings) -> list[str]:
    """``--model.init_args.*`` for one descriptor (``pixel`` has a fixed 32 px input)."""
    args = [f"--model.init_args.descriptor.name={descriptor}", f"--model.init_args.run_name={run_name(descriptor)}"]
    if descriptor != "pixel":
        args += ["--model.init_args.descriptor.random_init=true",
                 f"--model.init_args.descriptor.input_size={settings.input_size}"]
    return args


def trainer_args(dataset: str, descriptor: str, settings: Settings) -> list[str]:
    """CPU, no progress bar, logs in ``<work>/runs/<dataset>/<descriptor>`` (fixed, so a rerun overwrites)."""
    return ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={settings.work / 'runs'}",
            f"--trainer.logger.init_args.name={dataset}", f"--trainer.logger.init_args.version={descriptor}"]


def cli_args(dataset: str, descriptor: str, settings: Settings, unet: Path) -> list[str]:
    """Arguments after ``lit test`` for one (dataset, descriptor) pair."""
    return (["-c", str(REPO / CONFIGS[dataset])] + data_args(dataset, settings, unet) + model_args(descriptor, settings)
            + trainer_args(dataset, descriptor, settings))


# ----------------------------------------------------------------------------- the model
def random_unet(folder: Path, resolution: int, seed: int) -> Path:
    """A seeded random-init 3-level ``UNet2DModel`` plus a linear DDPM ``scheduler_config.json``
    in ``folder`` (kept if already there: its SHA-256 is part of the Dif-Patch manifest)."""
    if (folder / "config.json").is_file() and (folder / "scheduler_config.json").is_file():
        return folder
    import torch
    from diffusers import DDPMScheduler

    from models.ddpm import build_unet

    torch.manual_seed(seed)
    unet = build_unet(resolution, 3, (8, 16, 16), 1, ("DownBlock2D",) * 3, ("UpBlock2D",) * 3,
                      attention_head_dim=8, norm_num_groups=4)
    unet.save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- building
def build_set(dataset: str, settings: Settings, unet: Path) -> dict[str, object]:
    """Build (or reuse) one set with the datamodule the ``lit test`` runs will instantiate
    from the same arguments; return its build figures. Runs in a child process (see
    :func:`in_fresh_process`)."""
    import torch

    from lit.commands.lightning_cli import LitCLI

    torch.set_num_threads(settings.threads)
    sys.argv = sys.argv[:1]  # a child process: LightningCLI warns when it sees args beside sys.argv
    cli = LitCLI(args=cli_args(dataset, "pixel", settings, unet), run=False)
    datamodule = cli.datamodule
    start = time.perf_counter()
    datamodule.prepare_data()
    seconds = time.perf_counter() - start
    report = datamodule.build_report
    root = Path(datamodule.output_dir)
    disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return {"dataset": dataset, "reused": report.reused, "items": report.num_items,
            "skipped_queries": report.num_skipped, "seconds": round(seconds, 2),
            "items_per_s": round(report.num_items / seconds, 2) if not report.reused else None,
            "disk_mib": round(disk / 2**20, 2),
            "stage_seconds": {k: round(v, 2) for k, v in report.stage_seconds.items()}}


# ----------------------------------------------------------------------------- running
def in_fresh_process(function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` in a child process, so this driver never imports torch and stays
    small. Forked, not spawned: a spawned child makes ``spawn`` its default start method,
    and the build's DataLoader workers then re-import torch and Lightning (measured: Segmix
    build 6 s in a forked or the main process, 25 s in a spawned one)."""
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as executor:
        return executor.submit(function, *args).result()


def manifest_stamp(settings: Settings, dataset: str) -> int:
    """mtime (ns) of a set's manifest, 0 when absent: a change during a run means it rebuilt the set."""
    path = settings.work / "sets" / dataset / "manifest.json"
    return path.stat().st_mtime_ns if path.is_file() else 0


def run_one(dataset: str, descriptor: str, settings: Settings, unet: Path) -> RunRecord:
    """One ``lit test`` subprocess; its output goes to ``<work>/logs``; wall time and the
    child's own peak RSS (``os.wait4``) are recorded."""
    logs = settings.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{dataset}__{descriptor}.log"
    command = [sys.executable, "-m", "lit.commands.cli", "test", *cli_args(dataset, descriptor, settings, unet)]
    env = {**os.environ, "OMP_NUM_THREADS": str(settings.threads), "MKL_NUM_THREADS": str(settings.threads),
           "PYTHONPATH": str(REPO)}
    stamp = manifest_stamp(settings, dataset)
    start = time.perf_counter()
    with log_file.open("w", encoding="utf-8") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    return RunRecord(dataset, descriptor, round(wall, 1), round(usage.ru_maxrss / 1024, 1), process.returncode,
                     manifest_stamp(settings, dataset) != stamp, str(settings.work / "runs" / dataset / descriptor))


def report(settings: Settings, out: Path) -> str:
    """``lit report`` over every run; copies its Markdown and CSV files into ``out``."""
    report_dir = settings.work / "report"
    shutil.rmtree(report_dir, ignore_errors=True)
    command = [sys.executable, "-m", "lit.commands.cli", "report", str(settings.work / "runs"), "--out", str(report_dir)]
    subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
                   stdout=subprocess.DEVNULL)
    for path in sorted(report_dir.iterdir()):
        if path.suffix in (".md", ".csv"):
            shutil.copyfile(path, out / path.name)
    return (report_dir / "table1.md").read_text(encoding="utf-8")


def table_column(record: RunRecord) -> str:
    """The Table 1 column of a run: the datamodule's ``name`` that ``lit test`` wrote."""
    metrics = Path(record.log_dir) / "metrics.json"
    return json.loads(metrics.read_text())["dataset"] if metrics.is_file() else "?"


def save_small_png(source: Path, target: Path, limit: int = MAX_PNG_BYTES) -> None:
    """Copy a PNG within ``limit`` bytes: as is, else with a 256-colour palette, else halved
    (and so on) until it fits."""
    from PIL import Image

    image = Image.open(source).convert("RGB")
    while True:
        for candidate in (image, image.quantize(256, method=Image.Quantize.MEDIANCUT)):
            buffer = io.BytesIO()
            candidate.save(buffer, format="PNG", optimize=True)
            if buffer.tell() <= limit or min(image.size) < 64:
                target.write_bytes(buffer.getvalue())
                return
        image = image.resize((image.width // 2, image.height // 2), Image.LANCZOS)


def markdown(rows: list[dict[str, object]], keys: list[str]) -> str:
    """A Markdown table of ``rows`` (columns ``keys``; None prints empty)."""
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if row.get(k) is None else str(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    """``rows`` as CSV, header from the first row."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", "--bsds", type=Path, required=True, dest="data", help=DATA_HELP)
    parser.add_argument("--pool", type=Path, default=None,
                        help="paste targets for Segmix / Cutmix (default: BSDS train/images, else a seeded half)")
    parser.add_argument("--mask-format", choices=("voc", "folder", "coco"), default=None,
                        help="format of the masks/ folder (default: voc for BSDS300, folder otherwise)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/table1_work"),
                        help="sets, the random UNet, run logs (outside the repository)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where the small result files go (default: a new folder under {DEFAULT_OUT_BASE})")
    parser.add_argument("--overwrite", action="store_true", help="allow an --out that already holds files")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--descriptors", nargs="+", default=list(DEFAULT_DESCRIPTORS))
    parser.add_argument("--input-size", type=int, default=128,
                        help="input resolution of the network descriptors (multiple of 32 for swin, 16 for ViT)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--unet", type=Path, default=None,
                        help="trained diffusers UNet folder or DDPMModule .ckpt for Dif-Patch (default: random init)")
    parser.add_argument("--resolution", type=int, default=64, help="Dif-Patch canvas (the UNet's resolution)")
    parser.add_argument("--repaint-steps", type=int, default=10)
    parser.add_argument("--jump-length", type=int, default=5)
    parser.add_argument("--jump-n-sample", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="skip runs whose metrics.json already exists")
    parser.add_argument("--fresh", action="store_true", help="delete --work first (sets are rebuilt)")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Settings, Path]:
    """Settings from the options, with the data layout detected, ``--work`` claimed (or
    emptied with ``--fresh``, only when this script made it) and the output folder made."""
    layout = detect_layout(args.data.resolve(), args.pool.resolve() if args.pool else None, args.mask_format)
    if "segmix" in args.datasets and layout.segmix_root is None:
        print(f"[note] {args.data} has no masks/ folder: Segmix is left out", flush=True)
        args.datasets = [d for d in args.datasets if d != "segmix"]
    if not args.datasets:
        raise SystemExit("no dataset left to run")
    claim_work(args.work, args.fresh)
    out = output_dir(args.out, DEFAULT_OUT_BASE, args.overwrite)
    settings = Settings(layout, args.work.resolve(), args.input_size, args.threads,
                        args.unet.resolve() if args.unet else None, args.resolution, args.repaint_steps,
                        args.jump_length, args.jump_n_sample, args.seed)
    return settings, out


def claim_work(work: Path, fresh: bool) -> None:
    """Create ``work`` with :data:`WORK_MARK`; ``fresh`` deletes it first, but only when the
    mark shows this script made it (a user's folder given as ``--work`` is never deleted)."""
    if work.exists() and not (work / WORK_MARK).is_file():
        known = {"sets", "runs", "logs", "report", "builds.json", "timings.json"}  # what earlier versions wrote
        if not work.is_dir() or not all(p.name in known or p.name.startswith("unet_random") for p in work.iterdir()):
            raise SystemExit(f"--work {work} holds files this script did not write (no {WORK_MARK}); "
                             "choose an empty or new folder")
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARK).write_text("scratch folder of benchmarks/table1_bsds.py (--fresh deletes it)\n")


def main(argv: list[str] | None = None) -> None:
    """Build the sets, run every (dataset, descriptor) pair, write the report to ``--out``."""
    args = parse_args(argv)
    settings, out = prepare(args)
    args.out = out
    print(f"[out] {out}", flush=True)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the build processes
    total_start = time.perf_counter()
    unet = settings.unet or settings.work / f"unet_random{settings.resolution}"
    if settings.unet is None and "dif_patch" in args.datasets:
        in_fresh_process(random_unet, unet, settings.resolution, settings.seed)

    builds_file = settings.work / "builds.json"
    last_builds = json.loads(builds_file.read_text()) if builds_file.is_file() else {}
    builds = []
    for dataset in args.datasets:
        print(f"[build] {dataset} ...", flush=True)
        build = in_fresh_process(build_set, dataset, settings, unet)
        print(f"[build] {json.dumps(build)}", flush=True)
        if not build["reused"] or dataset not in last_builds:
            last_builds[dataset] = build
        # a reused set reports the figures of the call that built it
        builds.append({**last_builds[dataset], "reused": build["reused"]})
    builds_file.write_text(json.dumps(last_builds, indent=1))

    timings_file = settings.work / "timings.json"
    previous = json.loads(timings_file.read_text()) if args.resume and timings_file.is_file() else {}
    records: list[RunRecord] = []
    pairs = [(d, n) for d in args.datasets for n in args.descriptors]
    for position, (dataset, descriptor) in enumerate(pairs, 1):
        key = f"{dataset}/{descriptor}"
        metrics = settings.work / "runs" / dataset / descriptor / "metrics.json"
        if args.resume and metrics.is_file() and key in previous:
            records.append(RunRecord(**previous[key]))
            print(f"[{position}/{len(pairs)}] {key}: kept from an earlier run", flush=True)
            continue
        metrics.unlink(missing_ok=True)
        record = run_one(dataset, descriptor, settings, unet)
        records.append(record)
        previous[key] = asdict(record)
        timings_file.write_text(json.dumps(previous, indent=1))
        state = "ok" if record.returncode == 0 and metrics.is_file() else f"FAILED (rc {record.returncode})"
        note = "  (rebuilt the set: manifest did not match!)" if record.rebuilt_set else ""
        print(f"[{position}/{len(pairs)}] {key}: {state}, {record.wall_s:.1f} s, "
              f"peak RSS {record.peak_rss_mib:.0f} MiB{note}", flush=True)

    table = report(settings, args.out)
    for dataset in ("segmix", "dif_patch"):
        grid = settings.work / "runs" / dataset / "pixel" / "retrievals.png"
        if grid.is_file():
            save_small_png(grid, args.out / f"{dataset}_retrievals_pixel.png")
    timing_rows = [{"dataset": r.dataset, "column": table_column(r), "descriptor": r.descriptor,
                    "wall_s": r.wall_s, "peak_rss_mib": r.peak_rss_mib, "returncode": r.returncode}
                   for r in records]
    write_csv(args.out / "timings.csv", timing_rows)
    build_rows = [{k: v for k, v in b.items() if k != "stage_seconds"} for b in builds]
    total = time.perf_counter() - total_start
    full = sum(float(b["seconds"]) for b in builds) + sum(r.wall_s for r in records)
    meta = {"settings": {k: str(v) for k, v in asdict(settings).items()}, "builds": builds,
            "descriptors": args.descriptors, "datasets": args.datasets, "this_call_wall_s": round(total, 1),
            "builds_plus_runs_s": round(full, 1),
            "command": " ".join([".venv/bin/python", "benchmarks/table1_bsds.py", *(argv or sys.argv[1:])]),
            "reproduce": f".venv/bin/python benchmarks/table1_bsds.py --data {args.data} --fresh",
            "data_layout": {k: str(v) for k, v in asdict(settings.data).items()},
            "failed": [asdict(r) for r in records if r.returncode != 0]}
    (args.out / "run_info.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    summary = ["# Table 1 on BSDS300-built sets\n", table, "\n## Set builds (figures of the call that built each set)\n", markdown(build_rows, list(build_rows[0])),
               "\n## Wall time per run (s; one `lit test` process each, incl. ~15-20 s start-up)\n",
               markdown(timing_rows, list(timing_rows[0])), f"\nSet builds plus runs: {full / 60:.1f} min (this call: {total / 60:.1f} min; "
               "`--resume` keeps finished runs and their recorded times)\n"]
    (args.out / "summary.md").write_text("\n".join(summary), encoding="utf-8")
    print("\n".join(summary))
    if meta["failed"]:
        raise SystemExit(f"{len(meta['failed'])} run(s) failed; see {settings.work / 'logs'}")


if __name__ == "__main__":
    main()
