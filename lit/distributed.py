"""Helpers that make results independent of the number of DDP processes.

DistributedSampler pads shards by repeating samples; every sample carries a
global integer ``index``. After gathering, :func:`dedupe_by_index` keeps one
row per index, ordered by index, so 1 and N processes give identical tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
