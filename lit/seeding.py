"""Seeded hashing: one stable seed from a tuple of parts, the suite's only way to derive seeds.

Every per-item random draw (a procedural scene, a synthetic query, a training batch's noise,
a sampler epoch's order, an augmentation step) is seeded by :func:`derive_seed` of where it
happens rather than by a process-global generator, so a draw is a pure function of its
coordinates: the same on every machine, for any number of processes, and after a resume.
"""

from __future__ import annotations

import hashlib

SEED_BITS = 63


def derive_seed(*parts: int | str) -> int:
    """A seed in ``[0, 2**63)`` that depends on every part and their order.

    BLAKE2b (8 bytes) of ``repr(parts)``: independent of ``PYTHONHASHSEED`` and of the
    platform; ``derive_seed(1, 2) != derive_seed(2, 1) != derive_seed("1", 2)``.
    """
    digest = hashlib.blake2b(repr(tuple(parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SEED_BITS)
