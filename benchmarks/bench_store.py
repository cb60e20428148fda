"""Feature store: bytes on disk per row, write speed, and a scan in bounded memory vs loading it whole.

Writes an N x D float16 store (unit-norm random rows) with ``lit.store.StoreWriter``, then
finds the top-1 row of Q queries two ways, side by side in one run:

- ours: ``FeatureStore.iter_blocks`` (memory-mapped shards, one block in memory at a time);
- reference: load every shard (``np.load``), concatenate, convert to float32, one product.

Both give the same top-1 (asserted). Before them, the store's checks against its manifest
(``lit.store.FeatureStore``): ``open`` (manifest, every shard's header and size) and ``verify``
(every shard's SHA-256, NaN / inf rows and row file, what a fresh store does once before it uses
a shard's rows), set beside the exact scan of ``--queries`` and of ``--scan-queries`` queries. Peak resident memory above the phase's baseline is read
from ``/proc/self/status`` (VmHWM, reset between phases through ``/proc/self/clear_refs``).

    .venv/bin/python benchmarks/bench_store.py                  # 1,000,000 x 512: 1 GB on disk
    .venv/bin/python benchmarks/bench_store.py --rows 100000    # smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from lit.store import FeatureStore, StoreWriter
from models.descriptor_config import DescriptorConfig


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> int:
    """Reset the peak-RSS mark and return the current RSS (the phase's baseline)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _top1(store: FeatureStore, queries: np.ndarray, block_rows: int) -> np.ndarray:
    """Index of every query's top-1 row, over ``iter_blocks`` (one float32 block in memory at a time)."""
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    best_index = np.zeros(len(queries), dtype=np.int64)
    for start, block in store.iter_blocks(block_rows, np.float32):
        scores = queries @ block.T
        top = scores.argmax(axis=1)
        value = scores[np.arange(len(queries)), top]
        better = value > best
        best[better], best_index[better] = value[better], start + top[better]
    return best_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shard", type=int, default=65536, help="rows per shard")
    parser.add_argument("--block", type=int, default=65536, help="rows per scanned block")
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--scan-queries", type=int, default=1024,
                        help="queries of a second exact scan (a scan of that many generations), for the check's share")
    parser.add_argument("--no-reference", action="store_true", help="skip loading the store whole")
    parser.add_argument("--dir", default=None, help="where to write the store (default: a temporary folder)")
    args = parser.parse_args()
    if args.dir is not None:
        run(args, Path(args.dir) / "store")
        return
    with tempfile.TemporaryDirectory(prefix="bench_store_") as scratch:  # removed with the store it holds
        run(args, Path(scratch) / "store")


def run(args: argparse.Namespace, root: Path) -> None:
    """Write a store of ``args.rows`` rows at ``root``, then time its checks and scans."""
    rng = np.random.default_rng(0)
    record = DescriptorConfig("pixel").record()
    writer = StoreWriter(root, record, (args.dim,), compare=DescriptorConfig.differences)
    started = time.perf_counter()
    for start in range(0, args.rows, args.shard):
        rows = min(args.shard, args.rows - start)
        block = rng.standard_normal((rows, args.dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        writer.write_shard(f"{start // args.shard:06d}", block, [str(start + i) for i in range(rows)], start=start)
    writer.finalize()
    write_s = time.perf_counter() - started
    disk = sum(p.stat().st_size for p in root.glob("shard-*.npy"))
    keys = sum(p.stat().st_size for p in root.glob("shard-*.json"))
    print(f"store: {args.rows:,} x {args.dim} float16 in {-(-args.rows // args.shard)} shards; {disk / args.rows:.1f} bytes/row of features on disk "
          f"(+ {keys / args.rows:.1f} bytes/row of keys), written in {write_s:.1f} s "
          f"({disk / write_s / 2**20:.0f} MB/s incl. random generation and sha256)")

    picker = FeatureStore.open(root)  # the queries come from a store of their own: `store` is fresh below
    queries = picker.rows(rng.choice(args.rows, args.queries, replace=False), np.float32)
    many = picker.rows(rng.choice(args.rows, args.scan_queries, replace=False), np.float32)
    del picker
    started = time.perf_counter()
    store = FeatureStore.open(root)  # the manifest, every shard's header and size
    open_s = time.perf_counter() - started

    baseline = _reset_peak()
    started = time.perf_counter()
    best_index = _top1(store, queries, args.block)  # fresh store: each shard checked before its rows are used
    first_s, ours_peak = time.perf_counter() - started, _status("VmHWM") - baseline
    started = time.perf_counter()
    _top1(store, queries, args.block)  # the same scan again: every shard checked already
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    _top1(store, many, args.block)
    many_s = time.perf_counter() - started
    started = time.perf_counter()
    store.verify()  # the checks alone, one shard after another
    verify_s = time.perf_counter() - started
    added = open_s + first_s - ours_s
    print(f"checks alone: open {open_s:.2f} s + verify {verify_s:.2f} s ({disk / 2**20 / verify_s:.0f} MB/s); "
          f"exact scan of {args.queries} queries: {first_s:.2f} s on the fresh store (checks overlapped), "
          f"{ours_s:.2f} s checked already: +{added:.2f} s = {100 * added / ours_s:+.1f}%; "
          f"exact scan of {args.scan_queries} queries {many_s:.2f} s (checks alone = "
          f"{100 * (open_s + verify_s) / many_s:.1f}% of it)")
    if args.no_reference:
        return

    picks = rng.integers(0, args.rows, 100_000)
    started = time.perf_counter()
    store.rows(picks, np.float32)
    gather_s = time.perf_counter() - started

    baseline = _reset_peak()
    started = time.perf_counter()
    whole = np.concatenate([np.load(root / s.file) for s in store.shards]).astype(np.float32)
    reference = (queries @ whole.T).argmax(axis=1)
    ref_s, ref_peak = time.perf_counter() - started, _status("VmHWM") - baseline
    del whole

    assert np.array_equal(best_index, reference), "top-1 differs between the scan and the full load"
    size = disk / 2**30
    print(f"{'':28s}{'time':>10s}{'peak RSS above baseline':>26s}")
    print(f"{'ours: iter_blocks':28s}{ours_s:9.2f}s{ours_peak / 2**20:22.0f} MB   ({size:.2f} GiB store, "
          f"blocks of {args.block:,} rows = {args.block * args.dim * 4 / 2**20:.0f} MB float32)")
    print(f"{'reference: load whole':28s}{ref_s:9.2f}s{ref_peak / 2**20:22.0f} MB")
    print(f"rows(): 100,000 random rows gathered in {gather_s:.2f} s (shards in the page cache after the scan)")


if __name__ == "__main__":
    main()
