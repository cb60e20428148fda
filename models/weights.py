"""Reading descriptor weight files from local disk, with one-line errors.

Nothing here downloads: every loader takes a local path. Whatever goes wrong
(missing file, unreadable file, keys or shapes that do not fit) surfaces as a
:class:`WeightsError` whose message is ONE line naming the file, the expected
format and where such weights are published, so a config typo is fixed
without reading a stack trace.

The :class:`WeightsLayout` classes at the end describe the published
checkpoint layouts (SSCD TorchScript, torchvision-style ResNet keys, timm /
DINO / MoCo v3 / OpenAI CLIP ViT keys, timm / official Swin keys) and map them
onto timm modules with a strict ``load_state_dict``.
"""

from __future__ import annotations

import collections
import json
import pickle
import types
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from timm.models import swin_transformer, vision_transformer
from torch import Tensor, nn

from lit.errors import UserError
from lit.io import shorten
from models.pooling import PooledTrunk

_MAX_KEYS_SHOWN = 3


class WeightsError(UserError, ValueError):
    """A weights file is missing, unreadable or does not fit the architecture (one-line message).

    A :class:`lit.errors.UserError` (``lit`` prints it as ``error: ...`` and exits 2); still a
    ``ValueError`` for callers that catch that."""


@dataclass(frozen=True)
class WeightsFormat:
    """What a descriptor expects on disk and where such files are published."""

    description: str
    source: str


def weights_error(path: str | Path | None, fmt: WeightsFormat, problem: str) -> WeightsError:
    """Build a :class:`WeightsError` with a single-line message."""
    where = f"{path}" if path is not None else "<no file given>"
    message = f"{problem}: {where} (expected {fmt.description}; published at {fmt.source})"
    return WeightsError(" ".join(message.split()))


# --------------------------------------------------------------------------- reading


def is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript zip (it holds ``constants.pkl``); plain ``torch.save`` zips do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def read_checkpoint(path: str | Path, fmt: WeightsFormat) -> Any:
    """Load a weights file on CPU: safetensors, TorchScript, or a ``torch.save`` pickle.

    Pickles load with ``weights_only=True``; a checkpoint that also pickled
    training objects (optimizers, argparse namespaces) is retried with
    :func:`lenient_torch_load`, which never executes code from the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise weights_error(path, fmt, "weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if is_torchscript_archive(path):
            with warnings.catch_warnings():  # SSCD and OpenAI CLIP only ship TorchScript
                warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
                return torch.jit.load(str(path), map_location="cpu")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return lenient_torch_load(path)
    except WeightsError:
        raise
    except Exception as error:  # any reader failure means the file is not usable
        raise weights_error(path, fmt, f"unreadable weights file ({_brief(error)})") from error


class _Opaque:
    """Inert stand-in for any pickled object whose class is not allow-listed."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Iterable[Any]) -> None:
        pass


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): nn.Parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}


_TENSOR_REBUILDERS = frozenset(
    {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter", "_rebuild_parameter_with_state"}
)


class _LenientUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding globals; every other class becomes :class:`_Opaque`."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch._utils" and name in _TENSOR_REBUILDERS:
            return getattr(torch._utils, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _Opaque


def _lenient_load(file: Any, **kwargs: Any) -> Any:
    return _LenientUnpickler(file, **kwargs).load()


_LENIENT_PICKLE = types.ModuleType("lenient_pickle")
_LENIENT_PICKLE.Unpickler = _LenientUnpickler  # type: ignore[attr-defined]
_LENIENT_PICKLE.load = _lenient_load  # type: ignore[attr-defined]


def lenient_torch_load(path: str | Path) -> Any:
    """``torch.load`` that keeps tensors and containers and replaces unknown objects by inert stubs.

    Needed for released checkpoints that pickled training objects next to the
    weights (MultiGrain saved ``optimizer.state_dict`` unevaluated); no code
    from the file runs, unlike ``weights_only=False``.
    """
    return torch.load(Path(path), map_location="cpu", weights_only=False, pickle_module=_LENIENT_PICKLE)


# --------------------------------------------------------------------------- state dicts


def as_state_dict(obj: Any, path: Path, fmt: WeightsFormat, key: str | None = None) -> dict[str, Tensor]:
    """The tensor mapping in a checkpoint: ``obj[key]`` when present, a TorchScript module's state."""
    if isinstance(obj, torch.jit.ScriptModule):
        obj = obj.state_dict()
    if key is not None and isinstance(obj, Mapping) and key in obj:
        obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        got = type(obj).__name__ if not isinstance(obj, Mapping) else "an empty mapping"
        where = f" under key '{key}'" if key is not None else ""
        raise weights_error(path, fmt, f"no state dict{where} in the file (got {got})")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise weights_error(path, fmt, f"not a state dict: non-tensor entries {_examples(bad)}")
    return dict(obj)


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keep the keys that start with ``prefix``, without it."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def remove_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove ``prefix`` where present; other keys stay (and a strict load reports them)."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def drop_keys(state: Mapping[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    """Remove keys starting with any of ``prefixes`` (classifier heads, projectors)."""
    prefixes = tuple(prefixes)
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def load_strict(module: nn.Module, state: Mapping[str, Tensor], path: Path, fmt: WeightsFormat) -> None:
    """``module.load_state_dict(state, strict=True)``; any mismatch becomes a one-line WeightsError."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys {_examples(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys {_examples(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (file vs model) {_examples(mismatched)}")
    if problems:
        raise weights_error(path, fmt, "state dict does not fit the architecture: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def _brief(error: BaseException, limit: int = 200) -> str:
    """``Type: message`` of an exception, on one line and at most ``limit`` characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _examples(items: list[str]) -> str:
    return f"[{shorten(items, _MAX_KEYS_SHOWN)}]"


# --------------------------------------------------------------------------- layouts of published checkpoints


class WeightsLayout(ABC):
    """How one published checkpoint layout is read and put into a backbone.

    ``read`` needs no model, so a missing, unreadable or mis-keyed file fails
    before a large model is built; ``apply`` loads strictly into the backbone
    and returns the backbone to use.
    """

    #: ``apply`` returns a model of its own (ignores ``backbone``): no backbone need be built.
    replaces_backbone: ClassVar[bool] = False

    @abstractmethod
    def read(self, path: Path, fmt: WeightsFormat) -> Any: ...

    @abstractmethod
    def apply(self, backbone: nn.Module | None, content: Any, path: Path, fmt: WeightsFormat) -> nn.Module: ...


@dataclass(frozen=True)
class TorchScriptModel(WeightsLayout):
    """A TorchScript archive (SSCD's release) that replaces the eager backbone."""

    replaces_backbone: ClassVar[bool] = True

    def read(self, path: Path, fmt: WeightsFormat) -> Any:
        module = read_checkpoint(path, fmt)
        if not isinstance(module, torch.jit.ScriptModule):
            raise weights_error(path, fmt, f"not a TorchScript archive (got {type(module).__name__})")
        return module

    def apply(self, backbone: nn.Module | None, content: Any, path: Path, fmt: WeightsFormat) -> nn.Module:
        return content


@dataclass(frozen=True)
class ResNetTrunkState(WeightsLayout):
    """Torchvision-style ResNet keys (under ``key``, behind ``prefix``) into a PooledTrunk's timm trunk.

    ``ignore``: key prefixes dropped on purpose (classifier heads);
    ``gem_key``: a scalar entry holding the GeM exponent (MultiGrain's
    ``pool.p`` buffer), which then replaces the pooling's default p.
    """

    key: str | None = None
    prefix: str = ""
    ignore: tuple[str, ...] = ()
    gem_key: str | None = None

    def read(self, path: Path, fmt: WeightsFormat) -> Any:
        state = drop_keys(as_state_dict(read_checkpoint(path, fmt), path, fmt, key=self.key), self.ignore)
        exponent = None
        if self.gem_key is not None and self.gem_key in state:
            value = state.pop(self.gem_key)
            if value.numel() != 1 or not float(value) > 0:
                raise weights_error(path, fmt, f"'{self.gem_key}' must be one positive GeM exponent, got {value}")
            exponent = float(value)
        if self.prefix:
            if not any(k.startswith(self.prefix) for k in state):
                raise weights_error(path, fmt, f"no keys start with '{self.prefix}'")
            state = remove_prefix(state, self.prefix)
        return state, exponent

    def apply(self, backbone: nn.Module, content: Any, path: Path, fmt: WeightsFormat) -> nn.Module:
        if not isinstance(backbone, PooledTrunk):
            raise TypeError(f"ResNetTrunkState loads into a PooledTrunk, got {type(backbone).__name__}")
        state, exponent = content
        load_strict(backbone.trunk, state, path, fmt)
        if exponent is not None:
            backbone.pool.p = exponent
        return backbone


@dataclass(frozen=True)
class TimmViTState(WeightsLayout):
    """A ViT state dict (timm, DINO, OpenAI CLIP or MoCo v3 layout) into a timm VisionTransformer.

    ``key``: the checkpoint entry holding the state dict (MoCo: 'state_dict');
    ``prefixes``: the first present is kept and stripped, other keys (MoCo's
    momentum encoder, predictor) are ignored on purpose; ``ignore``: key
    prefixes dropped after timm's conversion (classifier / projector heads).
    timm's filter converts OpenAI CLIP keys and resamples position embeddings
    to the model's input size; a different patch size is refused.
    """

    key: str | None = None
    prefixes: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ("head.",)

    def read(self, path: Path, fmt: WeightsFormat) -> Any:
        state = as_state_dict(read_checkpoint(path, fmt), path, fmt, key=self.key)
        if self.prefixes:
            prefix = next((p for p in self.prefixes if any(k.startswith(p) for k in state)), None)
            if prefix is None:
                raise weights_error(path, fmt, f"no keys start with {' or '.join(repr(p) for p in self.prefixes)}")
            state = strip_prefix(state, prefix)
        return state

    def apply(self, backbone: nn.Module, content: Any, path: Path, fmt: WeightsFormat) -> nn.Module:
        kernel = content.get("patch_embed.proj.weight", content.get("visual.conv1.weight"))
        expected = tuple(backbone.patch_embed.proj.weight.shape[-2:])
        if kernel is not None and tuple(kernel.shape[-2:]) != expected:
            problem = f"patch size {tuple(kernel.shape[-2:])} does not match the model's {expected}"
            raise weights_error(path, fmt, problem)
        state = _convert(vision_transformer.checkpoint_filter_fn, content, backbone, path, fmt)
        load_strict(backbone, drop_keys(state, self.ignore), path, fmt)
        return backbone


@dataclass(frozen=True)
class SwinState(WeightsLayout):
    """A timm or official (``{'model': ...}``) Swin state dict; the classifier head is ignored."""

    def read(self, path: Path, fmt: WeightsFormat) -> Any:
        return as_state_dict(read_checkpoint(path, fmt), path, fmt, key="model")

    def apply(self, backbone: nn.Module, content: Any, path: Path, fmt: WeightsFormat) -> nn.Module:
        state = _convert(swin_transformer.checkpoint_filter_fn, content, backbone, path, fmt)
        load_strict(backbone, drop_keys(state, ("head.fc.",)), path, fmt)
        return backbone


def _convert(
    filter_fn: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]],
    state: dict[str, Tensor],
    model: nn.Module,
    path: Path,
    fmt: WeightsFormat,
) -> dict[str, Tensor]:
    """Run a timm checkpoint filter; its failures become WeightsError."""
    try:
        return filter_fn(dict(state), model)
    except Exception as error:
        raise weights_error(path, fmt, f"cannot convert the state dict ({_brief(error)})") from error


# --------------------------------------------------------------------------- files written by `lit export`

#: safetensors metadata marker of a descriptor written by ``lit export`` (key ``format``).
EXPORT_FORMAT = "lit-replication descriptor"
EXPORT_FORMAT_VERSION = "1"
_EXPORT_FIELDS = ("arch", "arch_kwargs", "input_size", "crop_pct", "interpolation", "mean", "std", "output",
                  "feature_dim")


@dataclass(frozen=True)
class ExportMetadata:
    """What rebuilds an exported backbone: ``timm.create_model(arch, **arch_kwargs)`` + preprocessing + output.

    ``provenance`` holds free-form strings (source checkpoint and its SHA-256, suite
    version, module class, epoch / step). Stored as safetensors metadata (string
    values; structured fields JSON-encoded) next to the weights.
    """

    arch: str
    arch_kwargs: dict[str, Any]
    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    output: str
    feature_dim: int
    provenance: dict[str, str] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        """The safetensors metadata (all values strings), marker included."""
        values = {name: json.dumps(getattr(self, name)) for name in _EXPORT_FIELDS}
        values.update(arch=self.arch, interpolation=self.interpolation, output=self.output)  # plain strings
        return {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, **values,
                **{f"provenance.{k}": str(v) for k, v in self.provenance.items()}}

    @classmethod
    def from_strings(cls, metadata: Mapping[str, str]) -> ExportMetadata:
        """Parse :meth:`to_strings` output; ValueError names the missing or malformed field."""
        missing = [name for name in _EXPORT_FIELDS if name not in metadata]
        if missing:
            raise ValueError(f"metadata lacks {', '.join(missing)}")
        try:
            kwargs = json.loads(metadata["arch_kwargs"])
            mean, std = json.loads(metadata["mean"]), json.loads(metadata["std"])
            parsed = cls(
                arch=metadata["arch"],
                arch_kwargs=kwargs,
                input_size=int(json.loads(metadata["input_size"])),
                crop_pct=float(json.loads(metadata["crop_pct"])),
                interpolation=metadata["interpolation"],
                mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
                std=tuple(float(v) for v in std),  # type: ignore[arg-type]
                output=metadata["output"],
                feature_dim=int(json.loads(metadata["feature_dim"])),
                provenance={k.removeprefix("provenance."): v for k, v in metadata.items()
                            if k.startswith("provenance.")},
            )
        except (ValueError, TypeError) as error:
            raise ValueError(f"malformed metadata ({_brief(error)})") from error
        if not isinstance(kwargs, dict) or len(parsed.mean) != 3 or len(parsed.std) != 3:
            raise ValueError("malformed metadata (arch_kwargs must be a mapping, mean and std three values)")
        if parsed.output not in ("global", "tokens") or parsed.interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"malformed metadata (output {parsed.output!r}, interpolation {parsed.interpolation!r})")
        return parsed


def export_metadata_strings(path: str | Path) -> dict[str, str] | None:
    """The safetensors metadata of ``path`` when ``lit export`` wrote it (marker present), else None.

    Reads the header only; a missing, non-safetensors or unmarked file gives None.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # not a safetensors file at all
        return None
    return dict(metadata) if metadata.get("format") == EXPORT_FORMAT else None


def read_export_metadata(path: str | Path, fmt: WeightsFormat) -> ExportMetadata:
    """The :class:`ExportMetadata` of a ``lit export`` file; one-line WeightsError otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise weights_error(path, fmt, "weights file not found")
    strings = export_metadata_strings(path)
    if strings is None:
        raise weights_error(path, fmt, "not a file written by lit export (a safetensors file whose metadata "
                                       f"has format={EXPORT_FORMAT!r})")
    version = strings.get("format_version")
    if version != EXPORT_FORMAT_VERSION:
        raise weights_error(path, fmt, f"lit export format version {version!r}, this suite reads "
                                       f"{EXPORT_FORMAT_VERSION!r}")
    try:
        return ExportMetadata.from_strings(strings)
    except ValueError as error:
        raise weights_error(path, fmt, f"lit export file with {error}") from error


@dataclass(frozen=True)
class ExportedState(WeightsLayout):
    """The backbone state of a ``lit export`` file into the timm model built from its metadata.

    Strict load; a ViT's position embeddings are resampled by timm when the
    descriptor is built for another input size.
    """

    def read(self, path: Path, fmt: WeightsFormat) -> Any:
        read_export_metadata(path, fmt)
        try:  # safetensors whatever the file is called
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        except Exception as error:
            raise weights_error(path, fmt, f"unreadable weights file ({_brief(error)})") from error
        return as_state_dict(state, path, fmt)

    def apply(self, backbone: nn.Module, content: Any, path: Path, fmt: WeightsFormat) -> nn.Module:
        state = content
        if isinstance(backbone, vision_transformer.VisionTransformer):
            state = _convert(vision_transformer.checkpoint_filter_fn, content, backbone, path, fmt)
        load_strict(backbone, state, path, fmt)
        return backbone
