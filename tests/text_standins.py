"""A tiny captioned-image datamodule for the text-diffusion tests (until datamodules/captioned.py lands).

It yields the captioned batch contract, ``{"image", "caption", "key", "index", "duplicated"}``, from
:class:`datamodules.images.ProceduralTrainData` (so it shards, shuffles and resumes as the DDPM data
does), with one caption per scene made of colour and shape words, and exposes ``caption_words()``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from datamodules.images import ProceduralTrainData, TrainingImages

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle", "star")


def caption_of(row: int) -> str:
    """The caption of scene ``row``: unique for the first 32 rows."""
    return f"a {COLOURS[row % len(COLOURS)]} {SHAPES[(row // len(COLOURS)) % len(SHAPES)]} on a plain background"


class CaptionedImages(Dataset):
    """Adds caption, key and duplicated flag to the items of a :class:`TrainingImages`."""

    def __init__(self, images: TrainingImages, duplicated: frozenset[int]) -> None:
        self.images = images
        self.duplicated = duplicated

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Any) -> dict[str, Any]:
        item = self.images[key]
        row = int(item["index"])
        return {**item, "caption": caption_of(row), "key": f"scene{row:03d}", "duplicated": row in self.duplicated}


class CaptionedStandIn(ProceduralTrainData):
    """Procedural scenes with captions; ``duplicated`` only flags rows (no weighting).

    Args:
        duplicated: rows flagged as duplicated in the batches.
        **kwargs: see :class:`datamodules.images.ProceduralTrainData`.
    """

    def __init__(self, num_images: int = 8, resolution: int = 16, batch_size: int = 2, random_flip: bool = True,
                 duplicated: list[int] = [],  # noqa: B006 - LightningCLI shows list defaults
                 seed: int = 0) -> None:
        super().__init__(num_images=num_images, seed=seed, resolution=resolution, random_flip=random_flip,
                         random_crop=False, batch_size=batch_size)
        self.flagged = frozenset(duplicated)

    def caption_words(self) -> list[str]:
        return sorted({word for row in range(len(self.scenes)) for word in caption_of(row).split()})

    def train_dataset(self) -> CaptionedImages:  # type: ignore[override]
        return CaptionedImages(super().train_dataset(), self.flagged)


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
