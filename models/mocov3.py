"""MoCo v3 (Chen, Xie and He, ICCV 2021) with optional CutMix: the suite's own copy detector.

:class:`MoCoV3Module` trains a timm ViT the way the official code does
(github.com/facebookresearch/moco-v3): a query encoder (backbone + 3-layer projection
MLP with BN, the last BN without affine) followed by a 2-layer prediction MLP, a momentum
encoder (backbone + projector) updated by EMA with the cosine schedule 0.99 -> 1, the
symmetric loss ``ctr(q1, k2) + ctr(q2, k1)`` at temperature 0.2 with keys gathered over
DDP ranks (:mod:`lit.contrastive`), AdamW with linear warmup and cosine decay (stepped
per optimiser step), and optionally the frozen random patch projection
(``stop_grad_conv1``). It starts from the official checkpoint (``vit-b-300ep.pth.tar``,
``module.base_encoder.*`` keys, loaded into both encoders; its projector and predictor
too when their shapes fit) or from scratch.

Training data are un-augmented fixed-size images (any datamodule yielding
``{"image": (B, 3, S, S) in [0, 1], ...}``, e.g. ``datamodules.images.ProceduralTrainData``
with ``random_crop: false, random_flip: false``); both views are made on the device from
the whole batch (:class:`models.augment.TwoViews`), seeded per step and rank.

CutMix (``cutmix``): Somepalli et al. fine-tune MoCo v3 for 50 epochs "with CutMix as an
additional augmentation" without saying how it enters a contrastive loss. Two forms,
applied to view 1 with probability ``cutmix_prob`` per batch, one box per batch
(area ~ 1 - Beta(alpha, alpha)); the mixed view of image i is image ``perm[i]`` with a box
cut from image i pasted in; the mixed view goes through both encoders:

- ``"copy"``: the positive stays image i (the pasted region's source): the model learns
  to find an image from a piece of it pasted into another picture -- copy detection.
- ``"mix"``: the target is split by box area a (MixCo / Un-Mix):
  ``ctr(q1_mix, k2) = a * ctr(.; i) + (1 - a) * ctr(.; perm[i])`` and
  ``ctr(q2, k1_mix) = a * ctr(.; i) + (1 - a) * ctr(.; perm^-1[i])``.

The paper (Table 1) reports that its CutMix model lost mAP on Segmix and IN-Cutmix but
gained on Dif-Diagonal (59.12 -> 62.88) and Dif-Outpaint (20.61 -> 46.96).

The backbone being trained is exposed as :attr:`MoCoV3Module.descriptor` (a
:class:`models.descriptor.Descriptor`: preprocessing + the query backbone, global
L2-normalised pooled features, no projector) and its architecture as
:attr:`MoCoV3Module.descriptor_arch` (what ``lit export`` writes next to the weights).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import timm
import torch
from pytorch_lightning.utilities import rank_zero_warn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from lit.contrastive import contrastive_loss, cosine_momentum, mixed_contrastive_loss, momentum_update_
from lit.errors import UserError
from models.augment import CutMixBatch, TwoViews, cutmix_views, step_seed
from models.descriptor import Descriptor
from models.preprocessing import Preprocessing
from models.weights import (
    TimmViTState,
    WeightsError,
    WeightsFormat,
    as_state_dict,
    read_checkpoint,
    strip_prefix,
    weights_error,
)

CutMixForm = Literal["none", "copy", "mix"]

MOCOV3_FORMAT = WeightsFormat(
    "a MoCo v3 checkpoint: dict with 'state_dict' holding 'module.base_encoder.*' ViT keys "
    "(and optionally 'module.predictor.*')",
    "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar (github.com/facebookresearch/moco-v3)",
)
_ENCODER_PREFIXES = ("module.base_encoder.", "base_encoder.")
_PREDICTOR_PREFIXES = ("module.predictor.", "predictor.")


def build_mlp(num_layers: int, input_dim: int, hidden_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """The official ``_build_mlp``: Linear (no bias) + BN + ReLU between layers, and a final
    BN without affine parameters (SimCLR's design) when ``last_bn``."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim_in = input_dim if i == 0 else hidden_dim
        dim_out = output_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


def mix_labels(mixed: CutMixBatch) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Targets of the label-mixing form, for a mixed view 1 (image ``perm[i]`` + box of image ``i``):
    ``((a1, b1), (a2, b2))`` such that ``ctr(q1_mix, k2)`` puts weight ``area`` on ``a1`` and ``1 - area``
    on ``b1``, and ``ctr(q2, k1_mix)`` weight ``area`` on ``a2`` (the mixed key holding image i's box) and
    ``1 - area`` on ``b2`` (the mixed key whose background is image i)."""
    own = torch.arange(mixed.perm.shape[0], device=mixed.perm.device)
    return (own, mixed.perm), (own, mixed.inverse_perm)


class MoCoV3Module(pl.LightningModule):
    """MoCo v3 with a timm ViT, optional CutMix, and the trained backbone as a descriptor.

    Args:
        arch: timm ViT name (``vit_base_patch16_224`` for the paper, ``vit_tiny_patch16_224`` for demos).
        img_size: training / descriptor input side (the views are cropped to it).
        patch_size: override the architecture's patch size (e.g. 8 for 32 px images).
        depth: override the number of transformer blocks.
        embed_dim: override the token width.
        num_heads: override the number of attention heads.
        weights: MoCo v3 checkpoint to start from (``vit-b-300ep.pth.tar`` layout); None: from scratch.
        proj_hidden_dim: hidden width of the projector and predictor MLPs (4096 in MoCo v3).
        proj_dim: output width of the projector and predictor (256).
        temperature: contrastive temperature tau (0.2 for ViT).
        base_momentum: momentum at step 0 (0.99 for ViT), cosine-increased to 1.
        lr: AdamW peak learning rate (MoCo v3: 1.5e-4 * total batch / 256).
        weight_decay: AdamW weight decay (0.1).
        betas: AdamW betas.
        warmup_epochs: linear warmup length in epochs (may be fractional).
        min_scale: smallest random-resized-crop area fraction.
        stop_grad_conv1: freeze the (random or loaded) patch projection, MoCo v3's stability trick.
        cutmix: ``"none"``, ``"copy"`` (positive = pasted region's source) or ``"mix"`` (target split by box area).
        cutmix_prob: probability that a batch's view 1 is CutMix'd.
        cutmix_alpha: Beta(alpha, alpha) of the mixing ratio.
        augment_seed: seed of the device augmentations (views and CutMix), per step and rank.
    """

    def __init__(
        self,
        arch: str = "vit_tiny_patch16_224",
        img_size: int = 224,
        patch_size: int | None = None,
        depth: int | None = None,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        weights: str | None = None,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        temperature: float = 0.2,
        base_momentum: float = 0.99,
        lr: float = 1.5e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 10.0,
        min_scale: float = 0.08,
        stop_grad_conv1: bool = True,
        cutmix: CutMixForm = "none",
        cutmix_prob: float = 0.5,
        cutmix_alpha: float = 1.0,
        augment_seed: int = 0,
    ) -> None:
        super().__init__()
        if cutmix not in ("none", "copy", "mix"):
            raise UserError(f"cutmix must be 'none', 'copy' or 'mix', got {cutmix!r}")
        if not 0.0 <= cutmix_prob <= 1.0 or cutmix_alpha <= 0:
            raise UserError(f"need 0 <= cutmix_prob <= 1 and cutmix_alpha > 0, got {cutmix_prob}, {cutmix_alpha}")
        if not temperature > 0 or not 0.0 <= base_momentum <= 1.0:
            raise UserError(f"need temperature > 0 and base_momentum in [0, 1], got {temperature}, {base_momentum}")
        self.save_hyperparameters()
        self.backbone = self._create_backbone(init=weights is None)
        width = int(self.backbone.num_features)
        self.projector = build_mlp(3, width, proj_hidden_dim, proj_dim)
        self.predictor = build_mlp(2, proj_dim, proj_hidden_dim, proj_dim)
        if weights is not None:
            try:
                self._load_official(Path(weights).expanduser())
            except WeightsError as error:  # one line naming the file, for the CLI
                raise UserError(str(error)) from error
        self.momentum_backbone = copy.deepcopy(self.backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for param in self._momentum_params():
            param.requires_grad_(False)
        if stop_grad_conv1:
            for param in self.backbone.patch_embed.proj.parameters():
                param.requires_grad_(False)
        self.views = TwoViews(img_size, min_scale=min_scale)
        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)
        self.momentum = base_momentum

    # ----------------------------------------------------------------- construction
    def _timm_kwargs(self) -> dict[str, Any]:
        """The timm kwargs beyond the architecture's defaults (also written by ``lit export``)."""
        hp = self.hparams
        kwargs: dict[str, Any] = {"img_size": hp.img_size, "num_classes": 0, "global_pool": "token"}
        for name in ("patch_size", "depth", "embed_dim", "num_heads"):
            if hp[name] is not None:
                kwargs[name] = hp[name]
        return kwargs

    def _create_backbone(self, init: bool) -> nn.Module:
        kwargs = self._timm_kwargs()
        if not init:
            kwargs["weight_init"] = "skip"
        try:
            backbone = timm.create_model(self.hparams.arch, pretrained=False, **kwargs)
        except Exception as error:  # unknown name or kwargs the architecture does not take
            raise UserError(f"cannot build timm model {self.hparams.arch!r} with {kwargs}: {error}") from error
        if not hasattr(backbone, "patch_embed"):
            raise UserError(f"{self.hparams.arch!r} is not a ViT (no patch_embed); MoCoV3Module needs a timm ViT")
        return backbone

    def _load_official(self, path: Path) -> None:
        """Backbone from ``module.base_encoder.*`` (strict, pos_embed resampled by timm); the
        projector (``base_encoder.head.*``) and predictor when present and shaped like ours."""
        raw = as_state_dict(read_checkpoint(path, MOCOV3_FORMAT), path, MOCOV3_FORMAT, key="state_dict")
        prefix = next((p for p in _ENCODER_PREFIXES if any(k.startswith(p) for k in raw)), None)
        if prefix is None:
            raise weights_error(path, MOCOV3_FORMAT, "no keys start with 'module.base_encoder.'")
        encoder = strip_prefix(raw, prefix)
        layout = TimmViTState(prefixes=_ENCODER_PREFIXES)  # drops head.*, strict, resamples pos_embed
        layout.apply(self.backbone, encoder, path, MOCOV3_FORMAT)
        self._load_head(self.projector, strip_prefix(encoder, "head."), "projector (base_encoder.head)", path)
        prefix = next((p for p in _PREDICTOR_PREFIXES if any(k.startswith(p) for k in raw)), None)
        if prefix is not None:
            self._load_head(self.predictor, strip_prefix(raw, prefix), "predictor", path)
        else:
            rank_zero_warn(f"{path}: no predictor weights; the predictor starts from random init")

    @staticmethod
    def _load_head(head: nn.Module, state: dict[str, Tensor], what: str, path: Path) -> None:
        expected = head.state_dict()
        fits = set(state) == set(expected) and all(state[k].shape == v.shape for k, v in expected.items())
        if fits:
            head.load_state_dict(state, strict=True)
        else:
            rank_zero_warn(f"{path}: the {what} weights do not fit this module's MLP; it starts from random init")

    def _momentum_params(self) -> list[nn.Parameter]:
        return list(self.momentum_backbone.parameters()) + list(self.momentum_projector.parameters())

    def _online_params(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.projector.parameters())

    # ----------------------------------------------------------------- the descriptor contract
    @property
    def descriptor_arch(self) -> dict[str, Any]:
        """What rebuilds :attr:`descriptor` from its weights: timm name and kwargs, preprocessing, output."""
        hp = self.hparams
        return {
            "arch": hp.arch,
            "timm_kwargs": self._timm_kwargs(),
            "img_size": hp.img_size,
            "input_size": hp.img_size,
            "patch_size": int(self.backbone.patch_embed.patch_size[0]),
            "feature_dim": int(self.backbone.num_features),
            "crop_pct": 1.0,
            "interpolation": "bicubic",
            "mean": list(IMAGENET_DEFAULT_MEAN),
            "std": list(IMAGENET_DEFAULT_STD),
            "output": "global",
            "similarity": "cosine",
        }

    @property
    def descriptor(self) -> Descriptor:
        """The query backbone (shared parameters, current mode) as a Descriptor: images in [0, 1] ->
        L2-normalised pooled (CLS) features (B, D), without the projector. Built on each access
        (cheap: it wraps, never copies)."""
        arch = self.descriptor_arch
        preprocessing = Preprocessing(
            arch["input_size"], arch["crop_pct"], arch["interpolation"], tuple(arch["mean"]), tuple(arch["std"])
        )
        descriptor = Descriptor("mocov3", self.backbone, "global", preprocessing).to(self.mean.device)
        descriptor.training = self.training  # the wrapper only; the backbone keeps its own mode
        return descriptor

    # ----------------------------------------------------------------- training
    def forward(self, images: Tensor) -> Tensor:
        """L2-normalised backbone features of images already at ``img_size`` in [0, 1]."""
        return nn.functional.normalize(self.backbone((images - self.mean) / self.std), dim=-1)

    def _query(self, x: Tensor) -> Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def _key(self, x: Tensor) -> Tensor:
        return self.momentum_projector(self.momentum_backbone(x))

    def _total_steps(self) -> int:
        trainer = getattr(self, "_trainer", None)
        return int(trainer.estimated_stepping_batches) if trainer is not None else 0

    def make_views(self, images: Tensor, step: int) -> tuple[Tensor, Tensor, CutMixBatch | None]:
        """The step's two views in [0, 1] (view 1 possibly CutMix'd) and the CutMixBatch or None."""
        hp = self.hparams
        rank = self.global_rank if getattr(self, "_trainer", None) is not None else 0
        seed = step_seed(hp.augment_seed, step, rank)
        x1, x2 = self.views(images, seed)
        mixed = None
        if hp.cutmix != "none":
            draw = torch.Generator().manual_seed(seed)
            if float(torch.rand((), generator=draw)) < hp.cutmix_prob:
                mixed = cutmix_views(x1, hp.cutmix_alpha, seed + 1)
                x1 = mixed.images
        return x1, x2, mixed

    def compute_loss(self, x1: Tensor, x2: Tensor, mixed: CutMixBatch | None, momentum: float) -> Tensor:
        """Queries, momentum update (before the keys, as the official code does), keys, loss."""
        tau = self.hparams.temperature
        n1, n2 = (x1 - self.mean) / self.std, (x2 - self.mean) / self.std
        q1, q2 = self._query(n1), self._query(n2)
        momentum_update_(self._momentum_params(), self._online_params(), momentum)
        k1, k2 = self._key(n1), self._key(n2)
        if mixed is None or self.hparams.cutmix == "copy":
            return contrastive_loss(q1, k2, tau) + contrastive_loss(q2, k1, tau)
        (a1, b1), (a2, b2) = mix_labels(mixed)
        return mixed_contrastive_loss(q1, k2, a1, b1, mixed.area, tau) + mixed_contrastive_loss(
            q2, k1, a2, b2, mixed.area, tau
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        x1, x2, mixed = self.make_views(images, self.global_step)
        self.momentum = cosine_momentum(self.global_step, self._total_steps(), self.hparams.base_momentum)
        loss = self.compute_loss(x1, x2, mixed, self.momentum)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/momentum", self.momentum)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = max(1, self._total_steps())
        warmup = min(total - 1, max(0, round(hp.warmup_epochs * self._steps_per_epoch(total))))
        schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
        if warmup > 0:
            schedulers.append(torch.optim.lr_scheduler.LinearLR(optimizer, 1.0 / (warmup + 1), 1.0, total_iters=warmup))
        schedulers.append(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup)))
        scheduler = schedulers[0] if len(schedulers) == 1 else torch.optim.lr_scheduler.SequentialLR(
            optimizer, schedulers, milestones=[warmup]
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _steps_per_epoch(self, total: int) -> float:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return 0.0
        batches = trainer.num_training_batches
        if isinstance(batches, (int, float)) and math.isfinite(batches) and batches > 0:
            return batches / max(1, trainer.accumulate_grad_batches)
        return total / max(1, trainer.max_epochs or 1)
