"""Seeded draws of the synthetic builders: each helper takes an explicit ``torch.Generator``
and makes a fixed number of draws, so an item's pixels depend only on its own generator
(:meth:`datamodules.synthetic.builder.SyntheticBuilder.generator`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def uniform(generator: torch.Generator, low: float, high: float) -> float:
    """One float in [low, high) from ``generator`` (always exactly one draw)."""
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def randint(generator: torch.Generator, high: int) -> int:
    """One int in [0, high) from ``generator`` (always exactly one draw)."""
    return int(torch.randint(high, (), generator=generator))


def random_square(shape: tuple[int, int], side: int, generator: torch.Generator) -> tuple[int, int]:
    """Top-left (y, x) of a random ``side`` x ``side`` window inside ``shape`` (two draws)."""
    height, width = shape
    if side > min(height, width):
        raise ValueError(f"a {side} px square does not fit in {height}x{width}")
    return randint(generator, height - side + 1), randint(generator, width - side + 1)


def random_square_resized(image: Tensor, size: int, generator: torch.Generator) -> tuple[Tensor, list[int]]:
    """The largest square at a random place in (C, H, W) ``image``, resized to ``size``
    (antialiased bilinear; two draws). Returns it and its [x0, y0, x1, y1] box in ``image``
    pixels. Equivalent to resizing the shorter side to ``size`` and cropping, but only the
    square is resampled."""
    side = min(image.shape[-2:])
    y0, x0 = random_square(tuple(image.shape[-2:]), side, generator)
    square = image[:, y0:y0 + side, x0:x0 + side]
    if side != size:
        square = F.interpolate(square[None], size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)[0].clamp(0, 1)
    return square, [x0, y0, x0 + side, y0 + side]


__all__ = ["randint", "random_square", "random_square_resized", "uniform"]
