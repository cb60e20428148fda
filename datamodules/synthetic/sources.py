"""Source images of a synthetic set: refs with stable ids, and the seeded split of the
sources into query images and the pool that backgrounds / paste targets come from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lit.io import list_images
from lit.seeding import derive_seed


@dataclass(frozen=True)
class SourceRef:
    """A source image: stable ``id`` (seeds and manifests use it) and its file."""

    id: str
    path: Path


def split_queries_and_pool(
    count: int, seed: int, num_queries: int | None, pool_fraction: float, has_pool: bool
) -> tuple[list[int], list[int]]:
    """Seeded, disjoint (query rows, pool rows) over ``count`` sources, both sorted.

    A permutation from ``derive_seed(seed, "split")``; without an explicit pool its
    first ``round(count * pool_fraction)`` entries are the pool; queries are the next
    ``num_queries`` (None: all the rest)."""
    if count == 0:
        raise ValueError("no source images")
    if num_queries is not None and num_queries < 1:
        raise ValueError(f"num_queries must be >= 1 or null (all), got {num_queries}")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(derive_seed(seed, "split"))).tolist()
    num_pool = 0
    if not has_pool:
        if not 0.0 < pool_fraction < 1.0:
            raise ValueError(f"pool_fraction must be in (0, 1), got {pool_fraction}")
        num_pool = round(count * pool_fraction)
        if num_pool == 0 or num_pool == count:
            raise ValueError(f"pool_fraction {pool_fraction} of {count} images leaves no pool or no queries")
    candidates = order[num_pool:]
    if num_queries is not None:
        if num_queries > len(candidates):
            raise ValueError(f"num_queries {num_queries} exceeds the {len(candidates)} images left for queries "
                             f"({count} sources, {num_pool} in the pool); set num_queries to at most "
                             f"{len(candidates)}, or null for all of them")
        candidates = candidates[:num_queries]
    return sorted(candidates), sorted(order[:num_pool])


def split_sources(sources: Sequence[SourceRef], seed: int, num_queries: int | None, pool_fraction: float,
                  pool_dir: str | Path | None) -> tuple[list[int], list[SourceRef]]:
    """Query rows of ``sources`` and the paste pool: the images of ``pool_dir`` when given,
    else the seeded ``pool_fraction`` of ``sources`` that :func:`split_queries_and_pool`
    keeps apart from the queries."""
    query_rows, pool_rows = split_queries_and_pool(len(sources), seed, num_queries, pool_fraction,
                                                   has_pool=pool_dir is not None)
    pool = folder_refs(pool_dir) if pool_dir is not None else [sources[r] for r in pool_rows]
    return query_rows, pool


def folder_refs(folder: str | Path) -> list[SourceRef]:
    """Images under ``folder`` as refs with id = path relative to it, without suffix."""
    folder = Path(folder)
    return [SourceRef(str(p.relative_to(folder).with_suffix("")), p) for p in list_images(folder)]


def require_disjoint(queries: Sequence[SourceRef], pool: Sequence[SourceRef]) -> None:
    """Each synthetic image must have exactly one source: no pool image may be a query."""
    shared = {p.path.resolve() for p in queries} & {p.path.resolve() for p in pool}
    if shared:
        raise ValueError(f"the pool shares {len(shared)} image(s) with the queries (e.g. {sorted(shared)[0]}); "
                         "use a pool folder disjoint from the query images")


__all__ = ["SourceRef", "folder_refs", "require_disjoint", "split_queries_and_pool", "split_sources"]
