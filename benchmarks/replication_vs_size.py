"""The paper's trend at small scale: a DDPM trained on fewer images copies more (Sec. 5, Fig. 5).

Trains the demo's UNet and optimiser (``configs/demo.yaml``) on the images of
``--data`` (required: the BSDS300 training photos for the figures in
``benchmarks/README.md``; any folder of images, flat or with an ``images/`` sub-folder,
works) downsampled to 16x16 by default
(shorter side 16, centre 16x16 crop + random flip: diffusers' ``--center_crop
--random_flip``; ``--random-crop`` for the paper's random crops, which need more
steps to be memorised; 32x32 costs 4x per step, too slow for a 10-minute CPU run),
once on N = 16 and once on N = 200 images, for the same number of optimizer
steps, with the ReplicationMonitor (pixel descriptor, fixed seeds) checking a
few times along the way. Prints the replication rates and top-1 statistics of
both runs side by side and saves a figure: rate over training for both N, and
the final top-1 histograms over their training-set baselines.

Other descriptors of the registry need weight files (none ship offline); pass
``--descriptor sscd_resnet50 --weights <file>`` when you have them.

Results go to a new timestamped folder under ``runs/replication_vs_size/`` unless
``--out`` names one (an existing non-empty ``--out`` is refused without ``--overwrite``).

    .venv/bin/python benchmarks/replication_vs_size.py --data /path/to/bsds300   # ~8-10 min on 2 cores
    .venv/bin/python benchmarks/replication_vs_size.py --data /path/to/bsds300 --steps 400 --sizes 16 50 200
    .venv/bin/python benchmarks/replication_vs_size.py --data /my/photos --sizes 8 64
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.data_layout import DATA_HELP, detect_layout, output_dir  # noqa: E402
from callbacks.replication import ReplicationMonitor  # noqa: E402
from datamodules.images import ImageFolderTrainData  # noqa: E402
from lit.plots import draw_similarity_histogram, new_figure, save_figure  # noqa: E402
from models.ddpm import DDPMModule  # noqa: E402
from models.descriptor_config import DescriptorConfig  # noqa: E402

DEFAULT_OUT_BASE = REPO / "runs" / "replication_vs_size"
DEMO = REPO / "configs" / "demo.yaml"
THRESHOLDS = [0.5, 0.8, 0.9, 0.95]


def train(images: Path, size: int, resolution: int, random_crop: bool, steps: int, checks: int, samples: int,
          descriptor: str, weights: str | None, out: Path) -> ReplicationMonitor:
    """Train on the first ``size`` images of the seeded permutation; return the monitor."""
    demo = yaml.safe_load(DEMO.read_text())
    model_args = {**demo["model"]["init_args"], "resolution": resolution}
    pl.seed_everything(0, verbose=False)
    monitor = ReplicationMonitor(descriptor=DescriptorConfig(name=descriptor, weights=weights),
                                 every_n_steps=max(steps // checks, 1),
                                 num_samples=samples, sample_steps=20, thresholds=THRESHOLDS, top_k=3, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, logger=False,
                         default_root_dir=out / f"n{size}", callbacks=[monitor])
    data = ImageFolderTrainData(root=str(images), subset_size=size, subset_seed=0, resolution=resolution,
                                random_crop=random_crop, batch_size=demo["data"]["init_args"]["batch_size"])
    trainer.fit(DDPMModule(**model_args), datamodule=data)
    return monitor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 200])
    parser.add_argument("--steps", type=int, default=1600, help="optimizer steps per run (same for every N)")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--random-crop", action="store_true", help="random instead of centre crops")
    parser.add_argument("--checks", type=int, default=4)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--descriptor", default="pixel")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--data", type=Path, required=True, help=f"{DATA_HELP} (a BSDS300-like root: its train/images)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"result folder (default: a new timestamped folder under {DEFAULT_OUT_BASE})")
    parser.add_argument("--overwrite", action="store_true", help="allow an --out that already holds files")
    args = parser.parse_args(argv)
    images = detect_layout(args.data).train_images
    args.out = output_dir(args.out, DEFAULT_OUT_BASE, args.overwrite)
    print(f"images: {images}; results: {args.out}", flush=True)
    monitors: dict[int, ReplicationMonitor] = {}
    for size in args.sizes:
        start = time.perf_counter()
        monitors[size] = train(images, size, args.resolution, args.random_crop, args.steps, args.checks, args.samples,
                               args.descriptor, args.weights, args.out)
        print(f"N={size}: {args.steps} steps in {time.perf_counter() - start:.0f} s", flush=True)

    metrics = [f"rate@{t:g}" for t in THRESHOLDS] + ["top1_mean", "top1_median"]
    print(f"\nreplication after {args.steps} steps ({args.descriptor} descriptor, {args.samples} generations, "
          f"{images} at {args.resolution}x{args.resolution}); baseline = training images vs each other")
    print(f"{'N':>5} {'':>9} " + " ".join(f"{m:>11}" for m in metrics))
    for size, monitor in monitors.items():
        final, base = monitor.history[-1], monitor.baseline.as_dict()
        print(f"{size:>5} {'generated':>9} " + " ".join(f"{final[m]:>11.3f}" for m in metrics))
        print(f"{'':>5} {'baseline':>9} " + " ".join(f"{base[m]:>11.3f}" for m in metrics))

    figure = new_figure(6.0 * (1 + len(monitors)), 4.2)
    axes = figure.subplots(1, 1 + len(monitors))
    for index, (size, monitor) in enumerate(monitors.items()):  # mean top-1 over training, baseline dotted
        colour = f"C{index}"
        axes[0].plot(monitor.checked_steps(), [row["top1_mean"] for row in monitor.history], marker="o",
                     color=colour, label=f"N={size} generations")
        axes[0].axhline(monitor.baseline.mean, color=colour, linestyle=":", label=f"N={size} training vs training")
    axes[0].set(xlabel="training step", ylabel=f"mean top-1 similarity ({args.descriptor})",
                title="similarity of generations to their nearest training image")
    axes[0].legend(fontsize="small")
    axes[0].grid(alpha=0.3)
    for ax, (size, monitor) in zip(axes[1:], monitors.items()):
        draw_similarity_histogram(ax, monitor.latest["top1"], monitor.baseline_scores, THRESHOLDS,
                                  title=f"N = {size} training images, step {args.steps}")
    path = save_figure(figure, args.out / "replication_vs_size.png")
    print(f"figure: {path}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
