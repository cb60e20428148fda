"""Tests of the descriptor registry and module (models/registry.py, descriptor.py, preprocessing.py, weights.py, pooling.py).

Every registered descriptor is built once with random weights at a tiny input
size. Weight loading is checked by writing files in each published layout from
a random model and asserting the loaded descriptor reproduces it; the large
ViT-B / Swin-B layouts use depth-reduced copies of their registry entries,
which run the same loading code on a fraction of the parameters.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor

from models.descriptor import Descriptor
from models.preprocessing import center_crop, resize_short_side
from models.registry import (
    DescriptorSpec,
    available_descriptors,
    build_descriptor,
    build_from_spec,
    get_spec,
    registry_table,
)
from models.pooling import PooledTrunk, gem
from models.weights import WeightsError

NAMES = [
    "sscd_resnet50",
    "multigrain_resnet50",
    "vit_s16_in1k",
    "vit_b16_in21k",
    "clip_vit_b16",
    "swin_b_in1k",
    "mocov3_vit_b16",
    "mocov3_vit_b16_cutmix",
    "mocov3",
    "vicregl_resnet50",
    "dino_vit_b16",
    "pixel",
]
WEIGHTED = [n for n in NAMES if n != "pixel"]
RESNETS = ["sscd_resnet50", "multigrain_resnet50", "vicregl_resnet50"]
FULL_SIZE = ["vit_s16_in1k", "pixel"]  # cheap enough to run as registered
TINY = 32  # input size used for every random-init build
DIMS = {
    "sscd_resnet50": 512,
    "multigrain_resnet50": 2048,
    "vit_s16_in1k": 384,
    "vit_b16_in21k": 768,
    "clip_vit_b16": 512,
    "swin_b_in1k": 1024,
    "mocov3_vit_b16": 768,
    "mocov3_vit_b16_cutmix": 768,
    "mocov3": 768,  # random init: ViT-B/16 (an exported file brings its own architecture)
    "vicregl_resnet50": 2048,
    "dino_vit_b16": 768,
    "pixel": 3 * 32 * 32,
}
# output widths of the depth-reduced specs (the CLIP projection stays 512-d)
SMALL_DIMS = {name: 64 for name in ("vit_b16_in21k", "mocov3_vit_b16", "mocov3_vit_b16_cutmix", "mocov3",
                                    "dino_vit_b16")}
SMALL_DIMS |= {"clip_vit_b16": 512, "swin_b_in1k": 256} | {name: 512 for name in RESNETS}
# tests that build TorchScript files themselves (the library only reads them)
building_torchscript = pytest.mark.filterwarnings(
    "ignore:.*torch.jit.*deprecated:FutureWarning", "ignore::torch.jit.TracerWarning"
)
SMALL_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}
SMALL_SWIN = {"depths": (1, 1, 1, 1), "embed_dim": 32, "num_heads": (1, 2, 4, 8)}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def random_descriptors() -> dict[str, Descriptor]:
    """Every descriptor with random weights at TINY input size, built once.

    ViT-S and pixel are the registered architectures; the others use reduced
    specs with the same weight layout (full-size builds are checked on the
    meta device in ``test_registered_architecture_shapes``).
    """
    torch.manual_seed(0)
    return {
        name: build_from_spec(spec, random_init=True, input_size=TINY)
        for name, spec in ((n, get_spec(n) if n in FULL_SIZE else small_spec(n)) for n in NAMES)
    }


def images(batch: int = 2, height: int = 40, width: int = 52) -> Tensor:
    return torch.rand(batch, 3, height, width)


def small_spec(name: str) -> DescriptorSpec:
    """A registry entry with a shallow, narrow architecture and the same weight layout."""
    spec = get_spec(name)
    if name in RESNETS:
        return dataclasses.replace(spec, arch="resnet18")  # torchvision-style keys like resnet50
    return dataclasses.replace(spec, arch_kwargs=SMALL_SWIN if name == "swin_b_in1k" else SMALL_VIT)


def assert_one_line(error: WeightsError, path: Path | None, name: str) -> None:
    message = str(error)
    fmt = get_spec(name).weights
    assert fmt is not None
    assert "\n" not in message
    assert fmt.description in message and fmt.source in message
    if path is not None:
        assert str(path) in message


# --------------------------------------------------------------------------- registry mechanics


def test_available_descriptors_lists_the_paper_and_pixel() -> None:
    assert available_descriptors() == NAMES


def test_unknown_name_lists_available() -> None:
    with pytest.raises(ValueError, match="available: sscd_resnet50, .*pixel") as info:
        build_descriptor("resnet_nonexistent", random_init=True)
    assert not isinstance(info.value, WeightsError)


@pytest.mark.parametrize("name", WEIGHTED)
def test_weights_required_unless_random_init(name: str) -> None:
    with pytest.raises(WeightsError) as info:
        build_descriptor(name)
    assert_one_line(info.value, None, name)
    assert "random_init=True" in str(info.value)


@pytest.mark.parametrize("name", WEIGHTED)
def test_missing_file_is_one_line_error(name: str, tmp_path: Path) -> None:
    path = tmp_path / "nope" / "weights.pth"
    with pytest.raises(WeightsError, match="not found") as info:
        build_descriptor(name, weights=path)
    assert_one_line(info.value, path, name)


def test_argument_conflicts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        build_descriptor("dino_vit_b16", weights=tmp_path / "w.pth", random_init=True)
    with pytest.raises(ValueError, match="takes no weights"):
        build_descriptor("pixel", weights=tmp_path / "w.pth")
    with pytest.raises(ValueError, match="divisible by 16"):
        build_descriptor("vit_s16_in1k", random_init=True, input_size=40)
    with pytest.raises(ValueError, match="input_size"):
        build_descriptor("swin_b_in1k", random_init=True, input_size=48)


def test_registry_table_has_every_descriptor() -> None:
    table = registry_table()
    assert len(table.splitlines()) == 2 + len(NAMES)
    for name in NAMES:
        assert f"| {name} |" in table


# --------------------------------------------------------------------------- forward of every descriptor


@pytest.mark.parametrize("name", NAMES)
def test_registered_architecture_shapes(name: str) -> None:
    """The full-size registered architecture at its default input size, built on the meta device (no compute)."""
    with torch.device("meta"):
        descriptor = build_descriptor(name, random_init=True)
    x = torch.empty(2, 3, descriptor.input_size, descriptor.input_size, device="meta")
    out = descriptor.backbone.forward_features(x) if descriptor.output == "tokens" else descriptor.backbone(x)
    expected = (2, 197, 768) if name == "dino_vit_b16" else (2, DIMS[name])
    assert tuple(out.shape) == expected
    assert descriptor.input_size == (288 if name == "sscd_resnet50" else 32 if name == "pixel" else 224)


@pytest.mark.parametrize("name", NAMES)
def test_random_descriptor_output(name: str, random_descriptors: dict[str, Descriptor]) -> None:
    descriptor = random_descriptors[name]
    assert not descriptor.training and descriptor.name == name and descriptor.input_size == TINY
    with torch.inference_mode():
        out = descriptor(images(2).double())  # float64 input, float32 output
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    dim = SMALL_DIMS.get(name, DIMS[name])
    if name == "dino_vit_b16":
        assert descriptor.output == "tokens" and descriptor.similarity == "split_product"
        assert out.shape == (2, 1 + (TINY // 16) ** 2, dim)
    else:
        assert descriptor.output == "global" and descriptor.similarity == "cosine"
        assert out.shape == (2, dim)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


def test_list_of_sizes_equals_per_image(random_descriptors: dict[str, Descriptor]) -> None:
    descriptor = random_descriptors["vit_s16_in1k"]
    batch = [torch.rand(3, 40, 64), torch.rand(3, 70, 33), torch.rand(3, TINY, TINY)]
    with torch.inference_mode():
        stacked = descriptor.preprocess(batch)
        single = torch.cat([descriptor.preprocess(image.unsqueeze(0)) for image in batch])
        assert torch.equal(stacked, single)
        assert stacked.shape == (3, 3, TINY, TINY)
        torch.testing.assert_close(descriptor(batch), torch.cat([descriptor(image[None]) for image in batch]))


@pytest.mark.parametrize("name", ["multigrain_resnet50", "clip_vit_b16"])
def test_preprocess_matches_torchvision(name: str, random_descriptors: dict[str, Descriptor]) -> None:
    """Resize short side + centre crop + normalise against torchvision's v2 functional ops."""
    descriptor = random_descriptors[name]
    pre = descriptor.preprocessing
    image = torch.rand(1, 3, 45, 61)
    mode = {"bilinear": TF.InterpolationMode.BILINEAR, "bicubic": TF.InterpolationMode.BICUBIC}[pre.interpolation]
    reference = TF.resize(image, [pre.resize_size], interpolation=mode, antialias=True).clamp(0, 1)
    reference = TF.center_crop(reference, [pre.input_size, pre.input_size])
    reference = TF.normalize(reference, list(pre.mean), list(pre.std))
    torch.testing.assert_close(descriptor.preprocess(image), reference, rtol=1e-5, atol=1e-5)


def test_resize_and_crop_geometry() -> None:
    tall = torch.rand(1, 3, 90, 30)
    assert resize_short_side(tall, 20).shape[-2:] == (60, 20)
    assert resize_short_side(tall, 30) is tall
    crop = center_crop(torch.arange(36.0).view(1, 1, 6, 6), 2)
    assert crop.flatten().tolist() == [14.0, 15.0, 20.0, 21.0]
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop(tall, 40)


def test_bad_images_are_rejected(random_descriptors: dict[str, Descriptor]) -> None:
    descriptor = random_descriptors["pixel"]
    with pytest.raises(TypeError, match="floating point"):
        descriptor((images() * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        descriptor(images() * 255)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        descriptor(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="image 1"):
        descriptor([torch.rand(3, 32, 32), torch.rand(1, 32, 32)])
    with pytest.raises(ValueError, match="empty"):
        descriptor([])


def test_pixel_descriptor_by_hand() -> None:
    descriptor = build_descriptor("pixel", input_size=4)
    image = np.random.default_rng(0).random((3, 4, 4)).astype(np.float32)
    flat = image.reshape(-1) - image.mean()
    expected = flat / np.sqrt((flat**2).sum())
    out = descriptor(torch.from_numpy(image)[None])
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-6, atol=1e-6)
    # brightness/contrast changes a*x + b (a > 0) give the same descriptor
    np.testing.assert_allclose(descriptor(torch.from_numpy(0.5 * image + 0.2)[None])[0].numpy(), expected, atol=1e-6)


def test_gem_reference() -> None:
    x = torch.rand(2, 5, 3, 4) + 0.01
    torch.testing.assert_close(gem(x, p=1.0), x.mean(dim=(2, 3)))
    arr = x.numpy().astype(np.float64)
    expected = np.power(np.power(arr, 3.0).mean(axis=(2, 3)), 1 / 3.0)
    np.testing.assert_allclose(gem(x, p=3.0).numpy(), expected, rtol=1e-5)
    torch.testing.assert_close(gem(x, p=200.0), x.amax(dim=(2, 3)), rtol=2e-2, atol=0)
    with pytest.raises(ValueError, match=r"gem expects a \(B, C, H, W\) map, got shape \(5, 3, 4\)"):
        gem(x[0])


# --------------------------------------------------------------------------- weight loading round trips


def assert_reproduces(source: Descriptor, loaded: Descriptor, exact: bool = True) -> None:
    batch = images(2)
    with torch.inference_mode():
        expected, got = source(batch), loaded(batch)
    if exact:
        assert torch.equal(expected, got)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@building_torchscript
def test_sscd_torchscript(tmp_path: Path, random_descriptors: dict[str, Descriptor]) -> None:
    """The released file is the scripted model; trace our eager SSCD layout (ResNet-18 trunk for speed)."""
    spec = small_spec("sscd_resnet50")
    source = random_descriptors["sscd_resnet50"]
    path = tmp_path / "sscd_disc_mixup.torchscript.pt"
    with torch.inference_mode():
        traced = torch.jit.trace(source.backbone, torch.rand(1, 3, TINY, TINY), check_trace=False)
    torch.jit.save(traced, str(path))
    loaded = build_from_spec(spec, weights=path, input_size=TINY)
    assert isinstance(loaded.backbone, torch.jit.ScriptModule)
    assert_reproduces(source, loaded, exact=False)


def test_sscd_rejects_a_state_dict(tmp_path: Path, random_descriptors: dict[str, Descriptor]) -> None:
    path = tmp_path / "sscd.pth"
    torch.save(random_descriptors["sscd_resnet50"].backbone.state_dict(), path)
    with pytest.raises(WeightsError, match="not a TorchScript archive") as info:
        build_descriptor("sscd_resnet50", weights=path)
    assert_one_line(info.value, path, "sscd_resnet50")


class TrainingState:
    """Stands for objects a training script pickles next to the weights (optimizers, args)."""

    def __init__(self) -> None:
        self.lr = 0.1


class Hostile:
    """Would create a directory when unpickled with plain pickle."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.target),))


@pytest.mark.parametrize("zipped", [True, False])  # the 2019 release predates the zip format
def test_multigrain_layout_with_training_objects(
    zipped: bool, tmp_path: Path, random_descriptors: dict[str, Descriptor]
) -> None:
    source = random_descriptors["multigrain_resnet50"]
    assert isinstance(source.backbone, PooledTrunk)
    state = {f"features.{k}": v for k, v in source.backbone.trunk.state_dict().items()}
    state |= {"classifier.weight": torch.randn(1000, 512), "classifier.bias": torch.randn(1000)}
    state |= {"pool.p": torch.tensor(3.0)}  # MultiGrain keeps its GeM exponent as a buffer
    path = tmp_path / "joint_3BAA_0.5.pth"
    checkpoint = {"model_state": state, "optimizer_state": TrainingState(), "extra": Hostile(tmp_path / "pwned")}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=zipped)
    loaded = build_from_spec(small_spec("multigrain_resnet50"), weights=path, input_size=TINY)
    assert_reproduces(source, loaded)
    assert not (tmp_path / "pwned").exists()  # nothing from the file was executed
    # a fine-tuned exponent in the file replaces the default p = 3
    state["pool.p"] = torch.tensor(4.0)
    torch.save({"model_state": state}, path)
    loaded = build_from_spec(small_spec("multigrain_resnet50"), weights=path, input_size=TINY)
    assert isinstance(loaded.backbone, PooledTrunk) and loaded.backbone.pool.p == 4.0


def test_vicregl_backbone(tmp_path: Path, random_descriptors: dict[str, Descriptor]) -> None:
    source = random_descriptors["vicregl_resnet50"]
    path = tmp_path / "resnet50_alpha0.9.pth"
    torch.save(source.backbone.trunk.state_dict(), path)
    assert_reproduces(source, build_from_spec(small_spec("vicregl_resnet50"), weights=path, input_size=TINY))


def test_vit_small_safetensors_with_head(tmp_path: Path, random_descriptors: dict[str, Descriptor]) -> None:
    source = random_descriptors["vit_s16_in1k"]
    state = dict(source.backbone.state_dict()) | {"head.weight": torch.randn(1000, 384), "head.bias": torch.zeros(1000)}
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert_reproduces(source, build_descriptor("vit_s16_in1k", weights=path, input_size=TINY))


@building_torchscript
def test_torchscript_archive_read_as_state_dict(tmp_path: Path, random_descriptors: dict[str, Descriptor]) -> None:
    """A TorchScript archive of a ViT (as OpenAI ships CLIP) is read through its state dict."""
    source = random_descriptors["vit_b16_in21k"]
    path = tmp_path / "vit.pt"
    with torch.inference_mode():
        traced = torch.jit.trace(source.backbone, torch.rand(1, 3, TINY, TINY), check_trace=False)
    torch.jit.save(traced, str(path))
    assert_reproduces(source, build_from_spec(small_spec("vit_b16_in21k"), weights=path, input_size=TINY))


@pytest.mark.parametrize("name", ["vit_b16_in21k", "dino_vit_b16"])
def test_plain_vit_state_dict(name: str, tmp_path: Path, random_descriptors: dict[str, Descriptor]) -> None:
    spec = small_spec(name)
    source = random_descriptors[name]
    state = dict(source.backbone.state_dict())
    if name == "vit_b16_in21k":
        state |= {"head.weight": torch.randn(21843, 64), "head.bias": torch.zeros(21843)}
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    assert_reproduces(source, build_from_spec(spec, weights=path, input_size=TINY))


def to_openai_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm CLIP ViT keys -> OpenAI CLIP 'visual.*' layout (plus a few text-tower keys)."""
    swaps = [
        ("patch_embed.proj", "conv1"),
        ("norm_pre", "ln_pre"),
        ("blocks.", "transformer.resblocks."),
        ("attn.qkv.", "attn.in_proj_"),
        ("attn.proj", "attn.out_proj"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
        ("norm1", "ln_1"),
        ("norm2", "ln_2"),
    ]
    out = {"logit_scale": torch.tensor(4.6), "token_embedding.weight": torch.randn(10, 8)}
    for key, value in state.items():
        if key == "cls_token":
            out["visual.class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["visual.positional_embedding"] = value[0]
        elif key == "head.weight":
            out["visual.proj"] = value.t().contiguous()
        elif key == "head.bias":
            assert not value.any()  # OpenAI's projection has no bias
        elif key.startswith("norm."):
            out["visual.ln_post." + key[len("norm.") :]] = value
        else:
            for old, new in swaps:
                key = key.replace(old, new)
            out["visual." + key] = value
    return out


@pytest.mark.parametrize("layout", ["timm", "openai"])
def test_clip_layouts(layout: str, tmp_path: Path) -> None:
    spec = small_spec("clip_vit_b16")
    source = build_from_spec(spec, random_init=True, input_size=TINY)
    torch.nn.init.zeros_(source.backbone.head.bias)
    state = dict(source.backbone.state_dict())
    path = tmp_path / "ViT-B-16.pt"
    torch.save(to_openai_clip(state) if layout == "openai" else state, path)
    assert_reproduces(source, build_from_spec(spec, weights=path, input_size=TINY))


@pytest.mark.parametrize("prefix", ["module.base_encoder.", "base_encoder."])
@pytest.mark.parametrize("name", ["mocov3_vit_b16", "mocov3_vit_b16_cutmix"])
def test_mocov3_layout(name: str, prefix: str, tmp_path: Path, random_descriptors: dict[str, Descriptor]) -> None:
    spec = small_spec(name)
    source = random_descriptors[name]
    outer = prefix.split("base_encoder.")[0]
    state = {prefix + k: v for k, v in source.backbone.state_dict().items()}
    state |= {
        prefix + "head.0.weight": torch.randn(32, 64),  # projector MLP
        outer + "momentum_encoder.cls_token": torch.randn(1, 1, 64),
        outer + "predictor.0.weight": torch.randn(32, 32),
    }
    path = tmp_path / "vit-b-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": state, "optimizer": {"state": {}}}, path)
    assert_reproduces(source, build_from_spec(spec, weights=path, input_size=TINY))


@pytest.mark.parametrize("wrapped", [False, True])
def test_swin_layout(wrapped: bool, tmp_path: Path, random_descriptors: dict[str, Descriptor]) -> None:
    spec = small_spec("swin_b_in1k")
    source = random_descriptors["swin_b_in1k"]
    state = dict(source.backbone.state_dict()) | {"head.fc.weight": torch.randn(1000, 256)}
    path = tmp_path / "swin.pth"
    torch.save({"model": state} if wrapped else state, path)
    assert_reproduces(source, build_from_spec(spec, weights=path, input_size=TINY))


def test_vit_pos_embed_resampled_to_input_size(tmp_path: Path) -> None:
    spec = small_spec("dino_vit_b16")
    source = build_from_spec(spec, random_init=True, input_size=64)
    path = tmp_path / "dino.pth"
    torch.save(source.backbone.state_dict(), path)
    loaded = build_from_spec(spec, weights=path, input_size=TINY)
    assert loaded(images(1)).shape == (1, 1 + (TINY // 16) ** 2, 64)
    saved, got = source.backbone.state_dict(), loaded.backbone.state_dict()
    assert saved["pos_embed"].shape == (1, 1 + (64 // 16) ** 2, 64)  # 4 x 4 grid + class token
    expected = resample_abs_pos_embed(saved["pos_embed"], [TINY // 16, TINY // 16], num_prefix_tokens=1)
    assert expected.shape == got["pos_embed"].shape == (1, 1 + (TINY // 16) ** 2, 64)
    torch.testing.assert_close(got["pos_embed"], expected, rtol=0, atol=1e-6)
    assert torch.equal(got["pos_embed"][:, :1], saved["pos_embed"][:, :1])  # the class token is not resampled
    assert got.keys() == saved.keys()
    assert all(torch.equal(got[k], saved[k]) for k in saved if k != "pos_embed")  # everything else as saved


# --------------------------------------------------------------------------- one-line weight errors


def test_garbage_files(tmp_path: Path) -> None:
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"garbage{suffix}"
        path.write_bytes(os.urandom(256))
        with pytest.raises(WeightsError, match="unreadable") as info:
            build_descriptor("vicregl_resnet50", weights=path)
        assert_one_line(info.value, path, "vicregl_resnet50")


def test_wrong_keys(tmp_path: Path, random_descriptors: dict[str, Descriptor]) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(random_descriptors["vicregl_resnet50"].backbone.trunk.state_dict(), path)
    with pytest.raises(WeightsError, match="missing keys.*unexpected keys") as info:
        build_descriptor("vit_s16_in1k", weights=path, input_size=TINY)
    assert_one_line(info.value, path, "vit_s16_in1k")


def test_wrong_shapes(tmp_path: Path, random_descriptors: dict[str, Descriptor]) -> None:
    state = dict(random_descriptors["vicregl_resnet50"].backbone.trunk.state_dict())
    state["layer1.0.conv1.weight"] = torch.randn(32, 64, 1, 1)
    path = tmp_path / "resnet.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"1 shape mismatches .*layer1\.0\.conv1\.weight") as info:
        build_from_spec(small_spec("vicregl_resnet50"), weights=path)
    assert_one_line(info.value, path, "vicregl_resnet50")


def test_wrong_layouts(tmp_path: Path) -> None:
    path = tmp_path / "plain.pth"
    torch.save({"blocks.0.norm1.weight": torch.ones(3)}, path)
    for name, match in [
        ("mocov3_vit_b16", "no keys start with 'module.base_encoder.'"),
        ("multigrain_resnet50", "no keys start with 'features.'"),
    ]:
        with pytest.raises(WeightsError, match=match) as info:
            build_descriptor(name, weights=path)
        assert_one_line(info.value, path, name)
    torch.save([torch.ones(3)], path)
    with pytest.raises(WeightsError, match="no state dict") as info:
        build_descriptor("dino_vit_b16", weights=path)
    assert_one_line(info.value, path, "dino_vit_b16")


def test_patch_size_mismatch_is_refused(tmp_path: Path) -> None:
    spec = small_spec("dino_vit_b16")
    source = build_from_spec(dataclasses.replace(spec, arch_kwargs=SMALL_VIT | {"patch_size": 8}), random_init=True)
    path = tmp_path / "dino_vitb8.pth"
    torch.save(source.backbone.state_dict(), path)
    with pytest.raises(WeightsError, match="patch size") as info:
        build_from_spec(spec, weights=path, input_size=TINY)
    assert_one_line(info.value, path, "dino_vit_b16")
