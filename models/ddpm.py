"""``lit fit`` for an unconditional DDPM (the models of the paper's Sec. 5), built on diffusers.

:class:`DDPMModule` trains a ``UNet2DModel`` to predict the noise added by a
``DDPMScheduler`` (1000 steps, linear betas, epsilon prediction by default) with
an MSE loss, AdamW and a linear learning-rate warmup, and keeps an exponential
moving average of the weights (diffusers ``EMAModel``, saved in the checkpoint).
Each batch's noise and timesteps are drawn from generators seeded by the run seed
and the batch's place in the fit, so a resumed run (``--ckpt_path``) draws exactly
what the uninterrupted run drew (``lit.resume``).

:meth:`DDPMModule.sample` draws images with the DDPM or DDIM sampler from the
EMA weights. Every seed owns one ``torch.Generator`` (on the CPU) for its
initial noise and for every step's noise, so a seed gives the same image
whatever batch, chunk, device count or rank it is drawn in: generations are
comparable across checks, runs and DDP layouts.

``lit predict`` runs :meth:`DDPMModule.predict_step` over a dataset of seeds
(``datamodules.images.GenerationSeeds`` or the ``predict_dataloader`` of the
training datamodules) and writes ``<predict_dir>/seed_<n>.png``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor

from lit.grids import save_png
from lit.resume import close_finished_epoch, run_seed
from lit.seeding import derive_seed
from models.diffusion_training import (
    BetaSchedule,
    LrSchedule,
    adamw_with_warmup,
    as_seed,
    check_positive,
    check_unet_layout,
    fit_batch_position,
    make_ema,
    seeded_rng,
    training_target,
)

Sampler = Literal["ddpm", "ddim"]
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class DDPMModule(pl.LightningModule):
    """Unconditional DDPM: UNet2DModel + DDPMScheduler + AdamW/warmup + EMA.

    Args:
        resolution: side of the square training images (the UNet's ``sample_size``).
        in_channels: image channels (3 for RGB).
        block_out_channels: channels of each UNet resolution level.
        layers_per_block: ResNet layers per level.
        down_block_types: diffusers block per level, e.g. ``AttnDownBlock2D`` for
            self-attention at that level, ``DownBlock2D`` without.
        up_block_types: the matching up blocks (reverse order, ``AttnUpBlock2D``/``UpBlock2D``).
        attention_head_dim: channels per attention head.
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        dropout: dropout in the ResNet blocks.
        learning_rate: peak AdamW learning rate.
        warmup_steps: optimizer steps of linear warmup from 0 to ``learning_rate``.
        lr_schedule: after warmup, keep the rate (``constant``) or decay it to 0 with a
            cosine over the remaining steps (``cosine``, diffusers' recipe).
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas (diffusers' recipe uses 0.95, 0.999).
        ema_decay: maximum EMA decay.
        ema_power: EMA warmup power: decay at step n is ``1 - (1 + n) ** -ema_power``
            (capped at ``ema_decay``), so early weights are not frozen in.
        num_train_timesteps: diffusion steps of the noise schedule.
        beta_schedule: diffusers beta schedule (the paper: ``linear``).
        beta_start: first beta.
        beta_end: last beta.
        prediction_type: what the UNet predicts (the paper: ``epsilon``).
        sample_steps: sampler steps used by :meth:`sample` when none are given.
        sampler: ``ddpm`` (ancestral) or ``ddim`` (deterministic, eta 0).
        sample_batch_size: images denoised together by :meth:`sample` (memory bound only;
            results do not depend on it).
        pretrained: local diffusers ``UNet2DModel`` folder (``config.json`` + weights, or a
            pipeline folder with ``unet/``) to start from; the architecture arguments above
            are then taken from the folder.
        predict_dir: where ``lit predict`` writes PNGs (default ``<log_dir>/generations``).
    """

    def __init__(
        self,
        resolution: int = 32,
        in_channels: int = 3,
        block_out_channels: list[int] = [64, 128, 128],  # noqa: B006 - LightningCLI shows list defaults
        layers_per_block: int = 2,
        down_block_types: list[str] = ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],  # noqa: B006
        up_block_types: list[str] = ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],  # noqa: B006
        attention_head_dim: int = 8,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        learning_rate: float = 1e-4,
        warmup_steps: int = 500,
        lr_schedule: LrSchedule = "constant",
        weight_decay: float = 1e-6,
        adam_betas: tuple[float, float] = (0.95, 0.999),
        ema_decay: float = 0.9999,
        ema_power: float = 0.75,
        num_train_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
        sample_steps: int = 50,
        sampler: Sampler = "ddim",
        sample_batch_size: int = 64,
        pretrained: str | None = None,
        predict_dir: str | None = None,
    ) -> None:
        super().__init__()
        check_positive(resolution=resolution, layers_per_block=layers_per_block,
                        num_train_timesteps=num_train_timesteps, sample_steps=sample_steps,
                        sample_batch_size=sample_batch_size)
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.save_hyperparameters()
        if pretrained is not None:
            self.unet = load_pretrained_unet(pretrained).train()  # from_pretrained leaves eval mode (dropout off)
            loaded = self.unet.config.sample_size
            if isinstance(loaded, int) and loaded != resolution:
                rank_zero_info(f"pretrained UNet {pretrained} has sample_size {loaded}; using it instead of resolution={resolution}")
            self.resolution = int(loaded) if isinstance(loaded, int) else resolution
        else:
            self.unet = build_unet(resolution, in_channels, block_out_channels, layers_per_block,
                                   down_block_types, up_block_types, attention_head_dim,
                                   norm_num_groups, dropout)
            self.resolution = resolution
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
            beta_start=beta_start, beta_end=beta_end, prediction_type=prediction_type,
        )
        self.ema = make_ema(self.unet.parameters(), decay=ema_decay, power=ema_power)
        self._predict_path: Path | None = None
        self._run_seed: int | None = None  # seed of the training noise draws (lit.resume.run_seed at first use)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """MSE between the UNet's prediction and its target for random timesteps.

        The noise, the timesteps (and dropout) come from torch's generators re-seeded for this
        batch by ``(run seed, rank, index of the batch in the fit)`` and restored afterwards: a run resumed
        from a checkpoint draws what the uninterrupted run drew, whatever ran in between.
        """
        clean = batch["image"] * 2.0 - 1.0  # [0, 1] -> [-1, 1]
        with seeded_rng(self._step_seed(batch_idx), clean.device):
            noise = torch.randn_like(clean)
            steps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps,
                                  (clean.shape[0],), device=clean.device, dtype=torch.long)
            noisy = self.noise_scheduler.add_noise(clean, noise, steps)
            prediction = self.unet(noisy, steps, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), training_target(self.noise_scheduler, clean, noise, steps).float())
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=clean.shape[0])
        return loss

    def _step_seed(self, batch_idx: int) -> int:
        """Seed of one training batch: the run seed (kept in checkpoints), the rank, and the
        batch's index among all batches of the fit (``batch_idx`` outside a trainer)."""
        if self._run_seed is None:
            self._run_seed = run_seed()
        trainer = self._trainer
        return derive_seed(self._run_seed, trainer.global_rank if trainer is not None else 0,
                           fit_batch_position(trainer, batch_idx))

    def configure_optimizers(self) -> Any:
        """AdamW with linear warmup (LinearLR), then constant or cosine (SequentialLR)."""
        hp = self.hparams
        total = int(self.trainer.estimated_stepping_batches) if hp.lr_schedule == "cosine" else None
        return adamw_with_warmup(self.unet.parameters(), learning_rate=hp.learning_rate, adam_betas=hp.adam_betas,
                                 weight_decay=hp.weight_decay, warmup_steps=hp.warmup_steps,
                                 lr_schedule=hp.lr_schedule, total_steps=total)

    def on_fit_start(self) -> None:
        self.ema.to(self.device)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Step the optimizer, then the EMA (once per optimizer step, also under accumulation),
        so callbacks at ``on_train_batch_end`` already see the updated EMA weights."""
        super().optimizer_step(*args, **kwargs)
        self.ema.step(self.unet.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ema"] = self.ema.state_dict()
        checkpoint["ddpm_run_seed"] = self._run_seed

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the EMA and the run seed of the noise draws; a checkpoint written at an
        epoch's end resumes at the next epoch's first batch (``lit.resume.close_finished_epoch``)."""
        if "ema" not in checkpoint:
            raise ValueError("checkpoint has no 'ema' entry: it was not written by DDPMModule")
        self.ema.load_state_dict(checkpoint["ema"])
        if checkpoint.get("ddpm_run_seed") is not None:
            self._run_seed = int(checkpoint["ddpm_run_seed"])
        close_finished_epoch(checkpoint)

    # ------------------------------------------------------------------ sampling
    @contextlib.contextmanager
    def ema_weights(self, enabled: bool = True) -> Iterator[None]:
        """Temporarily swap the EMA weights into the UNet (and eval mode); restore on exit."""
        was_training = self.unet.training
        self.unet.eval()
        if enabled:
            self.ema.to(self.device)
            self.ema.store(self.unet.parameters())
            self.ema.copy_to(self.unet.parameters())
        try:
            yield
        finally:
            if enabled:
                self.ema.restore(self.unet.parameters())
            self.unet.train(was_training)

    def sampling_scheduler(self, sampler: Sampler | None = None) -> DDPMScheduler | DDIMScheduler:
        """A fresh sampler sharing the training noise schedule (set_timesteps mutates it)."""
        kind = sampler or self.hparams.sampler
        if kind == "ddpm":
            return DDPMScheduler.from_config(self.noise_scheduler.config)
        if kind == "ddim":
            return DDIMScheduler.from_config(self.noise_scheduler.config)
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {kind!r}")

    @torch.no_grad()
    def sample(
        self,
        seeds: Sequence[int],
        steps: int | None = None,
        sampler: Sampler | None = None,
        use_ema: bool = True,
        batch_size: int | None = None,
    ) -> Tensor:
        """Generate one image per seed: (len(seeds), C, H, W) float32 in [0, 1], on the CPU.

        Image ``i`` depends only on ``seeds[i]`` (one CPU generator per seed draws its
        initial and per-step noise), not on the batch it shares or the rank drawing it.
        """
        seeds = [as_seed(s) for s in seeds]
        steps = self.hparams.sample_steps if steps is None else steps
        check_positive(steps=steps)
        batch_size = batch_size or self.hparams.sample_batch_size
        channels = self.unet.config.in_channels
        chunks: list[Tensor] = []
        with self.ema_weights(use_ema):
            for start in range(0, len(seeds), batch_size):
                chunk = seeds[start:start + batch_size]
                generators = [torch.Generator().manual_seed(s) for s in chunk]
                scheduler = self.sampling_scheduler(sampler)
                scheduler.set_timesteps(steps, device=self.device)
                x = randn_tensor((len(chunk), channels, self.resolution, self.resolution),
                                 generator=generators, device=self.device, dtype=self.unet.dtype)
                x = x * scheduler.init_noise_sigma
                for t in scheduler.timesteps:
                    prediction = self.unet(x, t, return_dict=False)[0]
                    x = scheduler.step(prediction, t, x, generator=generators, return_dict=False)[0]
                chunks.append((x.float() / 2 + 0.5).clamp(0, 1).cpu())
        if not chunks:
            return torch.empty(0, channels, self.resolution, self.resolution)
        return torch.cat(chunks)

    # ------------------------------------------------------------------ predict
    def on_predict_start(self) -> None:
        folder = self.hparams.predict_dir or os.path.join(self.trainer.log_dir or ".", "generations")
        self._predict_path = Path(folder)
        self._predict_path.mkdir(parents=True, exist_ok=True)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> list[str]:
        """Sample the batch's seeds and write ``seed_<n>.png``; returns the paths."""
        if "seed" not in batch:
            raise ValueError("predict batches must carry 'seed' (use datamodules.images.GenerationSeeds)")
        seeds = [int(s) for s in batch["seed"]]
        images = self.sample(seeds)
        folder = self._predict_path or Path(".")
        return [str(save_png(image, folder / f"seed_{seed}.png")) for seed, image in zip(seeds, images)]

    def on_predict_end(self) -> None:
        rank_zero_info(f"generated images written to {self._predict_path}")


def build_unet(
    resolution: int,
    in_channels: int,
    block_out_channels: Sequence[int],
    layers_per_block: int,
    down_block_types: Sequence[str],
    up_block_types: Sequence[str],
    attention_head_dim: int,
    norm_num_groups: int,
    dropout: float = 0.0,
) -> UNet2DModel:
    """A diffusers ``UNet2DModel`` after one-line checks of the block layout."""
    check_unet_layout(resolution, block_out_channels, down_block_types, up_block_types, norm_num_groups)
    return UNet2DModel(
        sample_size=resolution, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
        down_block_types=tuple(down_block_types), up_block_types=tuple(up_block_types),
        attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups, dropout=dropout,
    )


def unet_folder(path: str | Path) -> Path:
    """The UNet folder of a diffusers model folder or pipeline folder (``unet/``)."""
    path = Path(path)
    if (path / "unet" / "config.json").is_file() and not (path / "config.json").is_file():
        return path / "unet"
    return path


def load_pretrained_unet(path: str | Path) -> UNet2DModel:
    """Load a local diffusers ``UNet2DModel`` folder (or a pipeline folder with ``unet/``); no downloads."""
    folder = unet_folder(path)
    expected = "a diffusers UNet2DModel folder with config.json and diffusion_pytorch_model.safetensors (or .bin)"
    if not folder.is_dir():
        raise ValueError(f"pretrained UNet folder not found: {path} (expected {expected})")
    if not (folder / "config.json").is_file() or not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise ValueError(f"pretrained UNet folder {folder} is incomplete (expected {expected})")
    try:
        return UNet2DModel.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as error:  # noqa: BLE001 - any failure becomes one line naming the folder
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load pretrained UNet from {folder} (expected {expected}): {first}") from error
