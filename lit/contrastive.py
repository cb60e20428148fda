"""MoCo v3 math as pure functions: contrastive loss with keys gathered over DDP ranks,
the label-mixing loss for CutMix'd views, the cosine momentum schedule and the EMA update.

Conventions follow the official code (github.com/facebookresearch/moco-v3, ``moco/builder.py``):

- ``ctr(q, k)``: both L2-normalised, keys gathered from every rank (no gradient flows
  through keys), logits ``q @ k_all.T / tau``, labels = each query's own row in the
  gathered keys (its local index plus the number of keys on lower ranks), and the
  cross-entropy is scaled by ``2 * tau`` (``nn.CrossEntropyLoss()(logits, labels) * (2 * T)``).
- The symmetric loss is ``ctr(q1, k2) + ctr(q2, k1)``.
- The momentum coefficient follows ``m(t) = 1 - (1 - m0) * (cos(pi * t / T) + 1) / 2``,
  from ``m0`` (0.99 for ViT) at t = 0 to 1 at t = T.

Under DDP each rank's loss averages over its own queries; DDP averages gradients over
ranks, so N ranks with equal shards give the gradient of the full-batch loss (tested
with 2 processes in tests/test_contrastive.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit.distributed import world_size

__all__ = [
    "contrastive_loss",
    "cosine_momentum",
    "gather_keys",
    "mixed_contrastive_loss",
    "momentum_update_",
    "symmetric_loss",
]


def gather_keys(keys: Tensor) -> tuple[Tensor, int]:
    """All ranks' keys concatenated in rank order (without gradient) and the row where this
    rank's keys start. Ranks may hold different numbers of keys. One process: ``(keys, 0)``."""
    keys = keys.detach()
    if world_size() == 1:
        return keys, 0
    from torchmetrics.utilities.distributed import gather_all_tensors

    parts = gather_all_tensors(keys.contiguous())
    rank = torch.distributed.get_rank()
    offset = sum(int(part.shape[0]) for part in parts[:rank])
    return torch.cat(parts, dim=0), offset


def _logits(q: Tensor, keys: Tensor, temperature: float) -> tuple[Tensor, int]:
    """Normalised ``q @ gathered_keys.T / tau`` and this rank's key offset."""
    if q.ndim != 2 or keys.ndim != 2 or q.shape[1] != keys.shape[1]:
        raise ValueError(f"q and k must be (N, D) with the same D, got {tuple(q.shape)} and {tuple(keys.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k_all, offset = gather_keys(F.normalize(keys, dim=1))
    return F.normalize(q, dim=1) @ k_all.T / temperature, offset


def contrastive_loss(q: Tensor, k: Tensor, temperature: float = 0.2, labels: Tensor | None = None) -> Tensor:
    """MoCo v3 ``ctr(q, k)``: ``2 * tau * CE(q @ k_all.T / tau, labels)``.

    ``labels`` (N,) are local key rows (0..n_keys-1 on this rank); default: each
    query's own row, the positive pair. They are offset by the keys of lower ranks.
    """
    logits, offset = _logits(q, k, temperature)
    if labels is None:
        labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels.to(q.device) + offset) * (2 * temperature)


def mixed_contrastive_loss(
    q: Tensor, k: Tensor, labels_a: Tensor, labels_b: Tensor, lam: float | Tensor, temperature: float = 0.2
) -> Tensor:
    """Label-mixing loss for a mixed view (MixCo / Un-Mix style):
    ``lam * ctr(q, k; labels_a) + (1 - lam) * ctr(q, k; labels_b)``.

    ``lam`` is the share of the view that comes from source ``a`` (the box area fraction
    for CutMix), a scalar or one value per query. Logits are computed once.
    """
    logits, offset = _logits(q, k, temperature)
    lam_t = torch.as_tensor(lam, dtype=logits.dtype, device=logits.device)
    if lam_t.ndim not in (0, 1) or (lam_t.ndim == 1 and lam_t.shape[0] != q.shape[0]):
        raise ValueError(f"lam must be a scalar or one value per query, got shape {tuple(lam_t.shape)}")
    ce_a = F.cross_entropy(logits, labels_a.to(q.device) + offset, reduction="none")
    ce_b = F.cross_entropy(logits, labels_b.to(q.device) + offset, reduction="none")
    return (lam_t * ce_a + (1 - lam_t) * ce_b).mean() * (2 * temperature)


def symmetric_loss(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, temperature: float = 0.2) -> Tensor:
    """``ctr(q1, k2) + ctr(q2, k1)``: each view's query against the other view's keys."""
    return contrastive_loss(q1, k2, temperature) + contrastive_loss(q2, k1, temperature)


def cosine_momentum(step: float, total_steps: float, base: float = 0.99) -> float:
    """``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``: ``base`` at step 0, 1 at the end
    (clamped beyond it). ``total_steps <= 0`` keeps ``base``."""
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"base momentum must be in [0, 1], got {base}")
    if total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def momentum_update_(target: Sequence[Tensor], online: Sequence[Tensor], momentum: float) -> None:
    """In place, for every pair: ``target = momentum * target + (1 - momentum) * online``
    (the momentum encoder's parameters follow the query encoder's)."""
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"{len(target)} target tensors but {len(online)} online tensors")
    for t, o in zip(target, online):
        if t.shape != o.shape:
            raise ValueError(f"shape mismatch in momentum update: {tuple(t.shape)} vs {tuple(o.shape)}")
    if not target:
        return
    torch._foreach_mul_(target, momentum)
    torch._foreach_add_(target, [o.detach() for o in online], alpha=1.0 - momentum)
