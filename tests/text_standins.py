"""Shared pieces of the text-diffusion tests: a tiny module configuration, small captioned data
(:class:`datamodules.captioned.CaptionedImageDataModule` on procedural scenes), and a callback that
records what a fit did, for comparing runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from datamodules.captioned import CaptionedImageDataModule

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star")


def caption_of(row: int) -> str:
    """A caption for row ``row`` of a hand-made batch: unique for the first 32 rows."""
    return f"a {COLOURS[row % len(COLOURS)]} {SHAPES[(row // len(COLOURS)) % len(SHAPES)]} on a plain background"


def scenes(count: int = 6, batch_size: int = 2, **options: Any) -> CaptionedImageDataModule:
    """``count`` procedural captioned scenes at 16 px; by default a third of them drawn twice as often."""
    return CaptionedImageDataModule(**{"procedural": count, "resolution": 16, "batch_size": batch_size,
                                       "dup_fraction": 1 / 3, "dup_weight": 2.0, **options})


#: A tiny from-scratch TextDiffusionModule (16 px, two levels, a 32-wide text encoder).
TINY_TEXT: dict[str, Any] = dict(
    image_size=16, block_out_channels=[16, 32], layers_per_block=1, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=4, norm_num_groups=8, cross_attention_dim=32,
    max_caption_tokens=16, tokenizer_vocab_size=300, warmup_steps=0, learning_rate=1e-3, sample_steps=3,
    guidance_scale=3.0,
)


class TrainingRecord(pl.Callback):
    """Writes ``<folder>/rank<r>.json`` (each step's loss on this rank) and ``<folder>/start.pt``
    (the UNet's weights before the first step, rank 0) for tests that compare runs."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.losses: list[tuple[int, float]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            torch.save({k: v.detach().clone() for k, v in pl_module.unet.state_dict().items()}, self.folder / "start.pt")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append((trainer.global_step, float(outputs["loss"])))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.losses))
