"""RetrievalMetrics under real 2-process DDP (gloo on CPU) equals 1 process.

Each rank feeds the shard that ``DistributedSampler`` gives it for a dataset
whose size does not divide by 2 (so one query is repeated as padding), in
small batches. The gathered, deduplicated metrics must equal the single-process
result to 1e-6. Also covered: a rank with no updates at all, and ranks whose
ranked lists have different lengths.
"""

from __future__ import annotations

import multiprocessing
import socket
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from lit.metrics import RetrievalMetrics, retrieval_metrics

WORLD = 2
NUM_QUERIES = 11  # odd: DistributedSampler pads one rank with a repeated query
LENGTH = 12
KS = (1, 3, 5)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic (relevance, num_positives, junk) with misses and junk; same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    draw = torch.rand(NUM_QUERIES, LENGTH, generator=gen)
    relevance = draw < 0.2
    junk = (draw > 0.85) & ~relevance
    num_positives = relevance.sum(1) + torch.randint(0, 3, (NUM_QUERIES,), generator=gen)
    num_positives = num_positives.clamp(min=1)
    return relevance, num_positives, junk


def _scenarios() -> dict[str, dict]:
    return {
        "sampler_standard": {"ap": "standard", "sampler": True, "pad_rank1": 0},
        "sampler_revisited": {"ap": "revisited", "sampler": True, "pad_rank1": 0},
        "empty_rank1": {"ap": "standard", "sampler": False, "pad_rank1": 0},
        "longer_lists_rank1": {"ap": "standard", "sampler": True, "pad_rank1": 5},
    }


def _shard(rank: int, scenario: dict) -> list[int]:
    if not scenario["sampler"]:
        return list(range(NUM_QUERIES)) if rank == 0 else []  # rank 1 never updates
    sampler = DistributedSampler(range(NUM_QUERIES), num_replicas=WORLD, rank=rank, shuffle=True, seed=3)
    return list(sampler)


def _worker(rank: int, port: int, out_dir: str) -> None:
    # the rank without updates gets torchmetrics' "compute before update" warning
    warnings.filterwarnings("ignore", message="The ``compute`` method of metric")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        relevance, num_positives, junk = _data()
        results = {}
        for name, scenario in _scenarios().items():
            metric = RetrievalMetrics(ks=KS, ap=scenario["ap"])
            rows = torch.tensor(_shard(rank, scenario), dtype=torch.long)
            pad = scenario["pad_rank1"] if rank == 1 else 0
            for start in range(0, rows.numel(), 3):
                batch = rows[start : start + 3]
                tail = torch.zeros(batch.numel(), pad, dtype=torch.bool)
                metric.update(
                    batch,
                    torch.cat([relevance[batch], tail], 1),
                    num_positives[batch],
                    torch.cat([junk[batch], tail], 1),
                )
            results[name] = {key: float(value) for key, value in metric.compute().items()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_gloo_equals_one_process(tmp_path: Path) -> None:
    relevance, num_positives, junk = _data()
    assert (relevance.sum(1) < num_positives).any() and junk.any()
    assert len(_shard(0, _scenarios()["sampler_standard"])) * WORLD > NUM_QUERIES  # padding happens
    # fork: children reuse the imported torch/torchmetrics (spawn re-imports them, ~10 s per child)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    args = (_free_port(), str(tmp_path))
    mp.start_processes(_worker, args=args, nprocs=WORLD, join=True, start_method=method)
    for rank in range(WORLD):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for name, scenario in _scenarios().items():
            expected = retrieval_metrics(relevance, num_positives, junk, ks=KS, ap=scenario["ap"])
            assert results[name].keys() == expected.keys()
            for key, value in expected.items():
                assert results[name][key] == pytest.approx(value, abs=1e-6), (rank, name, key)
