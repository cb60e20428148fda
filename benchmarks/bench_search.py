"""Exact search speed and memory: ``lit.search.search`` vs one raw ``faiss.IndexFlatIP``.

Raw faiss: L2-normalise both sets (``lit.similarity.l2_normalize``, so both
sides search the same float32 vectors), add the whole gallery to one
``IndexFlatIP``, search all queries. Ours: the same through ``search`` with
its gallery streaming, spare candidates, rescoring and merges. Both run side
by side in one process with the same thread count (interleaved, best of
``--repeats``) on random Gaussian features.

    .venv/bin/python benchmarks/bench_search.py
    .venv/bin/python benchmarks/bench_search.py --queries 2000 --gallery 20000   # quick

Identical results: the number of queries whose top-k rows equal raw faiss's,
and the largest score difference at equal rank. Rows can only swap where two
scores lie within float32 rounding of each other (ours rescores candidates in
a fixed summation order), so that difference must stay within the slack.
Extra peak memory: peak RSS during the call above the level at its start.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_split_product import MB, measure  # noqa: E402

from lit.search import _rounding_slack, search  # noqa: E402
from lit.similarity import l2_normalize  # noqa: E402


def raw_faiss(q: torch.Tensor, g: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: one IndexFlatIP over the whole normalised gallery."""
    xq = l2_normalize(q).numpy()
    xb = l2_normalize(g).numpy()
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return index.search(xq, k)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--gallery", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--gallery-block", type=int, default=65536)
    p.add_argument("--query-block", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    threads = faiss.omp_get_max_threads()
    print(f"faiss {faiss.__version__} ({threads} OpenMP threads), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), float32 CPU")
    q = torch.randn(a.queries, a.dim)
    g = torch.randn(a.gallery, a.dim)
    print(f"Q={a.queries} G={a.gallery} D={a.dim} k={a.k} gallery_block={a.gallery_block} "
          f"query_block={a.query_block} (inputs {(q.numel() + g.numel()) * 4 / MB:.0f} MB)")

    t_raw = t_ours = float("inf")
    m_raw = m_ours = 0
    for _ in range(a.repeats):
        s, m, raw = measure(lambda: raw_faiss(q, g, a.k))
        t_raw, m_raw = min(t_raw, s), max(m_raw, m)
        s, m, ours = measure(
            lambda: search(q, g, a.k, gallery_block=a.gallery_block, query_block=a.query_block)
        )
        t_ours, m_ours = min(t_ours, s), max(m_ours, m)

    raw_s, raw_i = raw  # type: ignore[misc]
    ours_s, ours_i = ours.scores.numpy(), ours.indices.numpy()  # type: ignore[union-attr]
    same_rows = int((ours_i == raw_i).all(axis=1).sum())
    rank_diff = float(np.abs(ours_s - raw_s).max())
    print(f"\n{'':<10} {'seconds':>8} {'extra peak MB':>14}")
    print(f"{'raw faiss':<10} {t_raw:8.2f} {m_raw / MB:14.0f}")
    print(f"{'ours':<10} {t_ours:8.2f} {m_ours / MB:14.0f}")
    print(f"time ratio ours / raw faiss: {t_ours / t_raw:.3f}")
    print(f"identical top-{a.k} rows: {same_rows}/{a.queries} queries; max |score diff| at equal "
          f"rank {rank_diff:.2e} (rounding slack {_rounding_slack(a.dim):.1e}: "
          f"{'within' if rank_diff <= _rounding_slack(a.dim) else 'EXCEEDED'})")

if __name__ == "__main__":
    main()
