"""Benchmark: lit.metrics vs torchmetrics retrieval metrics on full ranked lists.

Default problem: 10,000 queries x 10,000 gallery items, every query ranks the
whole gallery (lists of length 10,000), 1-5 random positives per query whose
scores get a boost so they rank high. Both libraries see the same ranked lists:
ours a ``(Q, K)`` bool relevance matrix, torchmetrics the flattened
``preds = K - rank`` (strictly positive, descending), ``target`` and
``indexes``. Values must agree to 1e-6; we print wall time, the speed ratio
and the peak resident memory each call adds (VmHWM after resetting it through
/proc/self/clear_refs; on GPU torch.cuda.max_memory_allocated).

    .venv/bin/python benchmarks/bench_metrics.py                       # full size
    .venv/bin/python benchmarks/bench_metrics.py --queries 1000 --gallery 1000
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchmetrics.retrieval import RetrievalMAP, RetrievalMRR, RetrievalRecall  # noqa: E402

from lit.metrics import (  # noqa: E402
    RetrievalMetrics,
    average_precision,
    ranking_relevance,
    recall_at_k,
    reciprocal_rank,
    retrieval_metrics,
)

# ----------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """Run ``fn`` once: (result, seconds, peak MiB added over the memory in use before)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return result, seconds, (torch.cuda.max_memory_allocated() - before) / 2**20
    resettable = _reset_peak_rss()
    before = _status_kib("VmRSS") or 0
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") if resettable else None
    return result, seconds, (peak - before) / 1024 if peak is not None else float("nan")


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------


def make_rankings(
    queries: int, gallery: int, max_positives: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, list[list[int]]]:
    """Ranked gallery rows (Q, G) from noisy scores, and each query's positive rows."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_positives + 1, (queries,), generator=gen)
    positives = [
        torch.randperm(gallery, generator=gen)[: int(c)].tolist() for c in tqdm(counts, desc="ground truth")
    ]
    ranked = torch.empty(queries, gallery, dtype=torch.long)
    chunk = 500
    for start in tqdm(range(0, queries, chunk), desc="ranking"):
        stop = min(start + chunk, queries)
        scores = torch.randn(stop - start, gallery, generator=gen)
        for row, pos in enumerate(positives[start:stop]):
            scores[row, pos] += 2.0  # positives rank high, not always first
        ranked[start:stop] = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return ranked.to(device), positives


def _torchmetrics(
    metric_cls: type, preds: torch.Tensor, target: torch.Tensor, indexes: torch.Tensor, **kw: Any
) -> float:
    """One torchmetrics module: update with everything, then compute."""
    metric = metric_cls(**kw).to(preds.device)
    metric.update(preds, target, indexes=indexes)
    return float(metric.compute())


def _median_run(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[Any, float, float]:
    runs = [measure(fn, device) for _ in range(repeats)]
    return runs[0][0], statistics.median(r[1] for r in runs), max(r[2] for r in runs)


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--max-positives", type=int, default=5)
    parser.add_argument("--k", type=int, default=10, help="cut-off for Recall@k")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of ours (median time); torchmetrics runs once"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    print(f"torch {torch.__version__}, torchmetrics {__import__('torchmetrics').__version__}, "
          f"device {device}, threads {torch.get_num_threads()}")
    ranked, positives = make_rankings(args.queries, args.gallery, args.max_positives, args.seed, device)
    num_positives = torch.tensor([len(p) for p in positives], device=device)
    q, k_len = ranked.shape
    print(f"{q} queries x {k_len}-long ranked lists ({q * k_len / 1e6:.0f}M items), "
          f"{int(num_positives.sum())} positives")

    relevance, t_rel, m_rel = _median_run(lambda: ranking_relevance(ranked, positives), device, args.repeats)
    del ranked
    assert torch.equal(relevance.sum(1), num_positives), "full lists must retrieve every positive"

    # torchmetrics input: flattened lists; preds = K - rank > 0 keeps the given order
    preds = (k_len - torch.arange(k_len, device=device, dtype=torch.float32)).expand(q, k_len).reshape(-1)
    target = relevance.reshape(-1)
    indexes = torch.arange(q, device=device).repeat_interleave(k_len)

    k = args.k
    cases: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        ("mAP", lambda: average_precision(relevance, num_positives).mean(),
         lambda: _torchmetrics(RetrievalMAP, preds, target, indexes)),
        (f"recall@{k}", lambda: recall_at_k(relevance, num_positives, k).mean(),
         lambda: _torchmetrics(RetrievalRecall, preds, target, indexes, top_k=k)),
        ("MRR", lambda: reciprocal_rank(relevance).mean(),
         lambda: _torchmetrics(RetrievalMRR, preds, target, indexes)),
    ]

    header = (
        "| metric | ours | torchmetrics | abs diff | ours s | torchmetrics s | speed-up "
        "| ours peak MiB | torchmetrics peak MiB |"
    )
    rows = [header, "|" + "---|" * 9]
    worst = 0.0
    for name, ours_fn, theirs_fn in cases:
        ours, t_ours, m_ours = _median_run(ours_fn, device, args.repeats)
        print(f"torchmetrics {name} ...", flush=True)
        theirs, t_theirs, m_theirs = measure(theirs_fn, device)
        diff = abs(float(ours) - theirs)
        worst = max(worst, diff)
        rows.append(
            f"| {name} | {float(ours):.6f} | {theirs:.6f} | {diff:.1e} | {t_ours:.3f} | {t_theirs:.2f} | "
            f"{t_theirs / t_ours:.0f}x | {m_ours:.0f} | {m_theirs:.0f} |"
        )

    all_keys, t_all, m_all = _median_run(
        lambda: retrieval_metrics(relevance, num_positives, ks=(1, 5, k)), device, args.repeats
    )

    def accumulate() -> dict[str, torch.Tensor]:
        metric = RetrievalMetrics(ks=(1, 5, k)).to(device)
        for start in range(0, q, 1000):
            stop = min(start + 1000, q)
            rows = torch.arange(start, stop, device=device)
            metric.update(rows, relevance[start:stop], num_positives[start:stop])
        return metric.compute()

    acc, t_acc, m_acc = _median_run(accumulate, device, args.repeats)
    assert abs(float(acc["mAP"]) - all_keys["mAP"]) < 1e-12

    print()
    print("\n".join(rows))
    print()
    print("| ours, other calls | s | peak MiB |\n|---|---|---|")
    print(f"| ranking_relevance (ranked ids -> bool) | {t_rel:.3f} | {m_rel:.0f} |")
    print(f"| retrieval_metrics, all {len(all_keys)} keys | {t_all:.3f} | {m_all:.0f} |")
    print(f"| RetrievalMetrics update x{-(-q // 1000)} + compute | {t_acc:.3f} | {m_acc:.0f} |")
    print()
    print(f"largest |ours - torchmetrics| = {worst:.2e}")
    if worst > 1e-6:
        raise SystemExit("values differ by more than 1e-6")


if __name__ == "__main__":
    main()
