"""Pooling heads that turn a CNN feature map into one descriptor per image.

SSCD and MultiGrain pool ResNet-50 features with generalised-mean (GeM)
pooling, VICRegL with plain average pooling; :class:`PooledTrunk` wraps a timm
ResNet trunk with one of them (and SSCD's linear projection) so the registry
can build every ResNet descriptor the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def gem(x: Tensor, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised-mean pooling of a (B, C, H, W) map to (B, C).

    ``(mean_hw clamp(x, eps)^p)^(1/p)``, as in SSCD and MultiGrain: p=1 is
    average pooling, p -> inf approaches max pooling.
    """
    if x.ndim != 4:
        raise ValueError(f"gem expects a (B, C, H, W) map, got shape {tuple(x.shape)}")
    if p <= 0:
        raise ValueError(f"gem exponent p must be positive, got {p}")
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class GeM(nn.Module):
    """Fixed-exponent GeM pooling (see :func:`gem`)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = float(p)
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"


class AvgPool(nn.Module):
    """Global average pooling of a (B, C, H, W) map to (B, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


class PooledTrunk(nn.Module):
    """CNN trunk -> global pooling -> optional linear projection, giving (B, D).

    ``trunk`` must map images to a (B, C, H, W) feature map (a timm ResNet
    built with ``num_classes=0, global_pool=''``). Checkpoints are loaded into
    ``trunk`` (and ``projection``) separately, so its keys stay timm's.
    """

    def __init__(self, trunk: nn.Module, pool: nn.Module, projection: nn.Module | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        self.pool = pool
        self.projection = projection if projection is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.pool(self.trunk(x)))


class PixelEmbedding(nn.Module):
    """Raw-pixel baseline: flatten each image and subtract its own mean.

    The descriptor L2-normalises the result, so two images score 1 exactly when
    one is a positive affine brightness change (a*x + b, a > 0) of the other.
    """

    def forward(self, x: Tensor) -> Tensor:
        flat = torch.flatten(x, start_dim=1)
        return flat - flat.mean(dim=1, keepdim=True)
