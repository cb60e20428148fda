"""Seeded hashing: one stable seed from a tuple of parts, the suite's only way to derive seeds.

Every per-item random draw (a procedural scene, a synthetic query, a training batch's noise,
a sampler epoch's order, an augmentation step) is seeded by :func:`derive_seed` of where it
happens rather than by a process-global generator, so a draw is a pure function of its
coordinates: the same on every machine, for any number of processes, and after a resume.
:class:`SeededDraws` turns one such seed into a sequence of scalar draws (uniform, integer,
choice) from its own ``torch.Generator``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor

SEED_BITS = 63

_T = TypeVar("_T")


def derive_seed(*parts: int | str) -> int:
    """A seed in ``[0, 2**63)`` that depends on every part and their order.

    BLAKE2b (8 bytes) of ``repr(parts)``: independent of ``PYTHONHASHSEED`` and of the
    platform; ``derive_seed(1, 2) != derive_seed(2, 1) != derive_seed("1", 2)``.
    """
    digest = hashlib.blake2b(repr(tuple(parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)


class SeededDraws:
    """Scalar random draws from one ``torch.Generator`` seeded with ``seed`` (a :func:`derive_seed`
    value): the same sequence of draws on every machine and in every process."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        """A float in ``[low, high)``."""
        return low + (high - low) * float(torch.rand(1, generator=self.generator).item())

    def integer(self, low: int, high: int) -> int:
        """Uniform integer in the inclusive range [low, high]."""
        return int(torch.randint(low, high + 1, (1,), generator=self.generator).item())

    def choice(self, options: Sequence[_T]) -> _T:
        """One of ``options``, uniformly (``options`` must not be empty)."""
        return options[self.integer(0, len(options) - 1)]

    def colour(self) -> Tensor:
        """An RGB colour, (3,) uniform in [0, 1)."""
        return torch.rand(3, generator=self.generator)

    def tensor(self, *shape: int) -> Tensor:
        """Uniform [0, 1) values of ``shape``."""
        return torch.rand(*shape, generator=self.generator)
