"""Embed a dataset with any feature extractor, sharded over DDP ranks, gathered by global index.

One path for every caller that embeds a fixed set of images outside Lightning's
own loops: the replication monitor's training set, the retrieval-metrics
callback's queries and gallery, and small sets of ``lit scan``. Items are dicts
with ``image`` ((3, H, W) float in [0, 1], or ``None`` for a file that failed to
load) and a global integer ``index``; rank r embeds rows ``r, r + W, ...``, and
the result is gathered, deduplicated and ordered by index, so 1 and N processes
return the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from lit.distributed import all_gather_objects, gather_by_index


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


@torch.no_grad()
def embed_dataset(
    model: Callable[[Tensor], Tensor],
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
) -> Embedded:
    """Features of every item of ``dataset`` (this rank's share embedded here, all ranks gathered).

    ``transform`` is applied to each image batch before the model (e.g. a
    horizontal flip). ``gather_device`` is where tensors travel between ranks
    (the strategy's root device: NCCL needs CUDA tensors); default ``device``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rows = list(range(rank, len(dataset), world_size))
    loader = DataLoader(Subset(dataset, rows), batch_size=batch_size, shuffle=False,
                        collate_fn=_collate, num_workers=num_workers)
    features: list[Tensor] = []
    indices: list[Tensor] = []
    skipped: list[str] = []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        skipped.extend(batch["skipped"])
        if batch["image"] is None:
            continue
        images = batch["image"]
        if isinstance(images, Tensor):
            images = images.to(device) if transform is None else transform(images.to(device))
        else:  # differently sized files: the model takes a list (e.g. a Descriptor)
            images = [image.to(device) if transform is None else transform(image[None].to(device))[0]
                      for image in images]
        features.append(model(images).float().cpu())
        indices.append(batch["index"])
    if not features:  # a rank with nothing to embed still joins the gather, with the right width
        probe = next((dataset[i]["image"] for i in range(len(dataset)) if dataset[i]["image"] is not None), None)
        if probe is None:
            raise ValueError(f"{desc}: no item of the {len(dataset)} could be loaded")
        probe = probe[None].to(device)
        features = [model(transform(probe) if transform is not None else probe).float().cpu()[:0]]
        indices = [torch.empty(0, dtype=torch.long)]
    target = device if gather_device is None else gather_device
    index, gathered = gather_by_index(torch.cat(indices).to(target), torch.cat(features).to(target))
    return Embedded(index.cpu(), gathered.cpu(), all_gather_objects(skipped))
