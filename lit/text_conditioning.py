"""Per-sample random draws of text-conditioned diffusion training, and the embedding-side mitigations
of Somepalli et al., "Understanding and Mitigating Copying in Diffusion Models" (NeurIPS 2023).

Every draw of a training sample (its timestep, diffusion noise, latent sample, caption dropout,
embedding noise) comes from a CPU generator of its own, seeded by :func:`sample_seeds` from the run
seed, the batch's place in the fit and the sample's ``index``, and by a purpose name
(:func:`generator`). A sample's draws therefore do not depend on the batch it shares, on the
device, on how many processes train, or on a resume; and switching one mitigation on does not
change the other draws.

Mitigations, as in the study's training script (``somepago/DCR``, ``diff_train.py``):

- Gaussian noise (``--rand_noise_lam``): ``e + lambda * n``, ``n ~ N(0, 1)`` per embedding entry
  (:func:`add_embedding_noise`);
- mixup (``--mixup_noise_lam``): ``w * e_i + (1 - w) * e_j`` with one weight ``w ~ Beta(alpha, 1)``
  per batch and the partner ``j`` of each sample from a random permutation of the batch
  (:func:`mixup_weight`, :func:`mixup_partners`, :func:`mix_embeddings`); ``E[w] = alpha / (alpha + 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lit.seeding import derive_seed


def sample_seeds(run_seed: int, batch_position: int, indices: Sequence[int]) -> list[int]:
    """One seed per sample of a batch: ``derive_seed(run_seed, batch_position, index, occurrence)``.

    ``occurrence`` counts earlier samples of the same ``index`` in this batch (0 for the first), so
    an index drawn twice into one batch still gets two draws."""
    seen: dict[int, int] = {}
    seeds = []
    for index in indices:
        occurrence = seen.get(int(index), 0)
        seen[int(index)] = occurrence + 1
        seeds.append(derive_seed(run_seed, batch_position, int(index), occurrence))
    return seeds


def generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one kind of draw (``purpose``) of one sample or batch."""
    return torch.Generator().manual_seed(derive_seed(seed, purpose))


def generators(seeds: Sequence[int], purpose: str) -> list[torch.Generator]:
    """:func:`generator` for each seed."""
    return [generator(seed, purpose) for seed in seeds]


def per_sample_normal(shape: Sequence[int], gens: Sequence[torch.Generator]) -> Tensor:
    """Float32 CPU tensor ``(len(gens), *shape)``: row ``i`` is drawn from ``N(0, 1)`` with ``gens[i]`` only."""
    if not gens:
        return torch.empty(0, *shape)
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in gens])


def per_sample_uniform(gens: Sequence[torch.Generator]) -> Tensor:
    """Float32 CPU tensor ``(len(gens),)`` of ``U[0, 1)`` draws, one per generator."""
    return torch.tensor([float(torch.rand(1, generator=g)) for g in gens], dtype=torch.float32)


def per_sample_timesteps(num_train_timesteps: int, gens: Sequence[torch.Generator]) -> Tensor:
    """Long CPU tensor ``(len(gens),)``: one timestep in ``[0, num_train_timesteps)`` per generator."""
    return torch.tensor([int(torch.randint(0, num_train_timesteps, (1,), generator=g)) for g in gens],
                        dtype=torch.long)


def dropped_captions(probability: float, gens: Sequence[torch.Generator]) -> Tensor:
    """Bool CPU tensor: sample ``i`` loses its caption when its uniform draw is below ``probability``."""
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"caption dropout must be in [0, 1], got {probability}")
    return per_sample_uniform(gens) < probability


def add_embedding_noise(embeddings: Tensor, scale: float, gens: Sequence[torch.Generator]) -> Tensor:
    """``embeddings + scale * n`` with ``n ~ N(0, 1)`` of the embeddings' shape, row ``i`` from ``gens[i]``."""
    if scale < 0:
        raise ValueError(f"embedding noise must be >= 0, got {scale}")
    if len(gens) != embeddings.shape[0]:
        raise ValueError(f"{len(gens)} generators for {embeddings.shape[0]} embeddings")
    noise = per_sample_normal(embeddings.shape[1:], gens).to(embeddings.device, embeddings.dtype)
    return embeddings + scale * noise


def mixup_weight(alpha: float, gen: torch.Generator) -> float:
    """A draw of ``Beta(alpha, 1)`` (inverse CDF: ``u ** (1 / alpha)``): the weight of a sample's own embedding."""
    if alpha <= 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}")
    return float(torch.rand(1, generator=gen, dtype=torch.float64)) ** (1.0 / alpha)


def mixup_partners(count: int, gen: torch.Generator) -> Tensor:
    """A random permutation of ``range(count)``: the partner of sample ``i`` is ``partners[i]``."""
    return torch.randperm(count, generator=gen)


def mix_embeddings(embeddings: Tensor, partner_embeddings: Tensor, weight: float) -> Tensor:
    """``weight * embeddings + (1 - weight) * partner_embeddings``."""
    if embeddings.shape != partner_embeddings.shape:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} and partners {tuple(partner_embeddings.shape)} differ")
    return weight * embeddings + (1.0 - weight) * partner_embeddings
