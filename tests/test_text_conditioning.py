"""lit.text_conditioning: per-sample seeds and draws, and the embedding mitigations, against references."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from lit.seeding import derive_seed
from lit.text_conditioning import (
    add_embedding_noise,
    dropped_captions,
    generator,
    generators,
    mix_embeddings,
    mixup_partners,
    mixup_weight,
    per_sample_normal,
    per_sample_timesteps,
    sample_seeds,
)


def test_sample_seeds_name_the_draw_and_separate_repeated_indices() -> None:
    seeds = sample_seeds(7, 3, [5, 2, 5])
    assert seeds == [derive_seed(7, 3, 5, 0), derive_seed(7, 3, 2, 0), derive_seed(7, 3, 5, 1)]
    assert len(set(seeds)) == 3
    assert sample_seeds(7, 3, [2]) == [seeds[1]]  # a sample's seed does not depend on its batch mates
    assert sample_seeds(7, 4, [2]) != [seeds[1]] and sample_seeds(8, 3, [2]) != [seeds[1]]


def test_per_sample_draws_do_not_depend_on_the_batch() -> None:
    seeds = [11, 12, 13]
    together = per_sample_normal((2, 3), generators(seeds, "noise"))
    alone = per_sample_normal((2, 3), generators(seeds[2:], "noise"))
    assert together.shape == (3, 2, 3) and torch.equal(together[2], alone[0])
    assert torch.equal(together[0], torch.randn(2, 3, generator=generator(11, "noise")))
    assert not torch.equal(per_sample_normal((2, 3), generators(seeds, "other"))[0], together[0])  # purposes differ
    steps = per_sample_timesteps(1000, generators(range(2000), "timestep"))
    assert steps.dtype == torch.long and 0 <= int(steps.min()) and int(steps.max()) < 1000
    assert stats.kstest(steps.numpy(), stats.randint(0, 1000).cdf).pvalue > 1e-4  # uniform over the timesteps


def test_caption_dropout_rate() -> None:
    p, n = 0.1, 20_000
    dropped = dropped_captions(p, generators(range(n), "caption-dropout"))
    assert abs(float(dropped.float().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert not dropped_captions(0.0, generators(range(50), "x")).any()
    assert dropped_captions(1.0, generators(range(50), "x")).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dropped_captions(1.5, [])


def test_embedding_noise_has_the_asked_scale() -> None:
    embeddings = torch.randn(8, 16, 32)
    noised = add_embedding_noise(embeddings, 0.3, generators(range(8), "embedding-noise"))
    difference = noised - embeddings
    assert float(difference.std()) == pytest.approx(0.3, rel=0.05)
    assert abs(float(difference.mean())) < 4 * 0.3 / math.sqrt(difference.numel())
    assert torch.equal(add_embedding_noise(embeddings, 0.0, generators(range(8), "e")), embeddings)
    with pytest.raises(ValueError, match="generators"):
        add_embedding_noise(embeddings, 0.1, generators(range(3), "e"))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 4.0])
def test_mixup_weight_is_beta_alpha_1(alpha: float) -> None:
    weights = [mixup_weight(alpha, generator(seed, "w")) for seed in range(3000)]
    assert stats.kstest(weights, stats.beta(alpha, 1).cdf).pvalue > 1e-4
    assert sum(weights) / len(weights) == pytest.approx(alpha / (alpha + 1), abs=0.03)
    with pytest.raises(ValueError, match="> 0"):
        mixup_weight(0.0, generator(0, "w"))


def test_mixup_mixes_with_a_permutation() -> None:
    embeddings = torch.randn(6, 4, 8)
    partners = mixup_partners(6, generator(1, "p"))
    assert sorted(partners.tolist()) == list(range(6))
    mixed = mix_embeddings(embeddings, embeddings[partners], 0.7)
    for i, j in enumerate(partners.tolist()):
        assert torch.allclose(mixed[i], 0.7 * embeddings[i] + 0.3 * embeddings[j])
    with pytest.raises(ValueError, match="differ"):
        mix_embeddings(embeddings, embeddings[:2], 0.5)
