"""Batch augmentations on the training device for MoCo v3: the two asymmetric views and CutMix.

:class:`TwoViews` applies the MoCo v3 / BYOL view recipes with kornia to a whole
(B, 3, H, W) batch in [0, 1] on the batch's device (GPU when training there): random
resized crop, horizontal flip, colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur
(p 1.0 / 0.1) and solarisation (p 0 / 0.2) -- view 1 and view 2 differ only in blur and
solarisation, as in the official ``main_moco.py``.

Every random draw of a step happens under :func:`seeded`, which forks the global RNG
(CPU and the batch's CUDA device), seeds it with one integer and restores it after, so
the views depend only on that seed: a run repeats exactly, and the augmentations do not
disturb (nor depend on) any other random stream.

CutMix (:func:`cutmix_views`): one box per batch, CutMix-style (area fraction
``1 - Beta(alpha, alpha)``, clipped at the border). The mixed view of image ``i`` is image
``perm[i]`` with the box cut from image ``i`` pasted in at the same place. The *copy*
form keeps image ``i`` as the positive (the pasted region's source); the *mix* form splits
the contrastive target between ``i`` (weight = box area fraction) and ``perm[i]``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit.seeding import derive_seed


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with the global torch RNG (CPU, and ``device`` if CUDA) seeded with ``seed``,
    restoring the previous RNG state afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A distinct 63-bit seed per (seed, training step, rank), stable across runs and machines."""
    return derive_seed("mocov3-augment", seed, step, rank)


def _odd(value: float) -> int:
    return max(3, 2 * int(value / 2) + 1)


class TwoViews(nn.Module):
    """The two MoCo v3 views of a batch, on its device. Output in [0, 1], size ``size``.

    Args:
        size: side of the output crops.
        min_scale: smallest crop area fraction of the random resized crop (0.08 in MoCo v3).
        blur_sigma: Gaussian blur sigma range at 224 px (0.1-2.0); scaled with ``size``.
    """

    def __init__(self, size: int, min_scale: float = 0.08, blur_sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        super().__init__()
        import kornia.augmentation as K

        if size < 8 or not 0.0 < min_scale <= 1.0:
            raise ValueError(f"need size >= 8 and min_scale in (0, 1], got {size}, {min_scale}")
        scale = size / 224
        sigma = (blur_sigma[0] * scale, blur_sigma[1] * scale)
        kernel = _odd(0.1 * size)  # torchvision's recipe: kernel ~ 10% of the side (23 at 224)

        def view(blur_p: float, solarize_p: float) -> nn.Module:
            steps: list[nn.Module] = [
                K.RandomResizedCrop((size, size), scale=(min_scale, 1.0), resample="bicubic"),
                K.RandomHorizontalFlip(p=0.5),
                K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
                K.RandomGrayscale(p=0.2),
                K.RandomGaussianBlur((kernel, kernel), sigma, p=blur_p),
            ]
            if solarize_p > 0:
                steps.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p))  # threshold 0.5
            return K.AugmentationSequential(*steps)

        self.size = size
        self.view1 = view(blur_p=1.0, solarize_p=0.0)
        self.view2 = view(blur_p=0.1, solarize_p=0.2)

    def forward(self, images: Tensor, seed: int) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [0, 1] -> two (B, 3, size, size) views, a function of ``seed`` only."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got {tuple(images.shape)}")
        with seeded(seed, images.device):
            first = self.view1(images).clamp(0.0, 1.0)
            second = self.view2(images).clamp(0.0, 1.0)
        return first, second


# --------------------------------------------------------------------------- CutMix


@dataclass(frozen=True)
class CutMixBatch:
    """A CutMix'd view: ``images[i]`` = ``perm[i]``'s image with the box of image ``i`` pasted in.

    ``area`` is the box's fraction of the image (the share of source ``i``); ``box`` is
    ``(y0, y1, x0, x1)`` in pixels.
    """

    images: Tensor
    perm: Tensor
    area: float
    box: tuple[int, int, int, int]

    @property
    def inverse_perm(self) -> Tensor:
        """``inv`` with ``perm[inv[i]] == i``: the mixed image whose background is image ``i``."""
        return torch.argsort(self.perm)


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """CutMix's box for mixing ratio ``lam`` (background share): side ``sqrt(1 - lam)`` of each
    dimension around a uniform centre (global RNG), clipped to the image. ``(y0, y1, x0, x1)``."""
    ratio = math.sqrt(max(0.0, 1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (1,)).item())
    cx = int(torch.randint(width, (1,)).item())
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def paste_box(sources: Tensor, perm: Tensor, box: tuple[int, int, int, int]) -> Tensor:
    """``out[i] = sources[perm[i]]`` with ``box`` taken from ``sources[i]`` (a new tensor)."""
    y0, y1, x0, x1 = box
    out = sources[perm].clone()
    out[:, :, y0:y1, x0:x1] = sources[:, :, y0:y1, x0:x1]
    return out


def cutmix_views(images: Tensor, alpha: float, seed: int) -> CutMixBatch:
    """CutMix a view batch with one box (area ~ ``1 - Beta(alpha, alpha)``) and a random
    permutation, both drawn from ``seed``. ``area`` is the exact (clipped) box fraction."""
    if alpha <= 0:
        raise ValueError(f"cutmix alpha must be > 0, got {alpha}")
    batch, _, height, width = images.shape
    with seeded(seed):
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        box = cutmix_box(height, width, lam)
        perm = torch.randperm(batch)
    y0, y1, x0, x1 = box
    area = (y1 - y0) * (x1 - x0) / (height * width)
    return CutMixBatch(paste_box(images, perm.to(images.device), box), perm.to(images.device), area, box)
