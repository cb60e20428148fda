"""lit.contrastive: MoCo v3 loss, label-mixing loss, momentum schedule and EMA against hand-computed
references, and a real 2-process gloo run equal to 1 process on the full batch."""

from __future__ import annotations

import math
import multiprocessing
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit.contrastive import (
    contrastive_loss,
    cosine_momentum,
    gather_keys,
    mixed_contrastive_loss,
    momentum_update_,
    symmetric_loss,
)


def _unit(angle: float) -> list[float]:
    return [math.cos(angle), math.sin(angle)]


def _ce(similarities: list[float], target: int, tau: float) -> float:
    """Cross-entropy of one row of cosine similarities, written out by hand."""
    exps = [math.exp(s / tau) for s in similarities]
    return -math.log(exps[target] / sum(exps))


ANGLES_Q = [0.1, 1.3, 2.9]
ANGLES_K = [0.0, 1.0, 2.0]


def _cosines(row: int) -> list[float]:
    return [math.cos(ANGLES_Q[row] - b) for b in ANGLES_K]  # unit vectors: cos of the angle difference


def test_contrastive_loss_hand_computed() -> None:
    tau = 0.2
    q = torch.tensor([_unit(a) for a in ANGLES_Q], dtype=torch.float64) * torch.tensor([[2.0], [0.5], [3.0]],
                                                                                        dtype=torch.float64)
    k = torch.tensor([_unit(a) for a in ANGLES_K], dtype=torch.float64) * 7.0  # norms must not matter
    expected = 2 * tau * sum(_ce(_cosines(i), i, tau) for i in range(3)) / 3
    assert float(contrastive_loss(q, k, tau)) == pytest.approx(expected, rel=1e-9)
    labels = torch.tensor([2, 0, 0])
    expected = 2 * tau * sum(_ce(_cosines(i), int(labels[i]), tau) for i in range(3)) / 3
    assert float(contrastive_loss(q, k, tau, labels=labels)) == pytest.approx(expected, rel=1e-9)


def test_symmetric_and_mixed_losses() -> None:
    gen = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = (torch.randn(5, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    assert float(symmetric_loss(q1, q2, k1, k2, 0.2)) == pytest.approx(
        float(contrastive_loss(q1, k2, 0.2) + contrastive_loss(q2, k1, 0.2)), rel=1e-12)
    # mixing loss against its definition, with the rows written out by hand
    tau, lam = 0.2, 0.3
    a, b = torch.arange(5), torch.tensor([3, 4, 0, 1, 2])
    qn, kn = torch.nn.functional.normalize(q1, dim=1), torch.nn.functional.normalize(k2, dim=1)
    cos = [[float((qn[i] * kn[j]).sum()) for j in range(5)] for i in range(5)]
    expected = 2 * tau * sum(lam * _ce(cos[i], int(a[i]), tau) + (1 - lam) * _ce(cos[i], int(b[i]), tau)
                             for i in range(5)) / 5
    assert float(mixed_contrastive_loss(q1, k2, a, b, lam, tau)) == pytest.approx(expected, rel=1e-9)
    # lam = 1: the plain loss on labels a; per-query lam
    assert float(mixed_contrastive_loss(q1, k2, a, b, 1.0, tau)) == pytest.approx(
        float(contrastive_loss(q1, k2, tau)), rel=1e-12)
    per_query = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    expected = 2 * tau * sum(_ce(cos[i], int(a[i] if per_query[i] else b[i]), tau) for i in range(5)) / 5
    assert float(mixed_contrastive_loss(q1, k2, a, b, per_query, tau)) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="lam must be"):
        mixed_contrastive_loss(q1, k2, a, b, torch.ones(3), tau)
    with pytest.raises(ValueError, match="same D"):
        contrastive_loss(q1, k2[:, :4])


def test_cosine_momentum_schedule() -> None:
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(25, 100, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(150, 100, 0.99) == pytest.approx(1.0)
    values = [cosine_momentum(t, 10, 0.9) for t in range(11)]
    assert all(b > a for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="base momentum"):
        cosine_momentum(0, 10, 1.5)


def test_momentum_update_in_place() -> None:
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[10.0]])]
    online = [torch.tensor([3.0, -2.0]), torch.tensor([[0.0]])]
    momentum_update_(target, online, 0.75)
    assert target[0].tolist() == pytest.approx([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * -2])
    assert float(target[1]) == pytest.approx(7.5)
    assert online[0].tolist() == [3.0, -2.0]  # the online side is untouched
    with pytest.raises(ValueError, match="shape mismatch"):
        momentum_update_([torch.zeros(2)], [torch.zeros(3)], 0.9)


def test_gather_keys_single_process_is_identity() -> None:
    keys = torch.randn(4, 3, requires_grad=True)
    gathered, offset = gather_keys(keys)
    assert offset == 0 and torch.equal(gathered, keys) and not gathered.requires_grad


# --------------------------------------------------------------------------- 2 processes

SIZES = (3, 5)  # unequal shards: the label offset must count the keys of lower ranks
WIDTH, OUT, TAU = 6, 4, 0.2


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    n = sum(SIZES)
    return (torch.randn(n, WIDTH, generator=gen, dtype=torch.float64),
            torch.randn(n, WIDTH, generator=gen, dtype=torch.float64),
            torch.randn(WIDTH, OUT, generator=gen, dtype=torch.float64),
            torch.randn(WIDTH, OUT, generator=gen, dtype=torch.float64))


def _summed_loss(x1: torch.Tensor, x2: torch.Tensor, w: torch.Tensor, w_key: torch.Tensor) -> torch.Tensor:
    """Symmetric loss of a linear encoder, summed over this process's queries (keys have no gradient)."""
    q1, q2 = x1 @ w, x2 @ w
    with torch.no_grad():
        k1, k2 = x1 @ w_key, x2 @ w_key
    return symmetric_loss(q1, q2, k1, k2, TAU) * x1.shape[0]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(SIZES),
                            timeout=timedelta(seconds=60))
    try:
        x1, x2, w0, w_key = _problem()
        start = sum(SIZES[:rank])
        rows = slice(start, start + SIZES[rank])
        w = w0.clone().requires_grad_(True)
        loss = _summed_loss(x1[rows], x2[rows], w, w_key)
        loss.backward()
        total = loss.detach().clone()
        grad = w.grad.clone()
        dist.all_reduce(total)
        dist.all_reduce(grad)  # what DDP does to parameter gradients (sum here, then / N below)
        torch.save({"loss": total / sum(SIZES), "grad": grad / sum(SIZES)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_equal_one_process_on_the_full_batch(tmp_path: Path) -> None:
    x1, x2, w0, w_key = _problem()
    w = w0.clone().requires_grad_(True)
    full = _summed_loss(x1, x2, w, w_key) / sum(SIZES)
    full.backward()
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=len(SIZES), join=True,
                       start_method=method)
    for rank in range(len(SIZES)):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert float(result["loss"]) == pytest.approx(float(full.detach()), rel=1e-9), rank
        torch.testing.assert_close(result["grad"], w.grad, rtol=1e-9, atol=1e-12)
