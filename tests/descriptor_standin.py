"""A tiny LightningModule with the descriptor contract of ``models.mocov3.MoCoV3Module`` (tests only).

``descriptor``: a :class:`models.descriptor.Descriptor` wrapping the timm ViT being
trained; ``descriptor_arch``: its timm name and kwargs, preprocessing and output
kind. The loss is trivial (a view and its mirror pulled together); dropout makes
train and eval mode differ, so a check that forgot eval mode would show.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from models.descriptor import Descriptor
from models.preprocessing import Preprocessing

ARCH = "vit_tiny_patch16_224"


class StandInDescriptorModule(pl.LightningModule):
    """Tiny timm ViT trained on a trivial loss, exposing ``descriptor`` and ``descriptor_arch``."""

    def __init__(self, img_size: int = 32, patch_size: int = 8, embed_dim: int = 32, depth: int = 1,
                 num_heads: int = 2, drop_rate: float = 0.3, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = timm.create_model(ARCH, pretrained=False, **self.timm_kwargs())
        self.preprocessing = Preprocessing(img_size, 0.875, "bicubic", tuple(IMAGENET_DEFAULT_MEAN),
                                           tuple(IMAGENET_DEFAULT_STD))

    def timm_kwargs(self) -> dict[str, Any]:
        hp = self.hparams
        return {"img_size": hp.img_size, "patch_size": hp.patch_size, "embed_dim": hp.embed_dim,
                "depth": hp.depth, "num_heads": hp.num_heads, "num_classes": 0, "drop_rate": hp.drop_rate}

    @property
    def descriptor_arch(self) -> dict[str, Any]:
        pre = self.preprocessing
        return {"arch": ARCH, "timm_kwargs": self.timm_kwargs(), "input_size": pre.input_size,
                "crop_pct": pre.crop_pct, "interpolation": pre.interpolation, "mean": list(pre.mean),
                "std": list(pre.std), "output": "global"}

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor("standin", self.backbone, "global", self.preprocessing).to(self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = batch["image"]
        descriptor = self.descriptor
        a = descriptor.backbone(descriptor.preprocess(images))
        b = descriptor.backbone(descriptor.preprocess(torch.flip(images, dims=[-1])))
        loss = 1.0 - F.cosine_similarity(a, b).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
