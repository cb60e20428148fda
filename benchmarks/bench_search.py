"""Exact search speed and memory: ``lit.search.search`` vs one raw ``faiss.IndexFlatIP``.

Raw faiss: L2-normalise both sets (``lit.similarity.l2_normalize``, so both
sides search the same float32 vectors), add the whole gallery to one
``IndexFlatIP``, search all queries. Ours: the same through ``search`` with
its gallery streaming, spare candidates, rescoring and merges. Both run side
by side in one process with the same thread count, interleaved (the order
alternates between repeats), on random Gaussian features. Each side's best
wall time and best CPU time (all threads of the process, ``time.process_time``)
over ``--repeats`` is reported with the median: on a machine shared with
other jobs the wall time depends on what they do, the CPU time much less.

    .venv/bin/python benchmarks/bench_search.py
    .venv/bin/python benchmarks/bench_search.py --queries 10000 --gallery 20000   # quick
    .venv/bin/python benchmarks/bench_search.py --profile   # + where ours spends its time

Identical results: the number of queries whose top-k rows equal raw faiss's,
and the largest score difference at equal rank. Rows can only swap where two
scores lie within float32 rounding of each other (ours rescores candidates in
a fixed summation order), so that difference must stay within the slack.
Extra peak memory: peak RSS during the call above the level at its start.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_split_product import MB, measure  # noqa: E402

import lit.search as lit_search  # noqa: E402
from lit.search import score_slack, search  # noqa: E402
from lit.similarity import l2_normalize  # noqa: E402

#: Functions of ``lit.search`` (and faiss) timed by ``--profile``, and the phase each one is.
PHASES = {
    "knn": "faiss kNN (BLAS products + heap selection)",
    "normalized_rows": "L2 normalisation + finite check",
    "_rescore_pairs": "exact float32 rescoring",
    "_merge_candidates": "pruning, merging, ordering",
}


def raw_faiss(q: torch.Tensor, g: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: one IndexFlatIP over the whole normalised gallery."""
    xq = l2_normalize(q).numpy()
    xb = l2_normalize(g).numpy()
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    return index.search(xq, k)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def timed(fn: Callable[[], Any]) -> tuple[float, float, int, Any]:
    """(wall seconds, CPU seconds of the whole process, extra peak RSS bytes, result)."""
    cpu = time.process_time()
    wall, peak, result = measure(fn)
    return wall, time.process_time() - cpu, peak, result


def profile_phases(fn: Callable[[], Any]) -> None:
    """Run ``fn`` once with a wall and CPU clock around each function of :data:`PHASES`;
    ``_merge_candidates`` is counted without the rescoring it calls."""
    wall: dict[str, float] = defaultdict(float)
    cpu: dict[str, float] = defaultdict(float)
    originals = {name: getattr(faiss if name == "knn" else lit_search, name) for name in PHASES}

    def clocked(name: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            w, c = time.perf_counter(), time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                wall[name] += time.perf_counter() - w
                cpu[name] += time.process_time() - c
        return call

    for name, inner in originals.items():
        setattr(faiss if name == "knn" else lit_search, name, clocked(name, inner))
    try:
        w, c = time.perf_counter(), time.process_time()
        fn()
        total_wall, total_cpu = time.perf_counter() - w, time.process_time() - c
    finally:
        for name, inner in originals.items():
            setattr(faiss if name == "knn" else lit_search, name, inner)
    for clock in (wall, cpu):
        clock["_merge_candidates"] -= clock["_rescore_pairs"]
    rows = [(PHASES[name], wall[name], cpu[name]) for name in PHASES]
    rows.append(("other (Python, block reads, lists)", total_wall - sum(wall.values()), total_cpu - sum(cpu.values())))
    print_phases("ours", rows)


def profile_raw(q: torch.Tensor, g: torch.Tensor, k: int) -> None:
    """:func:`raw_faiss` once, with a wall and CPU clock around each of its steps."""
    rows: list[tuple[str, float, float]] = []
    clock = (time.perf_counter(), time.process_time())

    def lap(label: str) -> None:
        nonlocal clock
        now = (time.perf_counter(), time.process_time())
        rows.append((label, now[0] - clock[0], now[1] - clock[1]))
        clock = now

    xq, xb = l2_normalize(q).numpy(), l2_normalize(g).numpy()
    lap("L2 normalisation")
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    lap("faiss add (copy into the index)")
    index.search(xq, k)
    lap("faiss search (BLAS products + heap selection)")
    print_phases("raw faiss", rows)


def print_phases(who: str, rows: list[tuple[str, float, float]]) -> None:
    total_wall, total_cpu = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"\nwhere {who} spends its time (one call, {total_wall:.2f} s wall, {total_cpu:.2f} s CPU):")
    print(f"  {'phase':<46} {'wall s':>7} {'%':>6} {'CPU s':>7} {'%':>6}")
    for label, w, c in rows:
        print(f"  {label:<46} {w:7.3f} {100 * w / total_wall:6.1f} {c:7.3f} {100 * c / total_cpu:6.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--gallery", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--gallery-block", type=int, default=65536)
    p.add_argument("--query-block", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also time one call of raw faiss and of ours by phase")
    p.add_argument("--also", type=Path, action="append", default=[], metavar="SEARCH_PY",
                   help="another version of lit/search.py timed in the same rounds, e.g. the one before a change: "
                        "git show COMMIT:lit/search.py > /tmp/search_before.py")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    threads = faiss.omp_get_max_threads()
    print(f"{cpu_model()}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the start")
    print(f"faiss {faiss.__version__} ({threads} OpenMP threads), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), float32 CPU")
    q = torch.randn(a.queries, a.dim)
    g = torch.randn(a.gallery, a.dim)
    print(f"Q={a.queries} G={a.gallery} D={a.dim} k={a.k} gallery_block={a.gallery_block} "
          f"query_block={a.query_block} (inputs {(q.numel() + g.numel()) * 4 / MB:.0f} MB), "
          f"{a.repeats} interleaved repeats")

    def ours_call(engine: Callable[..., Any] = search) -> Any:
        return engine(q, g, a.k, gallery_block=a.gallery_block, query_block=a.query_block)

    calls: dict[str, Callable[[], Any]] = {"raw faiss": lambda: raw_faiss(q, g, a.k), "ours": ours_call}
    for number, path in enumerate(a.also):
        other = load_search_module(path, f"search_also_{number}")
        calls[f"also {path.name}"] = functools.partial(ours_call, other.search)
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in calls}
    results: dict[str, Any] = {}
    names = list(calls)
    loads = []
    for repeat in range(a.repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:  # each goes first in turn
            wall, cpu, peak, results[name] = timed(calls[name])
            runs[name].append((wall, cpu, peak))
        loads.append(os.getloadavg()[0])

    best = {name: (min(r[0] for r in rs), min(r[1] for r in rs)) for name, rs in runs.items()}
    median = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
              for name, rs in runs.items()}
    width = max(10, *(len(name) for name in runs))
    print(f"\n{'':<{width}} {'best wall s':>11} {'best CPU s':>10} {'median wall s':>13} {'median CPU s':>12} "
          f"{'extra peak MB':>14}")
    for name, rs in runs.items():
        print(f"{name:<{width}} {best[name][0]:11.2f} {best[name][1]:10.2f} {median[name][0]:13.2f} "
              f"{median[name][1]:12.2f} {max(r[2] for r in rs) / MB:14.0f}")
    for name in names[1:]:
        ratio = {stat: [values[name][i] / values["raw faiss"][i] for i in (0, 1)]
                 for stat, values in (("best", best), ("median", median))}
        print(f"ratio {name} / raw faiss: wall {ratio['best'][0]:.3f} (best), {ratio['median'][0]:.3f} (median); "
              f"CPU {ratio['best'][1]:.3f} (best), {ratio['median'][1]:.3f} (median)")
    print(f"load average (1 min) after each repeat: {', '.join(f'{x:.2f}' for x in loads)}")
    raw_s, raw_i = results["raw faiss"]
    slack = score_slack(a.dim)
    for name in names[1:]:
        found_s, found_i = results[name].scores.numpy(), results[name].indices.numpy()
        same_rows = int((found_i == raw_i).all(axis=1).sum())
        rank_diff = float(np.abs(found_s - raw_s).max())
        print(f"{name}: identical top-{a.k} rows: {same_rows}/{a.queries} queries; max |score diff| at equal "
              f"rank {rank_diff:.2e} (rounding slack {slack:.1e}: {'within' if rank_diff <= slack else 'EXCEEDED'})")
    if a.profile:
        profile_raw(q, g, a.k)
        profile_phases(ours_call)


def load_search_module(path: Path, name: str) -> Any:
    """A ``lit/search.py`` from another version, imported under ``name`` (its own imports from this tree)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
