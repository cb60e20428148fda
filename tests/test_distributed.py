"""Tests for lit.distributed.dedupe_by_index against a plain-Python reference."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from lit.distributed import dedupe_by_index


def test_dedupe_keeps_first_row_per_index_in_index_order() -> None:
    index = torch.tensor([5, 2, 5, 0, 2, 9])
    rows = torch.tensor([[50], [20], [51], [0], [21], [90]])
    labels = torch.tensor([True, False, False, True, True, False])
    unique, kept_rows, kept_labels = dedupe_by_index(index, rows, labels)
    first: dict[int, int] = {}
    for position, value in enumerate(index.tolist()):
        first.setdefault(value, position)
    order = [first[v] for v in sorted(first)]
    assert unique.tolist() == sorted(first)
    assert kept_rows.tolist() == rows[order].tolist()
    assert kept_labels.tolist() == labels[order].tolist()


def test_dedupe_undoes_distributed_sampler_padding() -> None:
    size, world = 7, 3  # 7 does not divide by 3: two samples are repeated as padding
    data = torch.arange(size) * 10
    samplers = [DistributedSampler(range(size), num_replicas=world, rank=r, seed=1) for r in range(world)]
    shards = [list(sampler) for sampler in samplers]
    gathered = torch.tensor([i for shard in shards for i in shard])
    assert gathered.numel() > size
    unique, values = dedupe_by_index(gathered, data[gathered])
    assert unique.tolist() == list(range(size))
    assert torch.equal(values, data)


def test_dedupe_empty_and_errors() -> None:
    unique, values = dedupe_by_index(torch.empty(0, dtype=torch.long), torch.empty(0, 3))
    assert unique.numel() == 0 and values.shape == (0, 3)
    with pytest.raises(ValueError, match="1-D"):
        dedupe_by_index(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match"):
        dedupe_by_index(torch.arange(3), torch.zeros(2))
