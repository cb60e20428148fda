"""Deterministic procedural scenes: the suite's embedded default data.

Nothing may be downloaded at run time, so tests, demos and default configs draw
their images from here. A scene is a textured background (linear or radial
gradient, stripes, checkerboard or smooth noise) with a few textured objects
(disc, ellipse, rectangle, triangle, polygon, star, ring) painted on top of each
other, plus an instance mask (0 = background, 1..N = visible objects, topmost
wins where they overlap).

Determinism: all scene parameters are drawn first from a ``torch.Generator``
seeded with the scene seed, in normalised [0, 1] image coordinates, and only
then rendered on a pixel grid with plain torch ops. So the same seed gives the
same pixels (bitwise) on every run, and the same scene at every resolution
(objects scale with ``size``). Pixels are quantised to 8-bit levels like a
decoded photo.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lit.seeding import SeededDraws, derive_seed

BACKGROUNDS: tuple[str, ...] = ("gradient", "radial", "stripes", "checkerboard", "noise")
SHAPES: tuple[str, ...] = ("disc", "ellipse", "rectangle", "triangle", "polygon", "star", "ring")
TEXTURES: tuple[str, ...] = ("solid", "stripes", "gradient", "checker", "dots")

_GRAIN = 0.015  # amplitude of the per-pixel film grain, in [0, 1] units


@dataclass(frozen=True)
class Scene:
    """A rendered scene with the parameters it was drawn from.

    ``image`` (3, S, S) float32 in [0, 1]; ``mask`` (S, S) int64, 0 = background and 1..M the
    visible objects; ``background`` its spec; ``objects[k]`` the spec of mask id ``k + 1`` (the
    visible objects in painting order: one hidden by later ones or too small for the grid is left
    out); ``areas[k]`` the share of the image's pixels that object covers where visible.
    """

    image: Tensor
    mask: Tensor
    background: BackgroundSpec
    objects: tuple[ObjectSpec, ...]
    areas: tuple[float, ...]


def render_scene(
    seed: int, size: int = 64, num_objects: tuple[int, int] = (2, 5)
) -> tuple[Tensor, Tensor]:
    """Render scene ``seed`` at ``size`` x ``size`` pixels.

    Returns ``(image, mask)``: image (3, size, size) float32 in [0, 1], mask
    (size, size) int64 with 0 = background and 1..N the visible objects in
    painting order (an object hidden by later ones or too small for the grid
    gets no id). ``num_objects`` is an inclusive range ``(low, high)``.
    """
    scene = draw_scene(seed, size, num_objects)
    return scene.image, scene.mask


def draw_scene(seed: int, size: int = 64, num_objects: tuple[int, int] = (2, 5)) -> Scene:
    """:func:`render_scene` with the scene's parameters (what its captions are made from)."""
    _check_args(seed, size, num_objects)
    draw = SeededDraws(seed)
    background = BackgroundSpec.sample(draw)
    objects = [ObjectSpec.sample(draw) for _ in range(draw.integer(*num_objects))]

    x, y = _grid(size)
    image = background.render(x, y, size)
    mask = torch.zeros(size, size, dtype=torch.int64)
    for number, spec in enumerate(objects, start=1):
        inside, texture = spec.render(x, y)
        image = torch.where(inside, texture, image)
        mask[inside] = number

    grain = torch.randn(3, size, size, generator=draw.generator) * _GRAIN  # drawn last: params stay size-free
    image = ((image + grain).clamp(0.0, 1.0) * 255.0).round() / 255.0
    counts = torch.bincount(mask.flatten(), minlength=len(objects) + 1)
    visible = [k for k in range(len(objects)) if counts[k + 1] > 0]
    return Scene(image, _relabel(mask, len(objects)), background, tuple(objects[k] for k in visible),
                 tuple(float(counts[k + 1]) / (size * size) for k in visible))


class ProceduralScenes(Dataset):
    """``count`` procedural scenes; item ``i`` is scene ``derive_seed(seed, i)``.

    Items are ``{"image": (3,S,S) float, "mask": (S,S) int64, "index": i,
    "path": "procedural://{seed}/{i}"}``, rendered lazily, so every DDP rank and
    dataloader worker produces identical pixels for the same index.
    """

    def __init__(
        self, count: int, size: int = 64, seed: int = 0, num_objects: tuple[int, int] = (2, 5)
    ) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        _check_args(seed, size, num_objects)
        self.count = count
        self.size = size
        self.seed = seed
        self.num_objects = (int(num_objects[0]), int(num_objects[1]))

    def __len__(self) -> int:
        return self.count

    def scene_seed(self, index: int) -> int:
        """The render seed of item ``index``."""
        return derive_seed(self.seed, index)

    def path(self, index: int) -> str:
        """The pseudo-path that names item ``index`` in reports."""
        return f"procedural://{self.seed}/{index}"

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = _check_index(index, self.count)
        image, mask = render_scene(self.scene_seed(index), self.size, self.num_objects)
        return {"image": image, "mask": mask, "index": index, "path": self.path(index)}


def _check_args(seed: int, size: int, num_objects: Sequence[int]) -> None:
    """One-line errors for bad scene arguments."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if len(num_objects) != 2 or not 0 <= num_objects[0] <= num_objects[1]:
        raise ValueError(f"num_objects must be (low, high) with 0 <= low <= high, got {num_objects!r}")


def _check_index(index: int, count: int) -> int:
    """Normalise a (possibly negative) dataset index, raising IndexError when out of range."""
    index = int(index)
    if index < 0:
        index += count
    if not 0 <= index < count:
        raise IndexError(f"index {index} out of range for {count} items")
    return index


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [0, 1]: ``x`` along width, ``y`` along height."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    return x, y


def _mix(first: Tensor, second: Tensor, t: Tensor) -> Tensor:
    """Blend two (3,) colours with weights ``t`` (H, W) -> (3, H, W)."""
    return first[:, None, None] * (1.0 - t) + second[:, None, None] * t


def _rotate(x: Tensor, y: Tensor, angle: float) -> tuple[Tensor, Tensor]:
    """Coordinates (x, y) expressed in axes rotated by ``angle``."""
    cos, sin = math.cos(angle), math.sin(angle)
    return x * cos + y * sin, -x * sin + y * cos


@dataclass(frozen=True)
class BackgroundSpec:
    """The parameters of a scene's background (coordinates and colours in [0, 1])."""

    kind: str
    first: Tensor
    second: Tensor
    angle: float
    frequency: float
    phase: float
    centre: tuple[float, float]
    noise: Tensor  # (3, k, k) control points for the "noise" kind

    @staticmethod
    def sample(draw: SeededDraws) -> BackgroundSpec:
        kind = draw.choice(BACKGROUNDS)
        cells = draw.integer(3, 6)
        return BackgroundSpec(
            kind=kind,
            first=draw.colour(),
            second=draw.colour(),
            angle=draw.uniform(0.0, math.pi),
            frequency=draw.uniform(3.0, 10.0),
            phase=draw.uniform(0.0, 2 * math.pi),
            centre=(draw.uniform(0.2, 0.8), draw.uniform(0.2, 0.8)),
            noise=draw.tensor(3, cells, cells),
        )

    def render(self, x: Tensor, y: Tensor, size: int) -> Tensor:
        u, v = _rotate(x - 0.5, y - 0.5, self.angle)
        if self.kind == "gradient":
            reach = abs(math.cos(self.angle)) + abs(math.sin(self.angle))
            return _mix(self.first, self.second, (u / reach + 0.5).clamp(0.0, 1.0))
        if self.kind == "radial":
            distance = torch.hypot(x - self.centre[0], y - self.centre[1])
            return _mix(self.first, self.second, (distance / 0.8).clamp(0.0, 1.0))
        if self.kind == "stripes":
            return _mix(self.first, self.second, 0.5 + 0.5 * torch.sin(2 * math.pi * self.frequency * u + self.phase))
        if self.kind == "checkerboard":
            cells = self.frequency / 2
            parity = (torch.floor(u * cells) + torch.floor(v * cells)).remainder(2.0)
            return _mix(self.first, self.second, parity)
        smooth = F.interpolate(self.noise[None], size=(size, size), mode="bicubic", align_corners=False)
        return smooth[0].clamp(0.0, 1.0)


@dataclass(frozen=True)
class ObjectSpec:
    """The parameters of one object of a scene (coordinates in [0, 1] of the image side)."""

    shape: str
    centre: tuple[float, float]
    radius: float
    angle: float
    aspect: float  # minor / major axis of ellipses and rectangles
    inner: float  # inner / outer radius of rings and stars
    corners: int  # sides of polygons, points of stars
    texture: str
    first: Tensor
    second: Tensor
    frequency: float  # texture periods per radius

    @staticmethod
    def sample(draw: SeededDraws) -> ObjectSpec:
        return ObjectSpec(
            shape=draw.choice(SHAPES),
            centre=(draw.uniform(0.15, 0.85), draw.uniform(0.15, 0.85)),
            radius=draw.uniform(0.1, 0.25),
            angle=draw.uniform(0.0, 2 * math.pi),
            aspect=draw.uniform(0.4, 0.8),
            inner=draw.uniform(0.4, 0.65),
            corners=draw.integer(5, 8),
            texture=draw.choice(TEXTURES),
            first=draw.colour(),
            second=draw.colour(),
            frequency=draw.uniform(1.5, 4.0),
        )

    def render(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(inside (H, W) bool, texture (3, H, W)) in the object's rotated frame."""
        u, v = _rotate(x - self.centre[0], y - self.centre[1], self.angle)
        u, v = u / self.radius, v / self.radius  # unit radius from here on
        return self._inside(u, v), self._texture(u, v)

    def _inside(self, u: Tensor, v: Tensor) -> Tensor:
        rho = torch.hypot(u, v)
        if self.shape == "disc":
            return rho <= 1.0
        if self.shape == "ellipse":
            return u.square() + (v / self.aspect).square() <= 1.0
        if self.shape == "rectangle":
            return (u.abs() <= 1.0) & (v.abs() <= self.aspect)
        if self.shape in ("triangle", "polygon"):
            sides = 3 if self.shape == "triangle" else self.corners
            apothem = math.cos(math.pi / sides)
            inside = torch.ones_like(u, dtype=torch.bool)
            for k in range(sides):
                normal = 2 * math.pi * k / sides
                inside &= u * math.cos(normal) + v * math.sin(normal) <= apothem
            return inside
        if self.shape == "star":
            return self._inside_star(u, v, rho)
        return (rho <= 1.0) & (rho >= self.inner)  # ring

    def _inside_star(self, u: Tensor, v: Tensor, rho: Tensor) -> Tensor:
        """Star with ``corners`` points: fold the angle onto the half-sector between an
        outer vertex (1, 0) and the next inner vertex, then test against that edge."""
        half = math.pi / self.corners
        folded = (torch.atan2(v, u) + half).remainder(2 * half) - half
        t = folded.abs()
        edge_x = self.inner * math.cos(half) - 1.0
        edge_y = self.inner * math.sin(half)
        return rho * (edge_y * torch.cos(t) - edge_x * torch.sin(t)) <= edge_y

    def _texture(self, u: Tensor, v: Tensor) -> Tensor:
        if self.texture == "solid":
            return self.first[:, None, None].expand(3, *u.shape)
        if self.texture == "stripes":
            return _mix(self.first, self.second, 0.5 + 0.5 * torch.sin(2 * math.pi * self.frequency * u))
        if self.texture == "gradient":
            return _mix(self.first, self.second, ((u + 1.0) / 2.0).clamp(0.0, 1.0))
        if self.texture == "checker":
            parity = (torch.floor(u * self.frequency) + torch.floor(v * self.frequency)).remainder(2.0)
            return _mix(self.first, self.second, parity)
        fu = (u * self.frequency).remainder(1.0) - 0.5
        fv = (v * self.frequency).remainder(1.0) - 0.5
        return _mix(self.first, self.second, (fu.square() + fv.square() < 0.09).float())  # dots


def _relabel(mask: Tensor, count: int) -> Tensor:
    """Renumber the visible object ids to 1..M in painting order (0 stays background)."""
    present = torch.zeros(count + 1, dtype=torch.bool)
    present[mask.flatten()] = True
    present[0] = False
    lookup = torch.zeros(count + 1, dtype=torch.int64)
    lookup[present] = torch.arange(1, int(present.sum()) + 1)
    return lookup[mask]


__all__ = ["BACKGROUNDS", "SHAPES", "TEXTURES", "BackgroundSpec", "ObjectSpec", "ProceduralScenes", "Scene",
           "draw_scene", "render_scene"]
