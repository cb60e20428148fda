"""``lit export --ckpt_path CKPT --out FILE``: a trained backbone as a descriptor file the whole suite reads;
for a text-to-image module (one with ``export_pipeline``, e.g. ``models.text_diffusion.TextDiffusionModule``),
``--out FOLDER`` gets its pipeline folder instead (:func:`export_text_pipeline`), which ``lit generate`` loads.

The checkpoint's LightningModule is rebuilt from its saved hyper-parameters
(``LightningModule.load_from_checkpoint`` with the class path ``lit fit`` stores
in them, or ``--class_path``); the module must expose ``descriptor`` (a
:class:`models.descriptor.Descriptor`: preprocessing + the backbone being
trained, e.g. :class:`models.mocov3.MoCoV3Module`'s query encoder) and
``descriptor_arch`` (a dict with the timm ``arch`` name and its kwargs under
``timm_kwargs`` or ``arch_kwargs``; preprocessing fields, when present, must
agree with the descriptor's).

``FILE`` (``.safetensors``) holds the backbone's state dict and, as metadata
(:class:`models.weights.ExportMetadata`), the timm architecture and kwargs, input
size, crop_pct, interpolation, mean/std and output kind, plus the source
checkpoint, its SHA-256, the suite version, module class, epoch and step. It
loads as ``--model.init_args.descriptor.name mocov3 --model.init_args.descriptor.weights FILE``
(``descriptor: {name: mocov3, weights: FILE}``; a ViT-B/16 also as ``mocov3_vit_b16_cutmix``)
wherever a descriptor is named.
Before the file is moved into place, it is loaded back as descriptor ``mocov3``
and its features are compared with the module's on random images.

An existing ``FILE`` is replaced only when ``lit export`` wrote it and
``--overwrite`` is given; anything else is refused (:class:`lit.errors.UserError`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import LightningModule
from torch import Tensor

import lit
from lit.commands.export_options import DESCRIPTOR_NAME, SUFFIX, build_parser
from lit.errors import UserError
from lit.files import atomic_path, file_sha256
from models.descriptor import Descriptor
from models.pipeline_folder import check_pipeline_destination
from models.registry import build_descriptor
from models.weights import ExportMetadata, WeightsError, export_metadata_strings, lenient_torch_load

_CHECKED_FIELDS = ("input_size", "crop_pct", "interpolation", "mean", "std", "output")
_PROBE_TOLERANCE = 1e-4


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse a destination ``lit export`` may not write (UserError naming the file)."""
    if out.suffix != SUFFIX:
        raise UserError(f"--out {out}: the descriptor file must end in {SUFFIX}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name ending in {SUFFIX}")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_file() or export_metadata_strings(out) is None:
        raise UserError(f"{out} exists and was not written by lit export; refusing to overwrite it "
                        "(choose another --out)")
    if not overwrite:
        raise UserError(f"{out} exists (written by an earlier lit export); pass --overwrite to replace it")


@dataclass(frozen=True)
class CheckpointSummary:
    """What ``lit export`` reads from a checkpoint before rebuilding its module."""

    hparams: dict[str, Any]
    epoch: int | None
    global_step: int | None
    weights_only: bool  # loadable with torch.load(weights_only=True)


def read_summary(ckpt_path: Path) -> CheckpointSummary:
    """Hyper-parameters, epoch and step of a Lightning checkpoint, read without running code from the file
    (``weights_only``; checkpoints that pickled other objects are read with inert stand-ins)."""
    weights_only = True
    try:
        try:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError):
            checkpoint, weights_only = lenient_torch_load(ckpt_path), False
    except Exception as error:
        raise UserError(f"--ckpt_path {ckpt_path}: cannot read it as a Lightning checkpoint "
                        f"({type(error).__name__}: {' '.join(str(error).split())[:200]})") from error
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise UserError(f"--ckpt_path {ckpt_path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = checkpoint.get("hyper_parameters", {})
    number = lambda key: int(checkpoint[key]) if isinstance(checkpoint.get(key), int) else None  # noqa: E731
    return CheckpointSummary(dict(hparams) if isinstance(hparams, Mapping) else {}, number("epoch"),
                             number("global_step"), weights_only)


def module_class(class_path: str, ckpt_path: Path) -> type[LightningModule]:
    """Import ``package.module.Class`` and check it is a LightningModule."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError) as error:
        raise UserError(f"cannot import the module class {class_path!r} of {ckpt_path} ({error})") from error
    if not isinstance(cls, type) or not issubclass(cls, LightningModule):
        raise UserError(f"{class_path!r} (the module class of {ckpt_path}) is not a LightningModule")
    return cls


def load_module(ckpt_path: Path, summary: CheckpointSummary, class_path: str | None = None) -> LightningModule:
    """The checkpoint's LightningModule, rebuilt from its hyper-parameters, in eval mode on the CPU.

    ``weights_only=False`` only for a checkpoint that pickled more than tensors and
    containers: it is the user's own training run, which ``lit export`` is asked to read.
    A ``weights`` init argument (initial weights, e.g. MoCo v3's official checkpoint) is
    set to None: the checkpoint's own state dict follows.
    """
    class_path = class_path or summary.hparams.get("_class_path")
    if not class_path:
        raise UserError(f"{ckpt_path} does not record its module class (not saved by lit fit); "
                        "pass --class_path package.module.Class")
    cls = module_class(str(class_path), ckpt_path)
    # the checkpoint's state dict replaces whatever the module would load at init (MoCoV3Module's
    # official ``weights``): do not read, or require, that file again
    overrides = {"weights": None} if "weights" in inspect.signature(cls.__init__).parameters else {}
    try:
        module = cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=summary.weights_only,
                                          **overrides)
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        raise UserError(f"cannot rebuild {class_path} from {ckpt_path} "
                        f"({type(error).__name__}: {' '.join(str(error).split())[:300]})") from error
    return module.eval()


def export_metadata(module: LightningModule, descriptor: Descriptor, feature_dim: int,
                    provenance: dict[str, str]) -> ExportMetadata:
    """The file's metadata from ``module.descriptor_arch`` and the descriptor's own preprocessing."""
    arch = getattr(module, "descriptor_arch", None)
    if not isinstance(arch, Mapping) or not isinstance(arch.get("arch"), str):
        raise UserError(f"{type(module).__name__} has no descriptor_arch dict with a timm 'arch' name; "
                        "lit export needs a module like models.mocov3.MoCoV3Module")
    kwargs = arch.get("timm_kwargs", arch.get("arch_kwargs", {}))
    pre = descriptor.preprocessing
    own = {"input_size": pre.input_size, "crop_pct": pre.crop_pct, "interpolation": pre.interpolation,
           "mean": list(pre.mean), "std": list(pre.std), "output": descriptor.output}
    for name in _CHECKED_FIELDS:
        if name in arch and _plain(arch[name]) != _plain(own[name]):
            raise RuntimeError(f"{type(module).__name__}.descriptor_arch[{name!r}] = {arch[name]!r} disagrees with "
                               f"its descriptor's {own[name]!r}")
    return ExportMetadata(
        arch=arch["arch"], arch_kwargs=_plain(dict(kwargs)), input_size=pre.input_size, crop_pct=pre.crop_pct,
        interpolation=pre.interpolation, mean=pre.mean, std=pre.std, output=descriptor.output,
        feature_dim=feature_dim, provenance=provenance,
    )


def _plain(value: Any) -> Any:
    """JSON-like copy (tuples -> lists, floats kept) for comparison and storage."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@torch.no_grad()
def export_descriptor(ckpt_path: str | Path, out: str | Path, *, overwrite: bool = False,
                      class_path: str | None = None) -> Path:
    """Write the backbone of ``ckpt_path``'s module to ``out`` (safetensors + metadata); returns ``out``."""
    ckpt_path, out = Path(ckpt_path).expanduser(), Path(out).expanduser()
    check_destination(out, overwrite)
    if not ckpt_path.is_file():
        raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    summary = read_summary(ckpt_path)
    module = load_module(ckpt_path, summary, class_path)
    descriptor = getattr(module, "descriptor", None)
    if not isinstance(descriptor, Descriptor):
        raise UserError(f"{type(module).__name__} has no 'descriptor' (a models.descriptor.Descriptor); "
                        "lit export needs a module like models.mocov3.MoCoV3Module")
    descriptor = descriptor.to("cpu").eval()
    probe = torch.rand(2, 3, descriptor.input_size, descriptor.input_size, generator=torch.Generator().manual_seed(0))
    expected = descriptor(probe)
    provenance = {
        "exported_by": "lit export",
        "source_checkpoint": str(ckpt_path.resolve()),
        "source_checkpoint_sha256": file_sha256(ckpt_path),
        "suite_version": lit.__version__,
        "module_class": f"{type(module).__module__}.{type(module).__qualname__}",
        "epoch": "" if summary.epoch is None else str(summary.epoch),
        "global_step": "" if summary.global_step is None else str(summary.global_step),
    }
    metadata = export_metadata(module, descriptor, int(expected.shape[-1]), provenance)
    state = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in descriptor.backbone.state_dict().items()}
    from safetensors.torch import save_file

    with atomic_path(out, suffix=SUFFIX) as tmp:
        save_file(state, str(tmp), metadata=metadata.to_strings())
        _check_round_trip(tmp, probe, expected)
    return out


def _check_round_trip(path: Path, probe: Tensor, expected: Tensor) -> None:
    """The written file, loaded as descriptor ``mocov3``, must reproduce the module's features."""
    try:
        loaded = build_descriptor(DESCRIPTOR_NAME, weights=path)(probe)
    except WeightsError as error:
        raise RuntimeError(f"the exported file does not load back as descriptor {DESCRIPTOR_NAME!r}: {error}") from error
    if loaded.shape != expected.shape or not torch.allclose(loaded, expected, atol=_PROBE_TOLERANCE, rtol=_PROBE_TOLERANCE):
        raise RuntimeError("the exported file, loaded as descriptor 'mocov3', gives other features than the module's "
                           "descriptor: descriptor_arch does not describe the backbone (timm kwargs missing?)")


def pipeline_module(ckpt_path: Path, summary: CheckpointSummary, class_path: str | None) -> bool:
    """Whether the checkpoint's module class writes a pipeline folder (it has ``export_pipeline``,
    e.g. :class:`models.text_diffusion.TextDiffusionModule`) rather than a descriptor file."""
    name = class_path or summary.hparams.get("_class_path")
    return bool(name) and callable(getattr(module_class(str(name), ckpt_path), "export_pipeline", None))


def export_text_pipeline(ckpt_path: str | Path, out: str | Path, *, overwrite: bool = False,
                         class_path: str | None = None) -> Path:
    """Write the checkpoint's text-to-image model (EMA weights) as a diffusers pipeline folder that
    ``load_text_pipeline`` and ``lit generate`` read; returns the folder."""
    ckpt_path = Path(ckpt_path).expanduser()
    out = check_pipeline_destination(out, overwrite)
    if not ckpt_path.is_file():
        raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    summary = read_summary(ckpt_path)
    module = load_module(ckpt_path, summary, class_path)
    provenance = {"exported_by": "lit export", "source_checkpoint": str(ckpt_path.resolve()),
                  "source_checkpoint_sha256": file_sha256(ckpt_path), "epoch": summary.epoch,
                  "global_step": summary.global_step}
    return module.export_pipeline(out, overwrite=overwrite, provenance=provenance)  # type: ignore[operator]


def main(argv: Sequence[str] | None = None) -> None:
    """``lit export``: write a checkpoint's trained backbone as a descriptor file (or its pipeline folder)."""
    run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> None:
    """Export with parsed options (:func:`lit.commands.export_options.build_parser`) and say how to use the result."""
    ckpt_path = Path(args.ckpt_path).expanduser()
    if ckpt_path.is_file() and pipeline_module(ckpt_path, read_summary(ckpt_path), args.class_path):
        folder = export_text_pipeline(ckpt_path, args.out, overwrite=args.overwrite, class_path=args.class_path)
        print(f"Wrote the pipeline folder {folder} (EMA weights).\nGenerate from it with "
              f"lit generate --pipeline {folder} --prompts SOURCE --out OUT", flush=True)
        return
    out = export_descriptor(args.ckpt_path, args.out, overwrite=args.overwrite, class_path=args.class_path)
    meta = ExportMetadata.from_strings(export_metadata_strings(out) or {})
    print(f"Wrote {out}: {meta.arch} {meta.arch_kwargs}, {meta.output} features of width {meta.feature_dim}, "
          f"input {meta.input_size} px.\nUse it with --model.init_args.descriptor.name {DESCRIPTOR_NAME} "
          f"--model.init_args.descriptor.weights {out}", flush=True)
