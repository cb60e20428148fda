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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_timing import (  # noqa: E402 - benchmarks are scripts, not a package
    REPO,
    compare_in_subprocesses,
    lightning_step_times,
    load_config,
    print_child_result,
)

sys.path.insert(0, str(REPO))


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
    """MoCoV3Module under pl.Trainer (see ``step_timing.lightning_step_times``); per-step seconds."""
    import pytorch_lightning as pl

    from datamodules.images import ProceduralTrainData
    from models.mocov3 import MoCoV3Module

    pl.seed_everything(0, verbose=False)
    model = MoCoV3Module(**model_args)
    data = ProceduralTrainData(**{**data_args, "repeats": 1000})
    return lightning_step_times(model, data, steps, prefix="bench_mocov3_step_")


def child(variant: str, config: Path, steps: int, warmup: int, cutmix: str | None, threads: int) -> None:
    """Run one variant and print its timing as JSON (called in a subprocess)."""
    import torch

    torch.set_num_threads(threads)
    model_args, data_args = load_config(config)
    if cutmix is not None:
        model_args = {**model_args, "cutmix": cutmix}
    run = run_plain if variant == "plain" else run_lightning
    print_child_result(variant, lambda: run(model_args, data_args, steps), warmup)


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
    model_args, data_args = load_config(args.config)
    title = (f"{args.config.name}: {model_args.get('arch')} depth {model_args.get('depth')} at "
             f"{model_args.get('img_size')}px, batch {data_args['batch_size']}, cutmix "
             f"{args.cutmix or model_args.get('cutmix', 'none')}, {args.steps - args.warmup} timed steps x "
             f"{args.rounds} rounds")
    extra = (["--cutmix", args.cutmix] if args.cutmix else []) + ["--threads", str(args.threads)]
    compare_in_subprocesses(__file__, ["--steps", str(args.steps), "--warmup", str(args.warmup),
                                       "--config", str(args.config), *extra], args.rounds, title)


if __name__ == "__main__":
    main()
