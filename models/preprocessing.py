"""Descriptor preprocessing: float images in [0, 1] -> resized, centre-cropped, normalised crops.

:class:`Preprocessing` is what a descriptor's input needs (resize the short side to
``floor(input_size / crop_pct)``, centre-crop ``input_size``, mean/std); the pure
functions :func:`resize_short_side` and :func:`center_crop` do it on tensors (also in
data-loader workers, see :mod:`datamodules.extraction_inputs`), and
:func:`check_images` validates what a caller passes in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, OPENAI_CLIP_MEAN
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["INCEPTION_MEAN", "INCEPTION_STD", "RGB", "Interpolation", "Preprocessing", "center_crop", "check_images",
           "resize_short_side"]

Interpolation = Literal["bilinear", "bicubic"]
_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
RGB = tuple[float, float, float]

INCEPTION_MEAN: RGB = (0.5, 0.5, 0.5)
INCEPTION_STD: RGB = (0.5, 0.5, 0.5)
_MEAN_NAMES = {tuple(IMAGENET_DEFAULT_MEAN): "ImageNet", tuple(OPENAI_CLIP_MEAN): "CLIP", INCEPTION_MEAN: "0.5",
               (0.0, 0.0, 0.0): "none"}
# values outside [0 - tol, 1 + tol] mean the caller passed 0..255 or already-normalised images
_RANGE_TOLERANCE = 0.01


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to ``floor(input_size / crop_pct)``, centre-crop ``input_size``, normalise."""

    input_size: int
    crop_pct: float
    interpolation: Interpolation
    mean: RGB
    std: RGB

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.input_size / self.crop_pct))

    def describe(self) -> str:
        mean = _MEAN_NAMES.get(tuple(self.mean), str(self.mean))
        return f"resize {self.resize_size} {self.interpolation}, crop {self.input_size}, mean/std {mean}"


def resize_short_side(images: Tensor, size: int, interpolation: Interpolation = "bilinear") -> Tensor:
    """Resize (B, C, H, W) so the short side is ``size``: torchvision's antialiased ``resize``;
    bicubic overshoot is clamped to [0, 1] as PIL does for 8-bit images. Returns the input
    when nothing changes."""
    resized = TF.resize(images, [size], interpolation=_INTERPOLATION[interpolation], antialias=True)
    return resized.clamp(0.0, 1.0) if interpolation == "bicubic" and resized is not images else resized


def center_crop(images: Tensor, size: int) -> Tensor:
    """Central ``size`` x ``size`` crop of (B, C, H, W) (torchvision's), refusing to pad a smaller image."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from a {height}x{width} image")
    return TF.center_crop(images, [size, size])


def check_images(images: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """Validate the input and return it as a list of (B_i, 3, H_i, W_i) groups."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        groups = [images]
    elif isinstance(images, Sequence) and not isinstance(images, (str, bytes)):
        if len(images) == 0:
            raise ValueError("expected at least one image, got an empty list")
        groups = []
        for i, image in enumerate(images):
            if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
                shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
                raise ValueError(f"image {i}: expected a (3, H, W) tensor, got {shape}")
            groups.append(image.unsqueeze(0))
    else:
        raise TypeError(f"expected a (B, 3, H, W) tensor or a list of (3, H, W) tensors, got {type(images).__name__}")
    for group in groups:
        if not torch.is_floating_point(group):
            raise TypeError(f"images must be floating point in [0, 1], got dtype {group.dtype}")
        if group.numel():
            low, high = torch.aminmax(group)
            if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
                raise ValueError(f"images must be in [0, 1], got values in [{low.item():.3g}, {high.item():.3g}]")
    return groups

