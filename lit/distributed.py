"""Helpers that make results independent of the number of DDP processes.

DistributedSampler pads shards by repeating samples; every sample carries a
global integer ``index``. After gathering, :func:`dedupe_by_index` keeps one
row per index, ordered by index, so 1 and N processes give identical tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors


def dedupe_by_index(index: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Keep the first row of every distinct ``index``, ordered by index.

    Returns ``(unique_index, *rows)`` where each tensor in ``tensors`` has its
    first dimension aligned with ``index``.
    """
    if index.ndim != 1:
        raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
    for t in tensors:
        if t.shape[0] != index.shape[0]:
            raise ValueError(
                f"tensor with {t.shape[0]} rows does not match {index.shape[0]} indices"
            )
    unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
    # first occurrence of every unique value: scatter the smallest position
    positions = torch.arange(index.shape[0], device=index.device)
    first = torch.full((unique.shape[0],), index.shape[0], dtype=torch.long, device=index.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return (unique, *(t[first] for t in tensors))


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, allowing different row counts
    (an image that failed to load is skipped on one rank only); rank order is kept.
    torchmetrics' ``gather_all_tensors`` pads, gathers and trims."""
    if world_size() == 1:
        return tensor
    return torch.cat(gather_all_tensors(tensor), dim=0)


def gather_by_index(index: Tensor, *rows: Tensor) -> tuple[Tensor, ...]:
    """Rows from every rank, one per global ``index``, ordered by index (DDP padding dropped):
    the same tensors for any number of processes."""
    return dedupe_by_index(all_gather_rows(index), *(all_gather_rows(t) for t in rows))


def all_gather_objects(items: list) -> list:
    """Concatenate a picklable list from every rank (small payloads: file names, counts)."""
    if world_size() == 1:
        return list(items)
    gathered: list[list] = [[] for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]
