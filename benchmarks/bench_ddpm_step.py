"""Training-step time of ``DDPMModule`` under Lightning vs a plain PyTorch loop (target <= 1.05x).

Both variants train the same diffusers UNet on the same procedural images with
the same batch, AdamW + LinearLR warmup, EMA update and noise schedule, all
read from ``configs/demo.yaml`` (``--config``): the plain loop is diffusers'
unconditional training recipe written out by hand. Each variant runs in its own subprocess (so peak RSS is
its own), the variants alternate for ``--rounds`` rounds (machine load drifts
hit both), and the first ``--warmup`` steps of each run are not timed.

    .venv/bin/python benchmarks/bench_ddpm_step.py            # ~3-4 min on 2 cores
    .venv/bin/python benchmarks/bench_ddpm_step.py --steps 60 --rounds 3
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


def run_plain(model_args: dict, data_args: dict, steps: int) -> list[float]:
    """diffusers' unconditional recipe as a plain loop; returns per-step seconds."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from torch.utils.data import DataLoader

    from datamodules.images import ProceduralTrainData
    from models.ddpm import build_unet

    hp = {**_module_defaults(), **model_args}
    torch.manual_seed(0)
    unet = build_unet(*(hp[k] for k in ("resolution", "in_channels", "block_out_channels", "layers_per_block",
                                        "down_block_types", "up_block_types", "attention_head_dim", "norm_num_groups")))
    scheduler = DDPMScheduler(num_train_timesteps=hp["num_train_timesteps"], beta_schedule=hp["beta_schedule"])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=hp["learning_rate"], betas=tuple(hp["adam_betas"]),
                                  weight_decay=hp["weight_decay"], eps=1e-8)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / (hp["warmup_steps"] + 1), 1.0, max(hp["warmup_steps"], 1))
    ema = EMAModel(unet.parameters(), decay=hp["ema_decay"], use_ema_warmup=True, power=hp["ema_power"], foreach=True)
    data = ProceduralTrainData(**{**data_args, "repeats": 1000})
    loader = DataLoader(data.train_dataset(), batch_size=data.batch_size, shuffle=True)
    times: list[float] = []
    unet.train()
    iterator = iter(loader)
    for _ in range(steps):
        start = time.perf_counter()
        batch = next(iterator)
        clean = batch["image"] * 2 - 1
        noise = torch.randn_like(clean)
        t = torch.randint(0, hp["num_train_timesteps"], (clean.shape[0],), dtype=torch.long)
        loss = F.mse_loss(unet(scheduler.add_noise(clean, noise, t), t, return_dict=False)[0], noise)
        loss.backward()
        optimizer.step()
        warmup.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unet.parameters())
        _ = loss.item()  # what a logging loop reads back
        times.append(time.perf_counter() - start)
    return times


def _module_defaults() -> dict:
    import inspect

    from models.ddpm import DDPMModule

    return {name: p.default for name, p in inspect.signature(DDPMModule.__init__).parameters.items()
            if p.default is not inspect.Parameter.empty}


def run_lightning(model_args: dict, data_args: dict, steps: int) -> list[float]:
    """DDPMModule under pl.Trainer (see ``step_timing.lightning_step_times``); per-step seconds."""
    import pytorch_lightning as pl

    from datamodules.images import ProceduralTrainData
    from models.ddpm import DDPMModule

    pl.seed_everything(0, verbose=False)
    model = DDPMModule(**model_args)
    data = ProceduralTrainData(**{**data_args, "repeats": 1000})
    return lightning_step_times(model, data, steps, prefix="bench_ddpm_step_")


def child(variant: str, config: Path, steps: int, warmup: int) -> None:
    """Run one variant and print its timing as JSON (called in a subprocess)."""
    model_args, data_args = load_config(config)
    run = run_plain if variant == "plain" else run_lightning
    print_child_result(variant, lambda: run(model_args, data_args, steps), warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    parser.add_argument("--child", choices=["plain", "lightning"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.config, args.steps, args.warmup)
        return
    model_args, data_args = load_config(args.config)
    title = (f"{args.config.name}: UNet {model_args['block_out_channels']} at {model_args['resolution']}px, "
             f"batch {data_args['batch_size']}, {args.steps - args.warmup} timed steps x {args.rounds} rounds")
    compare_in_subprocesses(__file__, ["--steps", str(args.steps), "--warmup", str(args.warmup),
                                       "--config", str(args.config)], args.rounds, title)


if __name__ == "__main__":
    main()
