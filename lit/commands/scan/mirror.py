"""The mirrored training set of ``lit scan --match_mirrors``.

Each training image is read back from the scan's input (:meth:`FeatureSource.image`, the
reader of the report's thumbnails: folder, file list or tar), flipped horizontally and embedded
with the scan's descriptor through :func:`lit.embedding.embed_dataset` (the path the
replication monitor embeds its mirrors with), row for row with the training set. The features
are held in memory (float32, one row per training image): mirror-aware matching doubles the
search and is off by default, as in the monitor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lit.commands.scan.sources import FeatureSource, MemorySource
from lit.embedding import embed_dataset
from lit.errors import UserError
from models.descriptor_config import DescriptorConfig


def mirror(images: Tensor) -> Tensor:
    """Horizontal flip of (B, C, H, W) images."""
    return torch.flip(images, dims=[-1])


class TrainingImages(Dataset):
    """The training set's images, read back from its input, as ``{"image", "index"}`` items."""

    def __init__(self, training: FeatureSource) -> None:
        self.training = training

    def __len__(self) -> int:
        return self.training.num_rows

    def __getitem__(self, row: int) -> dict[str, Any]:
        image = self.training.image(row)
        if image is None:
            key = self.training.keys_of([row])[0]
            raise UserError(f"--match_mirrors: training image {key} (row {row}) cannot be read back, and its mirror "
                            "is embedded from the image")
        return {"image": image, "index": row}


def mirrored_training(training: FeatureSource, config: DescriptorConfig, *, device: torch.device,
                      batch_size: int, num_workers: int = 0, progress: bool = True) -> MemorySource:
    """Features of the horizontally flipped training images, row for row (a :class:`MemorySource`)."""
    descriptor = config.build().to(device)
    descriptor.requires_grad_(False)
    embedded = embed_dataset(descriptor, TrainingImages(training), batch_size=batch_size, device=device,
                             transform=mirror, num_workers=num_workers, progress=progress,
                             desc="mirrored training images")
    if not torch.equal(embedded.index, torch.arange(training.num_rows)):
        raise UserError(f"--match_mirrors: {training.num_rows - embedded.index.numel()} training images could not "
                        "be read back for their mirrors")
    manifest = {"kind": "memory", "mirrored": True, "of": training.manifest.get("root", training.name)}
    return MemorySource("training_mirrored", embedded.features, training.keys, manifest=manifest)
