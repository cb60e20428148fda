"""A seeded, resumable training sampler (and the DataLoader Lightning sees as resumable).

:class:`ResumableShuffleSampler` orders an epoch as a pure function of ``(seed, epoch)``
and shards it over DDP ranks exactly as ``torch.utils.data.DistributedSampler`` does
(pad by repeating the head of the order so every rank gets the same count; or drop the
tail with ``drop_last``). Being a ``DistributedSampler``, Lightning leaves it in place
under DDP instead of wrapping it.

Each item it yields is ``(index, draw_seed)``: the dataset index and a seed of that one
draw (``derive_seed(seed, epoch, position in the epoch's order)``), so a dataset can
draw its augmentation from a generator of its own, whatever worker or process loads it.

Resume: :meth:`ResumableShuffleSampler.resume` sets the epoch and how many of this
rank's items that epoch already consumed; the next iteration starts after them (once;
later epochs start at their beginning).

:class:`WeightedResumableSampler` draws an epoch with replacement, item ``i`` with probability
``weights[i] / sum(weights)`` (the controlled duplication of the follow-up study, whose code
uses ``torch.utils.data.WeightedRandomSampler``), and shards, seeds and resumes the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence, Sized
from itertools import accumulate
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from lit.seeding import derive_seed

SeededIndex = tuple[int, int]


def epoch_order(length: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The whole epoch's order of ``range(length)``: a permutation seeded by ``(seed, epoch)`` (or identity)."""
    if not shuffle:
        return list(range(length))
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(length, generator=generator).tolist()


def rank_share(order: list[int], num_replicas: int, rank: int, drop_last: bool) -> list[int]:
    """This rank's items of an epoch order, as ``DistributedSampler`` splits it: padded (or
    truncated with ``drop_last``) to a multiple of ``num_replicas``, then every ``num_replicas``-th item."""
    if drop_last and len(order) % num_replicas:
        total = (len(order) // num_replicas) * num_replicas
        order = order[:total]
    else:
        total = math.ceil(len(order) / num_replicas) * num_replicas
        pad = total - len(order)
        while pad > 0:  # repeat the head (several times when the set is smaller than the padding)
            order = order + order[:pad]
            pad = total - len(order)
    return order[rank:total:num_replicas]


class ResumableShuffleSampler(DistributedSampler):
    """Seeded shuffling sampler whose epoch order depends only on ``(seed, epoch)``; resumable mid-epoch.

    Args:
        dataset: the dataset (only its length is used).
        seed: seed of every epoch's order and of each draw's seed.
        num_replicas: DDP processes (1 without DDP).
        rank: this process's rank.
        shuffle: permute each epoch (otherwise the index order).
        drop_last: drop the tail that does not divide by ``num_replicas`` instead of padding.
    """

    def __init__(self, dataset: Sized, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, drop_last: bool = False) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank {rank} of {num_replicas}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch; a new epoch starts at its first item
        (setting the current epoch again keeps a pending resume position)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.start = 0

    def resume(self, epoch: int, consumed: int) -> None:
        """Continue ``epoch`` after the first ``consumed`` items of this rank (``consumed`` >= the
        rank's share rolls over to the start of the next epoch)."""
        if epoch < 0 or consumed < 0:
            raise ValueError(f"epoch and consumed must be >= 0, got {epoch}, {consumed}")
        if consumed >= self.num_samples:
            epoch, consumed = epoch + 1, 0
        self.epoch, self.start = epoch, consumed

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, all of them (no resume offset)."""
        full = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)  # type: ignore[arg-type]
        return rank_share(full, self.num_replicas, self.rank, self.drop_last)

    def __iter__(self) -> Iterator[SeededIndex]:  # type: ignore[override]
        epoch, start = self.epoch, self.start
        self.start = 0  # a resume offset applies to one iteration only
        mine = self.order(epoch)
        # the draw seed names the item's place in the whole epoch order (rank-independent)
        positions = range(self.rank, self.total_size, self.num_replicas)
        for position, index in list(zip(positions, mine))[start:]:
            yield index, derive_seed(self.seed, epoch, position)


def weighted_draws(weights: Sequence[float], count: int, seed: int) -> list[int]:
    """``count`` items of ``range(len(weights))`` drawn with replacement, item ``i`` with probability
    ``weights[i] / sum(weights)``: float64 uniforms from a generator seeded by ``seed``, looked up
    in the cumulative weights (summed in order in float64, so the draw is the same on every machine)."""
    if not weights or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    cumulative = torch.tensor(list(accumulate(float(w) for w in weights)), dtype=torch.float64)
    uniforms = torch.rand(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    rows = torch.searchsorted(cumulative, uniforms * cumulative[-1], right=True)
    return rows.clamp_(max=len(weights) - 1).tolist()


class WeightedResumableSampler(ResumableShuffleSampler):
    """Draws with replacement by weight; an epoch's draws depend only on ``(seed, epoch)``; resumable.

    An epoch is ``length`` draws (e.g. ``ceil(repeats * sum(weights))``, so that with integer weights
    an item of weight ``w`` is drawn ``w * repeats`` times per epoch in expectation), the global
    sequence :func:`weighted_draws` ``(weights, length, derive_seed(seed, epoch))``. Each rank takes
    its share of the positions as :func:`rank_share` splits them (padding repeats the head), so one
    process and several see the same global sequence. Each item it yields is ``(row, draw, draw_seed)``:
    the drawn row, the draw's global index ``epoch * length + position`` and
    ``derive_seed(seed, epoch, position)``; a padded position repeats the draw it copies (same
    index, same seed), so gathering by index removes the padding.

    Args:
        weights: one non-negative weight per item of ``dataset``'s rows.
        length: draws per epoch (over all ranks).
        seed, num_replicas, rank, drop_last: as :class:`ResumableShuffleSampler`.
    """

    def __init__(self, weights: Sequence[float], length: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, drop_last: bool = False) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        super().__init__(range(length), seed=seed, num_replicas=num_replicas, rank=rank, drop_last=drop_last)
        self.weights = [float(w) for w in weights]
        weighted_draws(self.weights, 0, 0)  # checks the weights now, not at the first epoch
        self.length = length

    def positions(self) -> list[int]:
        """This rank's positions in every epoch's global sequence (padding: positions of the head)."""
        return rank_share(list(range(self.length)), self.num_replicas, self.rank, self.drop_last)

    def draws(self, epoch: int) -> list[int]:
        """The whole epoch's global sequence of drawn rows (every rank's)."""
        return weighted_draws(self.weights, self.length, derive_seed(self.seed, epoch))

    def order(self, epoch: int) -> list[int]:
        """This rank's rows for ``epoch``, all of them (no resume offset)."""
        rows = self.draws(epoch)
        return [rows[p] for p in self.positions()]

    def __iter__(self) -> Iterator[tuple[int, int, int]]:  # type: ignore[override]
        epoch, start = self.epoch, self.start
        self.start = 0  # a resume offset applies to one iteration only
        rows = self.draws(epoch)
        for position in self.positions()[start:]:
            yield rows[position], epoch * self.length + position, derive_seed(self.seed, epoch, position)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that Lightning treats as resumable (``state_dict`` / ``load_state_dict``).

    Its state is the training position ``{"epoch", "batches"}`` returned by ``position``
    (read from the trainer's loop progress when a checkpoint is written: a count of batches
    the prefetching loader cannot know by itself); loading it resumes the sampler there.
    """

    def __init__(self, *args: Any, position: Callable[[], dict[str, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict[str, int]:
        return dict(self.position()) if self.position is not None else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict and isinstance(self.sampler, ResumableShuffleSampler):
            self.sampler.resume(int(state_dict["epoch"]), int(state_dict["batches"]) * int(self.batch_size or 1))
