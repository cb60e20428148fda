"""Descriptor registry: the ten feature extractors of Somepalli et al. plus a pixel baseline.

Each entry is a :class:`DescriptorSpec` (timm architecture, output kind, preprocessing,
weights format and layout); :func:`build_descriptor` turns a name into a
:class:`models.descriptor.Descriptor` in eval mode.

Architectures come from timm with ``pretrained=False``; weights are read from
local files only (see :mod:`models.weights`). ``build_descriptor(name)``
without weights raises :class:`WeightsError` unless ``random_init=True`` is
asked for explicitly, so an experiment can never run on random features by
accident.

``mocov3`` is the suite's own descriptor: a backbone trained here (``models.mocov3``)
and written by ``lit export`` as safetensors whose metadata names the timm
architecture, preprocessing and output kind, all read from the file
(:func:`resolve_spec`); ``mocov3_vit_b16_cutmix`` takes such a file of a ViT-B/16 too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torch import nn

from lit.choices import SimilarityKind
from models.descriptor import Descriptor, OutputKind, similarity_of
from models.descriptor_options import DESCRIPTOR_NAMES
from models.pooling import AvgPool, GeM, PixelEmbedding, PooledTrunk
from models.preprocessing import INCEPTION_MEAN, INCEPTION_STD, RGB, Interpolation, Preprocessing
from models.weights import (
    ExportedState,
    ExportMetadata,
    ResNetTrunkState,
    SwinState,
    TimmViTState,
    TorchScriptModel,
    WeightsError,
    WeightsFormat,
    WeightsLayout,
    export_metadata_strings,
    read_export_metadata,
    weights_error,
)

__all__ = [
    "DescriptorSpec",
    "WeightsError",
    "available_descriptors",
    "build_descriptor",
    "build_from_spec",
    "check_input_size",
    "get_spec",
    "registry_table",
    "resolve_spec",
]


# --------------------------------------------------------------------------- registry entries

Builder = Callable[["DescriptorSpec", int, bool], nn.Module]


@dataclass(frozen=True)
class DescriptorSpec:
    """Everything the registry knows about one descriptor.

    ``build(spec, input_size, init)`` makes the backbone (``init=False`` skips
    random initialisation because weights follow); ``layout`` reads a weights
    file (before the model is built, so bad files fail fast) and loads it into
    the backbone. ``from_weights(spec, path)``, when set, returns the spec a
    given weights file describes (architecture and preprocessing read from a
    ``lit export`` file's metadata).
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
    from_weights: Callable[[DescriptorSpec, Path], DescriptorSpec] | None = None

    @property
    def similarity(self) -> SimilarityKind:
        return similarity_of(self.output)


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


def _build_exported(spec: DescriptorSpec, input_size: int, init: bool) -> nn.Module:
    """``timm.create_model(arch, **arch_kwargs)`` as a ``lit export`` file records it (``img_size`` = input size)."""
    kwargs: dict[str, Any] = dict(spec.arch_kwargs)
    if "img_size" in kwargs or input_size != spec.preprocessing.input_size:
        kwargs["img_size"] = input_size
    try:
        if not init:  # weights follow: skip random initialisation where the architecture allows it (ViTs)
            try:
                return timm.create_model(spec.arch, pretrained=False, weight_init="skip", **kwargs)
            except TypeError:
                pass
        return timm.create_model(spec.arch, pretrained=False, **kwargs)
    except Exception as error:  # a timm without this architecture, or kwargs it does not take
        raise ValueError(f"{spec.name}: cannot build timm model {spec.arch!r} with {kwargs} "
                         f"recorded in the weights file ({type(error).__name__}: {error})") from error


# --------------------------------------------------------------------------- descriptors read from `lit export` files


def _exported_spec(spec: DescriptorSpec, path: Path, meta: ExportMetadata) -> DescriptorSpec:
    """``spec`` with the architecture, output and preprocessing a ``lit export`` file records."""
    kwargs = dict(meta.arch_kwargs)
    return replace(
        spec,
        arch=meta.arch,
        output=meta.output,  # type: ignore[arg-type]
        feature_dim=meta.feature_dim,
        preprocessing=_pre(meta.input_size, meta.crop_pct, meta.interpolation, meta.mean, meta.std),  # type: ignore[arg-type]
        build=_build_exported,
        layout=ExportedState(),
        size_multiple=_patch_size(path),
        min_size=1,
        num_classes=int(kwargs.get("num_classes", 0)),
        arch_kwargs=kwargs,
        from_weights=None,
    )


def _patch_size(path: Path) -> int:
    """A ViT's patch size from the file's ``patch_embed.proj.weight`` shape (header only); 1 otherwise."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        if "patch_embed.proj.weight" not in handle.keys():
            return 1
        return int(handle.get_slice("patch_embed.proj.weight").get_shape()[-1])


def _spec_from_export(spec: DescriptorSpec, path: Path) -> DescriptorSpec:
    """``mocov3``: everything (timm architecture, preprocessing, output) from the file's metadata."""
    assert spec.weights is not None
    return _exported_spec(spec, path, read_export_metadata(path, spec.weights))


_VIT_B16 = {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12}


def _spec_from_export_or_official(spec: DescriptorSpec, path: Path) -> DescriptorSpec:
    """``mocov3_vit_b16_cutmix``: a ``lit export`` file of a ViT-B/16, or the official MoCo v3 layout."""
    assert spec.weights is not None
    if export_metadata_strings(path) is None:
        return spec  # the official checkpoint layout (TimmViTState reads and checks it)
    meta = read_export_metadata(path, spec.weights)
    changed = {k: meta.arch_kwargs[k] for k, v in _VIT_B16.items() if meta.arch_kwargs.get(k, v) != v}
    if meta.arch != spec.arch or changed or meta.output != spec.output:
        problem = (f"lit export of {meta.arch} {changed or ''} ({meta.output} features), not a ViT-B/16 "
                   f"({spec.arch}, global); load it as descriptor 'mocov3'")
        raise weights_error(path, spec.weights, problem)
    return _exported_spec(spec, path, meta)


# --------------------------------------------------------------------------- the registry


def _pre(input_size: int, crop_pct: float, interpolation: Interpolation, mean: RGB, std: RGB) -> Preprocessing:
    return Preprocessing(input_size, crop_pct, interpolation, tuple(mean), tuple(std))  # type: ignore[arg-type]


_IMAGENET_224 = _pre(224, 0.875, "bilinear", IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
_TIMM_VIT_INCEPTION = _pre(224, 0.9, "bicubic", INCEPTION_MEAN, INCEPTION_STD)
_MOCOV3_FORMAT = (
    "a MoCo v3 checkpoint: dict with 'state_dict' holding 'module.base_encoder.*' ViT-B/16 keys "
    "(head/predictor/momentum encoder ignored)"
)
_EXPORT_FORMAT = (
    "a safetensors file written by 'lit export' (timm backbone weights; metadata: timm architecture and kwargs, "
    "input size, crop_pct, interpolation, mean/std, output kind)"
)
_EXPORT_SOURCE = (
    "not downloadable: 'lit export --ckpt_path CKPT --out FILE' writes it from a checkpoint of this suite's "
    "MoCo v3 training (models.mocov3)"
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
    replace(  # same network; the official layout (another fine-tuning) or this suite's lit export
        _MOCOV3,
        name="mocov3_vit_b16_cutmix",
        weights=WeightsFormat(
            f"{_MOCOV3_FORMAT}, or a ViT-B/16 safetensors file written by 'lit export'",
            "the paper's CutMix weights were not released; 'lit export --ckpt_path CKPT --out FILE' writes them "
            "from this suite's MoCo v3 + CutMix fine-tuning (models.mocov3, cutmix on) of "
            "https://dl.fbaipublicfiles.com/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
        ),
        from_weights=_spec_from_export_or_official,
    ),
    replace(  # any architecture: read from the file; random_init builds a ViT-B/16 (the floor)
        _MOCOV3,
        name="mocov3",
        weights=WeightsFormat(_EXPORT_FORMAT, _EXPORT_SOURCE),
        layout=ExportedState(),
        from_weights=_spec_from_export,
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
if tuple(_REGISTRY) != DESCRIPTOR_NAMES:  # the names --help shows without torch are the specs held here
    raise ImportError(f"models.registry: the specs {tuple(_REGISTRY)} are not "
                      f"models.descriptor_options.DESCRIPTOR_NAMES {DESCRIPTOR_NAMES}, in that order")


def available_descriptors() -> list[str]:
    """Registered descriptor names (:data:`models.descriptor_options.DESCRIPTOR_NAMES`), in the order of
    the paper's Table 1 (pixel baseline last)."""
    return list(DESCRIPTOR_NAMES)


def get_spec(name: str) -> DescriptorSpec:
    """The registry entry of ``name``; ValueError listing the available names otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown descriptor {name!r}; available: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def resolve_spec(name: str, weights: str | Path | None = None) -> DescriptorSpec:
    """The registry entry of ``name`` as ``weights`` describes it (``mocov3``: architecture and
    preprocessing from the file's metadata, read without building anything)."""
    spec = get_spec(name)
    if weights is not None and spec.from_weights is not None:
        spec = spec.from_weights(spec, Path(weights).expanduser())
    return spec


def check_input_size(spec: DescriptorSpec, size: object) -> None:
    """ValueError unless ``size`` is an input size ``spec``'s architecture takes (a multiple of its
    patch / window size, at least its minimum)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < spec.min_size or size % spec.size_multiple:
        raise ValueError(
            f"{spec.name}: input_size must be an integer >= {max(spec.min_size, spec.size_multiple)} "
            f"divisible by {spec.size_multiple}, got {size!r}"
        )


def build_descriptor(
    name: str, weights: str | Path | None = None, random_init: bool = False, input_size: int | None = None,
    seed: int = 0,
) -> Descriptor:
    """Build a registered descriptor in eval mode, loading ``weights`` from a local file.

    ``random_init=True`` (only when asked) gives random weights, for tests and
    smoke runs: the same network for the same ``seed`` (drawn from a forked torch
    RNG, so the caller's global RNG is left as it was); ``input_size`` overrides the
    crop size (ViT/Swin are created for it, and loaded position embeddings are
    resampled by timm).
    """
    return build_from_spec(get_spec(name), weights=weights, random_init=random_init, input_size=input_size,
                           seed=seed)


def build_from_spec(
    spec: DescriptorSpec, weights: str | Path | None = None, random_init: bool = False, input_size: int | None = None,
    seed: int = 0,
) -> Descriptor:
    """:func:`build_descriptor` for an explicit (possibly modified) :class:`DescriptorSpec`."""
    if weights is not None and random_init:
        raise ValueError(f"{spec.name}: pass either weights or random_init=True, not both")
    if weights is not None and spec.from_weights is not None:
        spec = spec.from_weights(spec, Path(weights).expanduser())
    if spec.weights is None:
        if weights is not None:
            raise ValueError(f"{spec.name} takes no weights, got {weights}")
    elif weights is None and not random_init:
        problem = f"descriptor {spec.name!r} needs weights=<path> (or random_init=True for random features)"
        raise weights_error(None, spec.weights, problem)
    size = spec.preprocessing.input_size if input_size is None else input_size
    check_input_size(spec, size)
    content, path = None, None
    if weights is not None:
        assert spec.weights is not None and spec.layout is not None
        path = Path(weights).expanduser()
        content = spec.layout.read(path, spec.weights)  # fails before a large model is built
    replaced = path is not None and spec.layout is not None and spec.layout.replaces_backbone
    if replaced:
        backbone = None
    elif path is None and random_init:
        with torch.random.fork_rng(devices=[]):  # the same random network for the same seed, global RNG untouched
            torch.manual_seed(seed)
            backbone = spec.build(spec, size, True)
    else:
        backbone = spec.build(spec, size, path is None)
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
        if spec.from_weights is _spec_from_export:
            out = "global or tokens, from the file"
            arch = "from the file (random init: vit_base_patch16_224)"
        else:
            arch = spec.arch
        fmt = spec.weights.description if spec.weights else "none"
        src = spec.weights.source if spec.weights else "-"
        rows.append(
            f"| {spec.name} | {arch} | {out} | {spec.similarity} | "
            f"{spec.preprocessing.describe()} | {fmt} | {src} |"
        )
    return "\n".join(rows)
