"""Tests for the procedural scenes: determinism, variety, masks, resolution independence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datamodules.procedural import ProceduralScenes, render_scene
from lit.seeding import derive_seed


def test_same_seed_is_bitwise_identical() -> None:
    for seed in (0, 7, 123456789, -3):
        first, first_mask = render_scene(seed, size=48)
        second, second_mask = render_scene(seed, size=48)
        assert torch.equal(first, second) and torch.equal(first_mask, second_mask)


def test_global_rng_does_not_matter() -> None:
    torch.manual_seed(1)
    first, _ = render_scene(5)
    torch.manual_seed(2)
    torch.rand(10)
    second, _ = render_scene(5)
    assert torch.equal(first, second)


def test_different_seeds_look_clearly_different() -> None:
    images = [render_scene(seed, size=32)[0] for seed in range(8)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert (images[i] - images[j]).abs().mean() > 0.05, (i, j)


@pytest.mark.parametrize("size", [8, 33, 64, 128])
def test_shapes_types_and_range(size: int) -> None:
    image, mask = render_scene(11, size=size)
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert mask.shape == (size, size) and mask.dtype == torch.int64
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert torch.equal(image * 255, (image * 255).round())  # 8-bit levels, like a decoded photo


@pytest.mark.parametrize("num_objects", [(0, 0), (1, 1), (2, 5), (6, 6)])
def test_mask_ids_are_contiguous_and_bounded(num_objects: tuple[int, int]) -> None:
    for seed in range(6):
        _, mask = render_scene(seed, size=64, num_objects=num_objects)
        ids = torch.unique(mask).tolist()
        objects = [i for i in ids if i != 0]
        assert objects == list(range(1, len(objects) + 1))  # visible objects numbered 1..M
        assert len(objects) <= num_objects[1]
        if num_objects[0] >= 1:
            assert objects, "at least one object should be visible at 64 px"
        if num_objects == (0, 0):
            assert ids == [0]


def test_objects_scale_with_resolution() -> None:
    """The same scene at 32 and 128 px agrees after downsampling; other scenes do not."""
    for seed in range(4):
        small, small_mask = render_scene(seed, size=32)
        large, large_mask = render_scene(seed, size=128)
        shrunk = F.interpolate(large[None], size=(32, 32), mode="area")[0]
        same = (shrunk - small).abs().mean()
        other = (F.interpolate(render_scene(seed + 100, size=128)[0][None], size=(32, 32), mode="area")[0] - small)
        assert same < 0.06 and same < other.abs().mean() / 2
        small_fg = (small_mask > 0).float().mean()
        large_fg = (large_mask > 0).float().mean()
        assert abs(small_fg - large_fg) < 0.05  # object coverage is resolution independent


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="size"):
        render_scene(0, size=0)
    with pytest.raises(ValueError, match="num_objects"):
        render_scene(0, num_objects=(3, 2))
    with pytest.raises(TypeError, match="seed"):
        render_scene(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        ProceduralScenes(-1)


def test_derive_seed_is_stable_and_distinguishes_parts() -> None:
    seeds = {derive_seed(a, b) for a in range(5) for b in range(5)}
    assert len(seeds) == 25
    assert derive_seed(0, 1) != derive_seed(1, 0)
    assert derive_seed(3, "x") == derive_seed(3, "x")
    assert all(0 <= s < 2**63 for s in seeds)


def test_dataset_items() -> None:
    scenes = ProceduralScenes(count=5, size=24, seed=3)
    assert len(scenes) == 5
    item = scenes[2]
    assert set(item) == {"image", "mask", "index", "path"}
    assert item["index"] == 2 and item["path"] == "procedural://3/2"
    image, mask = render_scene(derive_seed(3, 2), size=24)
    assert torch.equal(item["image"], image) and torch.equal(item["mask"], mask)
    assert scenes[-1]["index"] == 4
    with pytest.raises(IndexError):
        scenes[5]
    assert not torch.equal(ProceduralScenes(5, 24, seed=4)[2]["image"], item["image"])
    assert torch.equal(ProceduralScenes(5, 24, seed=3)[2]["image"], item["image"])
    assert len(list(iter(scenes))) == 5  # the iteration protocol stops at IndexError
