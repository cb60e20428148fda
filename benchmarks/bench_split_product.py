"""Split-product speed and memory: ``lit.similarity.split_product`` vs the naive einsum.

The naive reference materialises the ``(Q, G, T)`` per-token products:
``torch.einsum("qtd,gtd->qgt", q, g).amax(-1)`` (after ``normalize_tokens``).
Both run side by side in one process (interleaved, best of ``--repeats``),
float32 on CPU. A second, large size runs ours only: there the naive
``(Q, G, T)`` tensor would not fit in memory.

    .venv/bin/python benchmarks/bench_split_product.py
    .venv/bin/python benchmarks/bench_split_product.py --large-queries 0   # skip the large run

Extra peak memory is the peak resident set size during the call above the
level at its start, sampled every 2 ms from /proc/self/statm (Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TypeVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit.choices import TokenNormalization  # noqa: E402
from lit.similarity import normalize_tokens, split_product  # noqa: E402

MB = 2**20


class PeakRSS:
    """Samples the process RSS in a thread; ``extra``: peak minus the RSS at entry, in bytes."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.extra = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self._rss())

    def __enter__(self) -> PeakRSS:
        self._base = self._peak = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.extra = max(self._peak, self._rss()) - self._base


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so a call's new allocations show in its RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


T = TypeVar("T")


def measure(fn: Callable[[], T]) -> tuple[float, int, T]:
    """(seconds, extra peak RSS bytes, result) of one call."""
    release_free_memory()
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return seconds, mem.extra, out


def naive(q: torch.Tensor, g: torch.Tensor, mode: TokenNormalization) -> torch.Tensor:
    """The (Q, G, T) reference."""
    qn, gn = normalize_tokens(q, mode), normalize_tokens(g, mode)
    return torch.einsum("qtd,gtd->qgt", qn, gn).amax(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--gallery", type=int, default=2000)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["token", "global", "none"])
    p.add_argument("--large-queries", type=int, default=4000, help="0 skips the large run")
    p.add_argument("--large-gallery", type=int, default=8000)
    p.add_argument("--large-mode", default="token")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU")

    q = torch.randn(a.queries, a.tokens, a.dim)
    g = torch.randn(a.gallery, a.tokens, a.dim)
    qgt = a.queries * a.gallery * a.tokens * 4 / MB
    out_mb = a.queries * a.gallery * 4 / MB
    print(f"\nQ={a.queries} G={a.gallery} T={a.tokens} D={a.dim} block_size={a.block_size} "
          f"(naive (Q,G,T) float32 = {qgt:.0f} MB; output (Q,G) = {out_mb:.1f} MB)")
    print(f"{'norm':<7} {'naive s':>8} {'ours s':>8} {'ratio':>6} {'max|diff|':>10} "
          f"{'naive MB':>9} {'ours MB':>8}")
    for mode in a.modes:
        t_n = t_o = float("inf")
        m_n = m_o = 0
        for _ in range(a.repeats):
            s, m, ref = measure(lambda: naive(q, g, mode))
            t_n, m_n = min(t_n, s), max(m_n, m)
            s, m, ours = measure(lambda: split_product(q, g, mode, block_size=a.block_size))
            t_o, m_o = min(t_o, s), max(m_o, m)
        diff = (ours - ref).abs().max().item()
        print(f"{mode:<7} {t_n:8.3f} {t_o:8.3f} {t_o / t_n:6.2f} {diff:10.2e} "
              f"{m_n / MB:9.0f} {m_o / MB:8.1f}")
        del ref, ours

    if a.large_queries > 0:
        del q, g
        q = torch.randn(a.large_queries, a.tokens, a.dim)
        g = torch.randn(a.large_gallery, a.tokens, a.dim)
        out_mb = a.large_queries * a.large_gallery * 4 / MB
        need = a.large_queries * a.large_gallery * a.tokens * 4 / 2**30
        print(f"\nlarge, ours only: Q={a.large_queries} G={a.large_gallery} T={a.tokens} D={a.dim} "
              f"norm={a.large_mode} (naive (Q,G,T) float32 would need {need:.1f} GiB)")
        s, m, _ = measure(lambda: split_product(q, g, a.large_mode, block_size=a.block_size))
        print(f"time {s:.1f} s, extra peak RSS {m / MB:.0f} MB "
              f"(output (Q,G) {out_mb:.0f} MB; beyond the output {m / MB - out_mb:.0f} MB)")


if __name__ == "__main__":
    main()
