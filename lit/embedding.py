"""The one path from images to descriptor features, for every caller of the suite.

- :class:`Embedder`: a model (any callable from images to features, e.g. a
  :class:`models.descriptor.Descriptor`) applied to one batch on a device, under bfloat16
  autocast on CUDA and in float32 on the CPU (``precision``: ``auto`` | ``32`` | ``bf16``,
  :func:`autocast_dtype`); features come back as float32. :meth:`Embedder.feature_shape`
  is the one probe of the per-sample feature shape (for a store's manifest before any batch).
- :class:`FeatureBuffer`: the rows ``(global index, features)`` one process embedded;
  :meth:`FeatureBuffer.gather` is the one DDP gather: every rank's rows, one per index, ordered
  by index (``DistributedSampler`` padding dropped), so 1 and N processes give the same tensors.
- :func:`embed_dataset`: both over a dataset of ``{"image", "index"}`` items (``image`` a
  (3, H, W) float tensor in [0, 1], or ``None`` for a file that failed to load): rank r embeds
  rows ``r, r + W, ...``, and the result is gathered.

Callers: ``lit test`` (:class:`models.retrieval.RetrievalEvaluator`: an Embedder per test
batch, a FeatureBuffer per loader), extraction to a store
(:class:`models.extract.DescriptorExtractor`'s ``predict_step``: an Embedder per batch), the
retrieval-metrics callback and the replication monitor (:func:`embed_dataset`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from lit.distributed import all_gather_objects, dedupe_by_index, gather_by_index

Precision = Literal["auto", "32", "bf16"]
"""``auto``: bfloat16 autocast on a CUDA device that supports it, float32 elsewhere; ``32``: never
autocast; ``bf16``: always autocast to bfloat16."""

Images = Tensor | Sequence[Tensor]


def autocast_dtype(device: torch.device | str, precision: Precision) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: run as the model is, float32)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "32":
        return None
    if precision != "auto":
        raise ValueError(f"precision must be auto, 32 or bf16, got {precision!r}")
    cuda = torch.device(device).type == "cuda"
    return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None


def step_precision(precision: Precision, trainer_precision: str) -> Precision:
    """``precision`` inside a Lightning step: ``auto`` adds no autocast of its own when the trainer's
    precision is not float32 (``bf16-mixed`` / ``16-mixed`` already autocast the step)."""
    return "32" if precision == "auto" and str(trainer_precision) not in ("32", "32-true") else precision


@dataclass(frozen=True)
class Embedder:
    """Features of image batches: ``model`` on ``device``, autocast per ``precision``, float32 out.

    ``images`` is a (B, 3, H, W) tensor or a list of (3, H, W) tensors of different sizes (the
    model takes a list then, as a Descriptor does); ``transform`` is applied to the images before
    the model (e.g. a horizontal flip). Features stay on ``device``.
    """

    model: Callable[[Images], Tensor]
    device: torch.device | str = "cpu"
    precision: Precision = "auto"
    transform: Callable[[Tensor], Tensor] | None = None

    @torch.no_grad()
    def __call__(self, images: Images) -> Tensor:
        device = torch.device(self.device)
        if isinstance(images, Tensor):
            batch: Images = images.to(device, non_blocking=True)
            if self.transform is not None:
                batch = self.transform(batch)
        else:
            batch = [image.to(device) if self.transform is None else self.transform(image[None].to(device))[0]
                     for image in images]
        dtype = autocast_dtype(device, self.precision)
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            features = self.model(batch)
        return features.float()

    def feature_shape(self, example: Tensor) -> tuple[int, ...]:
        """Per-sample feature shape, ``(D,)`` or ``(T, D)``, from one forward pass of ``example``
        (one image, (3, H, W) or (1, 3, H, W))."""
        batch = example if example.ndim == 4 else example[None]
        return tuple(self(batch[:1]).shape[1:])


class FeatureBuffer:
    """The rows ``(global index, features)`` this process embedded, in the order they came."""

    def __init__(self) -> None:
        self._index: list[Tensor] = []
        self._features: list[Tensor] = []

    def __len__(self) -> int:
        return sum(int(index.numel()) for index in self._index)

    def add(self, index: Tensor, features: Tensor) -> None:
        """Append rows: ``index`` (B,) integers, ``features`` (B, ...)."""
        if index.ndim != 1 or index.shape[0] != features.shape[0]:
            raise ValueError(f"index of shape {tuple(index.shape)} does not match features {tuple(features.shape)}")
        self._index.append(index.to(features.device, torch.long))
        self._features.append(features)

    def local(self) -> tuple[Tensor, Tensor | None]:
        """This process's rows, one per index, ordered by index (features None when it has none)."""
        if not self._features:
            return torch.zeros(0, dtype=torch.long), None
        index, features = dedupe_by_index(torch.cat(self._index), torch.cat(self._features))
        return index, features

    def gather(self, device: torch.device | str | None = None, *,
               nothing: str = "no process embedded any image") -> tuple[Tensor, Tensor]:
        """Every process's rows, one per index, ordered by index, on ``device`` (the strategy's root
        device: NCCL needs CUDA tensors; default: where the features are). A collective: every rank
        calls it. A rank without rows takes the feature shape from the others; ValueError(``nothing``)
        when no rank has any."""
        index, features = self.local()
        shapes = all_gather_objects([None if features is None else (tuple(features.shape[1:]), features.dtype)])
        known = next((shape for shape in shapes if shape is not None), None)
        if known is None:
            raise ValueError(nothing)
        if features is None:
            features = torch.zeros((0, *known[0]), dtype=known[1])
        target = features.device if device is None else torch.device(device)
        gathered_index, gathered = gather_by_index(index.to(target), features.to(target))
        return gathered_index, gathered


@dataclass(frozen=True)
class Embedded:
    """Features ``(N, ...)`` float32 on the CPU, their global ``index`` (N,) ascending, skipped item names."""

    index: Tensor
    features: Tensor
    skipped: list[str]


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack loaded images (a list when their sizes differ: files), list the names of the items that failed."""
    kept = [item for item in batch if item["image"] is not None]
    images = [item["image"] for item in kept]
    same_size = len({tuple(image.shape) for image in images}) == 1
    return {
        "image": (torch.stack(images) if same_size else images) if kept else None,
        "index": torch.tensor([int(item["index"]) for item in kept], dtype=torch.long),
        "skipped": [str(item.get("path", f"index {item['index']}")) for item in batch if item["image"] is None],
    }


def embed_dataset(
    model: Callable[[Images], Tensor],
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    gather_device: torch.device | str | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "embed",
    precision: Precision = "auto",
) -> Embedded:
    """Features of every item of ``dataset`` (this rank's share embedded here by an :class:`Embedder`,
    all ranks gathered by a :class:`FeatureBuffer`).

    ``transform`` is applied to each image batch before the model (e.g. a horizontal flip).
    ``gather_device`` is where tensors travel between ranks (the strategy's root device: NCCL
    needs CUDA tensors); default ``device``. ``precision``: see :data:`Precision`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = list(range(rank, len(dataset), world_size))  # type: ignore[arg-type]
    loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, shuffle=False,
                        collate_fn=_collate, num_workers=num_workers)
    embed = Embedder(model, device, precision, transform)
    buffer = FeatureBuffer()
    skipped: list[str] = []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        skipped.extend(batch["skipped"])
        if batch["image"] is not None:
            buffer.add(batch["index"], embed(batch["image"]).cpu())
    nothing = f"{desc}: no item of the {len(dataset)} could be loaded"  # type: ignore[arg-type]
    index, features = buffer.gather(device if gather_device is None else gather_device, nothing=nothing)
    return Embedded(index.cpu(), features.cpu(), all_gather_objects(skipped))
