"""Training-step time of ``MoCoV3Module`` under Lightning vs a plain PyTorch loop (target <= 1.05x).

Both variants train the same networks (a ``MoCoV3Module``'s backbone, projector, predictor and
their momentum copies) on the same procedural images with the same batch, the same device
augmentations (``models.augment.TwoViews`` + CutMix as configured), AdamW with LinearLR warmup
+ cosine decay, and the momentum update -- all read from ``configs/demo_mocov3.yaml``
(``--config``) without its retrieval callback. The plain loop writes the MoCo v3 step out by hand
(views, queries, EMA, keys, ``lit.contrastive`` losses, backward, step). Each variant runs in
its own subprocess (so peak RSS is its own), the variants alternate for ``--rounds`` rounds
(machine load drifts hit both), and the first ``--warmup`` steps of each run are not timed.

    .venv/bin/python benchmarks/bench_mocov3_step.py              # ~3-5 min on 2 cores
    .venv/bin/python benchmarks/bench_mocov3_step.py --steps 40 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load_config(path: Path) -> tuple[dict, dict]:
    """(model init_args, data init_args) of a training config."""
    config = yaml.safe_load(path.read_text())
    return config["model"]["init_args"], config["data"]["init_args"]


def _loader(data_args: dict):  # noqa: ANN202
    from torch.utils.data import DataLoader

    from datamodules.images import ProceduralTrainData

    data = ProceduralTrainData(**{**data_args, "repeats": 1000})
    return data, DataLoader(data.train_dataset(), batch_size=data.batch_size, shuffle=True)


def run_plain(model_args: dict, data_args: dict, steps: int) -> list[float]:
    """The MoCo v3 step written out by hand over the same networks; per-step seconds."""
    import torch

    from lit.contrastive import contrastive_loss, cosine_momentum, mixed_contrastive_loss, momentum_update_
    from models.augment import cutmix_views, step_seed
    from models.mocov3 import MoCoV3Module, mix_labels

    torch.manual_seed(0)
    net = MoCoV3Module(**model_args)
    hp = net.hparams
    _, loader = _loader(data_args)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
    total, warmup = steps, max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [
        torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / (warmup + 1), 1.0, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup)], milestones=[warmup])
    online = list(net.backbone.parameters()) + list(net.projector.parameters())
    target = list(net.momentum_backbone.parameters()) + list(net.momentum_projector.parameters())
    mean, std, tau = net.mean, net.std, hp.temperature
    net.train()
    times: list[float] = []
    iterator = iter(loader)
    for step in range(steps):
        start = time.perf_counter()
        images = next(iterator)["image"]
        seed = step_seed(hp.augment_seed, step)
        x1, x2 = net.views(images, seed)
        mixed = None
        if hp.cutmix != "none" and float(torch.rand((), generator=torch.Generator().manual_seed(seed))) < hp.cutmix_prob:
            mixed = cutmix_views(x1, hp.cutmix_alpha, seed + 1)
            x1 = mixed.images
        x1, x2 = (x1 - mean) / std, (x2 - mean) / std
        q1 = net.predictor(net.projector(net.backbone(x1)))
        q2 = net.predictor(net.projector(net.backbone(x2)))
        momentum_update_(target, online, cosine_momentum(step, total, hp.base_momentum))
        with torch.no_grad():
            k1 = net.momentum_projector(net.momentum_backbone(x1))
            k2 = net.momentum_projector(net.momentum_backbone(x2))
        if mixed is None or hp.cutmix == "copy":
            loss = contrastive_loss(q1, k2, tau) + contrastive_loss(q2, k1, tau)
        else:
            (a1, b1), (a2, b2) = mix_labels(mixed)
            loss = mixed_contrastive_loss(q1, k2, a1, b1, mixed.area, tau) + \
                mixed_contrastive_loss(q2, k1, a2, b2, mixed.area, tau)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        _ = loss.item()  # what a logging loop reads back
        times.append(time.perf_counter() - start)
    return times


def run_lightning(model_args: dict, data_args: dict, steps: int) -> list[float]:
    """MoCoV3Module under pl.Trainer (no checkpoint/progress bar; a TensorBoard logger writing
    every 10 steps); per-step seconds between consecutive batch ends."""
    import pytorch_lightning as pl

    from datamodules.images import ProceduralTrainData
    from models.mocov3 import MoCoV3Module

    times: list[float] = []

    class Clock(pl.Callback):
        def on_train_start(self, *args: object) -> None:
            self.last = time.perf_counter()

        def on_train_batch_end(self, *args: object) -> None:
            now = time.perf_counter()
            times.append(now - self.last)
            self.last = now

    pl.seed_everything(0, verbose=False)
    model = MoCoV3Module(**model_args)
    with tempfile.TemporaryDirectory(prefix="bench_mocov3_step_") as folder:
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=10,
                             logger=pl.loggers.TensorBoardLogger(folder), enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()])
        trainer.fit(model, datamodule=ProceduralTrainData(**{**data_args, "repeats": 1000}))
    return times


def child(variant: str, config: Path, steps: int, warmup: int, cutmix: str | None, threads: int) -> None:
    """Run one variant and print its timing as JSON (called in a subprocess)."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model_args, data_args = load_config(config)
    if cutmix is not None:
        model_args = {**model_args, "cutmix": cutmix}
    times = (run_plain if variant == "plain" else run_lightning)(model_args, data_args, steps)
    timed = times[warmup:]
    print(json.dumps({
        "variant": variant, "mean": statistics.fmean(timed), "median": statistics.median(timed),
        "wall": time.perf_counter() - started, "steps": len(times),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo_mocov3.yaml")
    parser.add_argument("--cutmix", choices=["none", "copy", "mix"], default=None, help="override the config's form")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per variant (1: stable under CPU contention; 2 on free cores)")
    parser.add_argument("--child", choices=["plain", "lightning"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.config, args.steps, args.warmup, args.cutmix, args.threads)
        return
    results: dict[str, list[dict[str, float]]] = {"plain": [], "lightning": []}
    extra = (["--cutmix", args.cutmix] if args.cutmix else []) + ["--threads", str(args.threads)]
    for round_ in range(args.rounds):
        for variant in ("plain", "lightning") if round_ % 2 == 0 else ("lightning", "plain"):
            command = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--config", str(args.config), *extra]
            out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            results[variant].append(result)
            print(f"round {round_ + 1} {variant:>9}: {1000 * result['median']:.1f} ms/step median, "
                  f"{1000 * result['mean']:.1f} mean, peak RSS {result['max_rss_mb']:.0f} MB", flush=True)
    plain = statistics.median(r["median"] for r in results["plain"])
    light = statistics.median(r["median"] for r in results["lightning"])
    ratios = [lr["median"] / pr["median"] for lr, pr in zip(results["lightning"], results["plain"])]
    model_args, data_args = load_config(args.config)
    print(f"\n{args.config.name}: {model_args.get('arch')} depth {model_args.get('depth')} at "
          f"{model_args.get('img_size')}px, batch {data_args['batch_size']}, cutmix "
          f"{args.cutmix or model_args.get('cutmix', 'none')}, {args.steps - args.warmup} timed steps x {args.rounds} rounds")
    print(f"{'variant':>10} {'ms/step (median)':>17} {'peak RSS MB':>12}")
    for name, value in (("plain", plain), ("lightning", light)):
        rss = max(r["max_rss_mb"] for r in results[name])
        print(f"{name:>10} {1000 * value:>17.1f} {rss:>12.0f}")
    print(f"ratio lightning / plain: {light / plain:.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
          "target <= 1.05)")


if __name__ == "__main__":
    main()
