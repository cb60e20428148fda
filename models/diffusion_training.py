"""Pieces every diffusion LightningModule of the suite trains with (``DDPMModule``, ``TextDiffusionModule``).

- :func:`training_target`: what the network learns to predict (noise, velocity or the clean sample);
- :func:`adamw_with_warmup`: AdamW with a linear warmup, then a constant or cosine rate (diffusers' recipe);
- :func:`make_ema`: the exponential moving average of the weights (diffusers ``EMAModel``, warmup power);
- :func:`fit_batch_position`: a batch's index among all batches of the fit (what per-batch seeds name);
- :func:`seeded_rng`: a block run with torch's generators seeded, their states restored afterwards;
- :func:`check_unet_layout`, :func:`check_positive`, :func:`as_seed`: one-line argument checks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from torch import Tensor

LrSchedule = Literal["constant", "cosine"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


def training_target(scheduler: DDPMScheduler, clean: Tensor, noise: Tensor, steps: Tensor) -> Tensor:
    """The regression target of ``scheduler.config.prediction_type``: the noise (``epsilon``), the
    velocity (``v_prediction``) or the clean sample (``sample``)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, steps)
    if kind == "sample":
        return clean
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {kind!r}")


def adamw_with_warmup(parameters: Iterable[torch.nn.Parameter], *, learning_rate: float,
                      adam_betas: tuple[float, float] | list[float], weight_decay: float, warmup_steps: int,
                      lr_schedule: LrSchedule, total_steps: int | None = None) -> dict[str, Any]:
    """``configure_optimizers``' answer: AdamW, a LinearLR warmup over ``warmup_steps`` optimizer steps,
    then the constant rate or a cosine decay to 0 over the remaining ``total_steps`` (SequentialLR)."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, betas=tuple(adam_betas),  # type: ignore[arg-type]
                                  weight_decay=weight_decay, eps=1e-8)
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / (warmup_steps + 1), end_factor=1.0, total_iters=max(warmup_steps, 1)
    )
    schedule: torch.optim.lr_scheduler.LRScheduler = warmup
    if lr_schedule == "cosine":
        if total_steps is None:
            raise ValueError("lr_schedule 'cosine' needs the number of optimizer steps of the fit")
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1))
        schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, decay], milestones=[warmup_steps])
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def make_ema(parameters: Iterable[torch.nn.Parameter], *, decay: float, power: float) -> EMAModel:
    """diffusers' ``EMAModel`` with warmup: the decay at update n is ``1 - (1 + n) ** -power``, capped at ``decay``."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_decay must be in [0, 1], got {decay}")
    return EMAModel(parameters, decay=decay, use_ema_warmup=True, inv_gamma=1.0, power=power, foreach=True)


def fit_batch_position(trainer: pl.Trainer | None, batch_idx: int) -> int:
    """The batch's index among all batches of the fit, the same on every rank and restored by a resume
    (``batch_idx`` outside a trainer)."""
    if trainer is None:
        return batch_idx
    return int(trainer.fit_loop.epoch_loop.total_batch_idx)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with torch's CPU generator (and that of ``device``, on an accelerator)
    seeded by ``seed``; their previous states come back on exit (``torch.random.fork_rng``)."""
    if device.type in ("cpu", "meta"):
        with torch.random.fork_rng(devices=[], device_type="cpu"):
            torch.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if hasattr(module, "device"):
            with module.device(index):
                module.manual_seed(seed)  # this device only (manual_seed_all would touch the others)
        else:
            module.manual_seed(seed)
        yield


def check_unet_layout(size: int, block_out_channels: Sequence[int], down_block_types: Sequence[str],
                      up_block_types: Sequence[str], norm_num_groups: int, size_name: str = "resolution") -> None:
    """One-line ValueErrors for a diffusers UNet block layout that cannot be built or run at ``size`` px."""
    levels = len(block_out_channels)
    if levels == 0:
        raise ValueError("block_out_channels must list at least one level")
    if len(down_block_types) != levels or len(up_block_types) != levels:
        raise ValueError(
            f"down_block_types ({len(down_block_types)}) and up_block_types ({len(up_block_types)}) "
            f"must have one entry per level of block_out_channels ({levels})"
        )
    bad = [c for c in block_out_channels if c % norm_num_groups]
    if bad:
        raise ValueError(f"norm_num_groups={norm_num_groups} must divide every block_out_channels entry; {bad} do not")
    if size % (2 ** (levels - 1)):
        raise ValueError(f"{size_name} {size} must be divisible by 2**{levels - 1} for {levels} UNet levels")


def as_seed(value: Any) -> int:
    """A non-negative int seed (a one-element tensor is read as its value)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"seeds must be non-negative ints, got {value!r}")
    return value


def check_positive(**values: int) -> None:
    """Raise a one-line ValueError naming the first value that is not a positive int."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
