"""Descriptor registry: the ten feature extractors of Somepalli et al. plus a pixel baseline.

A :class:`Descriptor` owns its preprocessing (resize the short side, centre
crop, mean/std normalisation) and maps float images in [0, 1] -- a (B, 3, H, W)
batch or a list of differently sized (3, H, W) tensors -- to L2-normalised
global features (B, D) or raw token features (B, T, D) for split-product
(whose token normalisation is chosen at search time, see ``lit.similarity``).

Architectures come from timm with ``pretrained=False``; weights are read from
local files only (see :mod:`models.weights`). ``build_descriptor(name)``
without weights raises :class:`WeightsError` unless ``random_init=True`` is
asked for explicitly, so an experiment can never run on random features by
accident.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from models.pooling import AvgPool, GeM, PixelEmbedding, PooledTrunk
from models.weights import (
    ResNetTrunkState,
    SwinState,
    TimmViTState,
    TorchScriptModel,
    WeightsError,
    WeightsFormat,
    WeightsLayout,
    weights_error,
)

if TYPE_CHECKING:
    from lit.similarity import SimilarityKind

__all__ = [
    "Descriptor",
    "DescriptorSpec",
    "Preprocessing",
    "WeightsError",
    "available_descriptors",
    "build_descriptor",
    "build_from_spec",
    "center_crop",
    "get_spec",
    "registry_table",
    "resize_short_side",
]

OutputKind = Literal["global", "tokens"]
Interpolation = Literal["bilinear", "bicubic"]
_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
RGB = tuple[float, float, float]

INCEPTION_MEAN: RGB = (0.5, 0.5, 0.5)
INCEPTION_STD: RGB = (0.5, 0.5, 0.5)
_MEAN_NAMES = {tuple(IMAGENET_DEFAULT_MEAN): "ImageNet", tuple(OPENAI_CLIP_MEAN): "CLIP", INCEPTION_MEAN: "0.5",
               (0.0, 0.0, 0.0): "none"}
# values outside [0 - tol, 1 + tol] mean the caller passed 0..255 or already-normalised images
_RANGE_TOLERANCE = 0.01


# --------------------------------------------------------------------------- preprocessing


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


def _check_images(images: Tensor | Sequence[Tensor]) -> list[Tensor]:
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


# --------------------------------------------------------------------------- descriptor module


def default_similarity(output: OutputKind) -> SimilarityKind:
    """The paper's pairing: split-product for token features, cosine for global ones."""
    return "split_product" if output == "tokens" else "cosine"


class Descriptor(nn.Module):
    """Preprocessing + backbone: images in [0, 1] -> (B, D) L2-normalised or (B, T, D) float32 features."""

    def __init__(
        self,
        name: str,
        backbone: nn.Module,
        output: OutputKind,
        preprocessing: Preprocessing,
    ) -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone
        self.output: OutputKind = output
        self.preprocessing = preprocessing
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)

    @property
    def default_similarity(self) -> SimilarityKind:
        return default_similarity(self.output)

    def similarity_for(self, choice: str) -> SimilarityKind:
        """``choice`` itself, or this descriptor's default for ``"auto"``."""
        return self.default_similarity if choice == "auto" else choice  # type: ignore[return-value]

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    def preprocess(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        """Float images in [0, 1] -> normalised (B, 3, S, S) on the module's device."""
        groups = _check_images(images)
        spec = self.preprocessing
        crops = [
            center_crop(
                resize_short_side(group.to(self.mean.device, self.mean.dtype), spec.resize_size, spec.interpolation),
                spec.input_size,
            )
            for group in groups
        ]
        batch = crops[0] if len(crops) == 1 else torch.cat(crops)
        return (batch - self.mean) / self.std

    def forward(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        return self._features(self.preprocess(images))

    def embed_cropped(self, crops: Tensor) -> Tensor:
        """Features of (B, 3, S, S) images in [0, 1] already resized and centre-cropped as
        :meth:`preprocess` would (e.g. in data-loader workers): normalise, then the backbone."""
        if crops.ndim != 4 or tuple(crops.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(f"expected crops of shape (B, 3, {self.input_size}, {self.input_size}), "
                             f"got {tuple(crops.shape)}")
        return self._features((crops.to(self.mean.device, self.mean.dtype) - self.mean) / self.std)

    def _features(self, x: Tensor) -> Tensor:
        features = self.backbone.forward_features(x) if self.output == "tokens" else self.backbone(x)
        features = features.float()
        if self.output == "global":
            if features.ndim != 2:
                raise RuntimeError(f"{self.name}: backbone returned shape {tuple(features.shape)}, expected (B, D)")
            return F.normalize(features, dim=-1)
        if features.ndim != 3:
            raise RuntimeError(f"{self.name}: backbone returned shape {tuple(features.shape)}, expected (B, T, D)")
        return features

    def extra_repr(self) -> str:
        return f"name={self.name!r}, output={self.output!r}, {self.preprocessing.describe()}"


# --------------------------------------------------------------------------- registry entries

Builder = Callable[["DescriptorSpec", int, bool], nn.Module]


@dataclass(frozen=True)
class DescriptorSpec:
    """Everything the registry knows about one descriptor.

    ``build(spec, input_size, init)`` makes the backbone (``init=False`` skips
    random initialisation because weights follow); ``layout`` reads a weights
    file (before the model is built, so bad files fail fast) and loads it into
    the backbone.
    """

    name: str
    arch: str
    output: OutputKind
    feature_dim: int
    preprocessing: Preprocessing
    build: Builder
    weights: WeightsFormat | None = None
    layout: WeightsLayout | None = None
    size_multiple: int = 1
    min_size: int = 1
    num_classes: int = 0
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def default_similarity(self) -> SimilarityKind:
        return default_similarity(self.output)


def _build_timm(spec: DescriptorSpec, input_size: int, init: bool) -> nn.Module:
    """timm ViT / Swin at ``img_size=input_size``; ``weight_init='skip'`` when weights will be loaded."""
    kwargs: dict[str, Any] = {"num_classes": spec.num_classes, "img_size": input_size, **spec.arch_kwargs}
    if not init:
        kwargs["weight_init"] = "skip"
    return timm.create_model(spec.arch, pretrained=False, **kwargs)


def _build_resnet(
    spec: DescriptorSpec, input_size: int, init: bool, *, pool: Callable[[], nn.Module], projection_dim: int = 0
) -> nn.Module:
    """timm ResNet trunk (keys match torchvision's) + pooling (+ SSCD's linear projection)."""
    trunk = timm.create_model(spec.arch, pretrained=False, num_classes=0, global_pool="", **spec.arch_kwargs)
    projection = nn.Linear(trunk.num_features, projection_dim) if projection_dim else None
    return PooledTrunk(trunk, pool(), projection)


def _build_pixel(spec: DescriptorSpec, input_size: int, init: bool) -> nn.Module:
    return PixelEmbedding()


# --------------------------------------------------------------------------- the registry


def _pre(input_size: int, crop_pct: float, interpolation: Interpolation, mean: RGB, std: RGB) -> Preprocessing:
    return Preprocessing(input_size, crop_pct, interpolation, tuple(mean), tuple(std))  # type: ignore[arg-type]


_IMAGENET_224 = _pre(224, 0.875, "bilinear", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
_TIMM_VIT_INCEPTION = _pre(224, 0.9, "bicubic", INCEPTION_MEAN, INCEPTION_STD)
_MOCOV3_FORMAT = (
    "a MoCo v3 checkpoint: dict with 'state_dict' holding 'module.base_encoder.*' ViT-B/16 keys "
    "(head/predictor/momentum encoder ignored)"
)

_MOCOV3 = DescriptorSpec(
    name="mocov3_vit_b16",
    arch="vit_base_patch16_224",
    output="global",
    feature_dim=768,
    preprocessing=_IMAGENET_224,
    build=_build_timm,
    weights=WeightsFormat(
        _MOCOV3_FORMAT,
        "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar "
        "(github.com/facebookresearch/moco-v3)",
    ),
    layout=TimmViTState(key="state_dict", prefixes=("module.base_encoder.", "base_encoder.")),
    size_multiple=16,
)

_SPECS: tuple[DescriptorSpec, ...] = (
    DescriptorSpec(
        name="sscd_resnet50",
        arch="resnet50",
        output="global",
        feature_dim=512,
        # SSCD README "small_288": short side 288, ImageNet mean/std; we centre-crop 288 to batch square images
        preprocessing=_pre(288, 1.0, "bilinear", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        build=partial(_build_resnet, pool=partial(GeM, 3.0), projection_dim=512),
        weights=WeightsFormat(
            "the SSCD TorchScript file sscd_disc_mixup.torchscript.pt (loaded with torch.jit.load)",
            "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt "
            "(github.com/facebookresearch/sscd-copy-detection)",
        ),
        layout=TorchScriptModel(),
        min_size=32,
    ),
    DescriptorSpec(
        name="multigrain_resnet50",
        arch="resnet50",
        output="global",
        feature_dim=2048,
        preprocessing=_IMAGENET_224,
        build=partial(_build_resnet, pool=partial(GeM, 3.0)),
        weights=WeightsFormat(
            "a MultiGrain checkpoint: dict with 'model_state' holding 'features.*' ResNet-50 keys and GeM 'pool.p' "
            "(classifier ignored)",
            "https://dl.fbaipublicfiles.com/multigrain/multigrain_models/joint_3BAA_0.5.pth "
            "(github.com/facebookresearch/multigrain)",
        ),
        layout=ResNetTrunkState(key="model_state", prefix="features.", ignore=("classifier.",), gem_key="pool.p"),
        min_size=32,
    ),
    DescriptorSpec(
        name="vit_s16_in1k",
        arch="vit_small_patch16_224",
        output="global",
        feature_dim=384,
        preprocessing=_TIMM_VIT_INCEPTION,
        build=_build_timm,
        weights=WeightsFormat(
            "a timm vit_small_patch16_224 state dict (.safetensors/.pth/.bin; classifier head ignored)",
            "https://huggingface.co/timm/vit_small_patch16_224.augreg_in1k",
        ),
        layout=TimmViTState(),
        size_multiple=16,
    ),
    DescriptorSpec(
        name="vit_b16_in21k",
        arch="vit_base_patch16_224",
        output="global",
        feature_dim=768,
        preprocessing=_TIMM_VIT_INCEPTION,
        build=_build_timm,
        weights=WeightsFormat(
            "a timm vit_base_patch16_224.augreg_in21k state dict (.safetensors/.pth/.bin; 21k head ignored)",
            "https://huggingface.co/timm/vit_base_patch16_224.augreg_in21k",
        ),
        layout=TimmViTState(),
        size_multiple=16,
    ),
    DescriptorSpec(
        name="clip_vit_b16",
        # OpenAI CLIP uses QuickGELU; same keys as vit_base_patch16_clip_224
        arch="vit_base_patch16_clip_quickgelu_224",
        output="global",
        feature_dim=512,
        preprocessing=_pre(224, 1.0, "bicubic", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        build=_build_timm,
        weights=WeightsFormat(
            "the OpenAI CLIP ViT-B/16 checkpoint (ViT-B-16.pt, TorchScript or state dict with 'visual.*' keys) "
            "or a timm vit_base_patch16_clip_224.openai state dict with its 512-d projection head",
            "https://openaipublic.azureedge.net/clip/models/"
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt "
            "or https://huggingface.co/timm/vit_base_patch16_clip_224.openai",
        ),
        layout=TimmViTState(ignore=()),
        size_multiple=16,
        num_classes=512,
    ),
    DescriptorSpec(
        name="swin_b_in1k",
        arch="swin_base_patch4_window7_224",
        output="global",
        feature_dim=1024,
        preprocessing=_pre(224, 0.9, "bicubic", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        build=_build_timm,
        weights=WeightsFormat(
            "a timm swin_base_patch4_window7_224 state dict or the official Swin checkpoint ({'model': ...}); "
            "classifier head ignored",
            "https://huggingface.co/timm/swin_base_patch4_window7_224.ms_in1k or "
            "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_base_patch4_window7_224.pth",
        ),
        layout=SwinState(),
        size_multiple=32,
    ),
    _MOCOV3,
    replace(  # same network and checkpoint format; only the weights' origin differs
        _MOCOV3,
        name="mocov3_vit_b16_cutmix",
        weights=WeightsFormat(
            _MOCOV3_FORMAT,
            "no public release: produced by this suite's MoCo v3 + CutMix fine-tuning of "
            "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
        ),
    ),
    DescriptorSpec(
        name="vicregl_resnet50",
        arch="resnet50",
        output="global",
        feature_dim=2048,
        preprocessing=_IMAGENET_224,
        build=partial(_build_resnet, pool=AvgPool),
        weights=WeightsFormat(
            "a VICRegL ResNet-50 backbone state dict (torchvision-style keys, no 'fc')",
            "https://dl.fbaipublicfiles.com/vicregl/resnet50_alpha0.9.pth (github.com/facebookresearch/VICRegL)",
        ),
        layout=ResNetTrunkState(ignore=("fc.",)),
        min_size=32,
    ),
    DescriptorSpec(
        name="dino_vit_b16",
        arch="vit_base_patch16_224",
        output="tokens",
        feature_dim=768,
        preprocessing=_pre(224, 0.875, "bicubic", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        build=_build_timm,
        weights=WeightsFormat(
            "the DINO ViT-B/16 backbone state dict (plain ViT keys, timm-compatible)",
            "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth "
            "(github.com/facebookresearch/dino)",
        ),
        layout=TimmViTState(),
        size_multiple=16,
    ),
    DescriptorSpec(
        name="pixel",
        arch="none",
        output="global",
        feature_dim=3 * 32 * 32,
        preprocessing=_pre(32, 1.0, "bilinear", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
        build=_build_pixel,
    ),
)

_REGISTRY: dict[str, DescriptorSpec] = {spec.name: spec for spec in _SPECS}


def available_descriptors() -> list[str]:
    """Registered descriptor names, in the order of the paper's Table 1 (pixel baseline last)."""
    return list(_REGISTRY)


def get_spec(name: str) -> DescriptorSpec:
    """The registry entry of ``name``; ValueError listing the available names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown descriptor {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_descriptor(
    name: str, weights: str | Path | None = None, random_init: bool = False, input_size: int | None = None
) -> Descriptor:
    """Build a registered descriptor in eval mode, loading ``weights`` from a local file.

    ``random_init=True`` (only when asked) gives random weights, for tests and
    smoke runs; ``input_size`` overrides the crop size (ViT/Swin are created
    for it, and loaded position embeddings are resampled by timm).
    """
    return build_from_spec(get_spec(name), weights=weights, random_init=random_init, input_size=input_size)


def build_from_spec(
    spec: DescriptorSpec, weights: str | Path | None = None, random_init: bool = False, input_size: int | None = None
) -> Descriptor:
    """:func:`build_descriptor` for an explicit (possibly modified) :class:`DescriptorSpec`."""
    if weights is not None and random_init:
        raise ValueError(f"{spec.name}: pass either weights or random_init=True, not both")
    if spec.weights is None:
        if weights is not None:
            raise ValueError(f"{spec.name} takes no weights, got {weights}")
    elif weights is None and not random_init:
        problem = f"descriptor {spec.name!r} needs weights=<path> (or random_init=True for random features)"
        raise weights_error(None, spec.weights, problem)
    size = spec.preprocessing.input_size if input_size is None else input_size
    if isinstance(size, bool) or not isinstance(size, int) or size < spec.min_size or size % spec.size_multiple:
        raise ValueError(
            f"{spec.name}: input_size must be an integer >= {max(spec.min_size, spec.size_multiple)} "
            f"divisible by {spec.size_multiple}, got {size!r}"
        )
    content, path = None, None
    if weights is not None:
        assert spec.weights is not None and spec.layout is not None
        path = Path(weights).expanduser()
        content = spec.layout.read(path, spec.weights)  # fails before a large model is built
    replaced = path is not None and spec.layout is not None and spec.layout.replaces_backbone
    backbone = None if replaced else spec.build(spec, size, path is None)
    if path is not None:
        assert spec.weights is not None and spec.layout is not None
        backbone = spec.layout.apply(backbone, content, path, spec.weights)
    descriptor = Descriptor(
        spec.name, backbone, spec.output, replace(spec.preprocessing, input_size=size)
    )
    return descriptor.eval()


def registry_table() -> str:
    """Markdown table of the registry (for the README): name, arch, output, preprocessing, weights."""
    rows = [
        "| name | architecture (timm) | output | similarity | preprocessing | weights format | source |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in _SPECS:
        if spec.output == "tokens":
            grid = (spec.preprocessing.input_size // spec.size_multiple) ** 2
            out = f"tokens ({grid + 1}, {spec.feature_dim})"
        else:
            out = f"global {spec.feature_dim}"
        fmt = spec.weights.description if spec.weights else "none"
        src = spec.weights.source if spec.weights else "-"
        rows.append(
            f"| {spec.name} | {spec.arch} | {out} | {spec.default_similarity} | "
            f"{spec.preprocessing.describe()} | {fmt} | {src} |"
        )
    return "\n".join(rows)
