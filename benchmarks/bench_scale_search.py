"""Scan-scale search: exact search vs raw faiss, ANN + exact re-rank vs exact, a store scanned in bounded memory.

Parts (``--parts``, all by default; each prints ours beside its reference):

* ``exact``: ``lit.search.search`` (auto engine: faiss on CPU) vs one raw
  ``faiss.IndexFlatIP`` over the whole normalised gallery, Q x G x D random
  Gaussian float32 (10,000 x 100,000 x 512), interleaved, best of ``--repeats``.
  Also the torch engine on the same CPU, for reference.
* ``ann``: a float16 feature store of ``--rows`` clustered rows (generated
  seeded, block by block, into ``--store-dir``; reused when already there),
  an index built from it (``--factory``, trained on a seeded sample), then
  ``--ann-queries`` queries (half near-copies of store rows, half fresh draws
  from the mixture) searched exactly (``search`` over the store, faiss engine) and
  through the index (shortlist ``k * --factor`` re-ranked exactly from the
  store): recall@1 against exact, speed ratio, index bytes a vector.
* ``store``: the exact store scan's peak RSS above the level before it
  (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; Linux).
* ``gpu`` (needs CUDA; prints a message and skips otherwise): exact search at
  10,000 x 1,000,000 x 512 on the GPU (float32 / TF32 / bf16 products) vs
  plain normalised ``mm`` + ``topk``; split-product search bf16 vs float32
  (time, largest score difference, top-1 agreement).

    nice -n 10 .venv/bin/python benchmarks/bench_scale_search.py
    nice -n 10 .venv/bin/python benchmarks/bench_scale_search.py --parts ann,store --rows 200000   # smaller
    python benchmarks/bench_scale_search.py --parts gpu                                          # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_search import raw_faiss  # noqa: E402
from bench_split_product import MB, measure, release_free_memory  # noqa: E402

from lit.ann import build_index  # noqa: E402
from lit.search import _token_tile_bf16, score_slack, search  # noqa: E402
from lit.similarity import l2_normalize, normalize_tokens, split_product  # noqa: E402
from lit.store import FeatureStore, StoreWriter, is_store  # noqa: E402
from models.descriptor_config import DescriptorConfig  # noqa: E402

GB = 2**30


# ----------------------------------------------------------------------------- helpers


def vm(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def clustered_block(centers: np.ndarray, rows: int, sigma: float, seed: int, block: int) -> np.ndarray:
    """``rows`` draws of the mixture (a center plus Gaussian noise), seeded per block."""
    rng = np.random.default_rng([seed, block])
    pick = rng.integers(0, len(centers), rows)
    noise = rng.standard_normal((rows, centers.shape[1]), dtype=np.float32)
    return centers[pick] + sigma * noise


def mixture(dim: int, clusters: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 10**9]).standard_normal((clusters, dim), dtype=np.float32)


def make_store(root: Path, rows: int, dim: int, clusters: int, sigma: float, seed: int) -> FeatureStore:
    """A float16 store of clustered rows, written in 50,000-row shards (reused when complete)."""
    if (root / "manifest.json").is_file():
        store = FeatureStore.open(root)
        if store.num_rows == rows and store.feature_shape == (dim,):
            return store
        raise SystemExit(f"{root} holds another store ({store.num_rows} x {store.feature_shape}); "
                         "pass another --store-dir")
    if root.exists() and any(root.iterdir()) and not is_store(root):
        raise SystemExit(f"{root} is not empty; pass another --store-dir")
    centers = mixture(dim, clusters, seed)
    writer = StoreWriter(root, DescriptorConfig("pixel").record(), (dim,), dtype="float16",
                         compare=DescriptorConfig.differences)
    shard = 50_000
    start = time.perf_counter()
    for i, s0 in enumerate(range(0, rows, shard)):
        n = min(shard, rows - s0)
        name = f"{s0:09d}"
        if not writer.has_shard(name):
            writer.write_shard(name, clustered_block(centers, n, sigma, seed, i),
                               [str(r) for r in range(s0, s0 + n)], start=s0)
    writer.finalize()
    print(f"wrote {rows} x {dim} float16 store in {time.perf_counter() - start:.1f} s -> {root}")
    return FeatureStore.open(root)


def queries_for(store: FeatureStore, num: int, clusters: int, sigma: float, seed: int) -> torch.Tensor:
    """Half near-copies of store rows (noise 0.3 sigma), half fresh draws of the mixture."""
    rng = np.random.default_rng([seed, 7])
    half = num // 2
    rows = np.sort(rng.choice(store.num_rows, half, replace=False))
    copies = store.rows(rows, dtype=np.float32)
    copies += 0.3 * sigma * rng.standard_normal(copies.shape, dtype=np.float32)
    fresh = clustered_block(mixture(store.feature_shape[0], clusters, seed), num - half, sigma, seed + 1, 0)
    return torch.from_numpy(np.concatenate([copies, fresh]))


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


# ----------------------------------------------------------------------------- parts


def part_exact(a: argparse.Namespace) -> None:
    print(f"\n== exact: Q={a.queries} G={a.gallery} D={a.dim} k={a.k}, random Gaussian float32 ==")
    gen = torch.Generator().manual_seed(a.seed)
    q = torch.randn(a.queries, a.dim, generator=gen)
    g = torch.randn(a.gallery, a.dim, generator=gen)
    t_raw = t_ours = t_torch = float("inf")
    m_raw = m_ours = m_torch = 0
    for r in range(a.repeats):
        s, m, raw = measure(lambda: raw_faiss(q, g, a.k))
        t_raw, m_raw = min(t_raw, s), max(m_raw, m)
        s, m, ours = measure(lambda: search(q, g, a.k))
        t_ours, m_ours = min(t_ours, s), max(m_ours, m)
        if r == 0 and a.torch_cpu:
            t_torch, m_torch, on_torch = measure(lambda: search(q, g, a.k, backend="torch"))
    raw_s, raw_i = raw  # type: ignore[misc]
    same = int((ours.indices.numpy() == raw_i).all(axis=1).sum())  # type: ignore[union-attr]
    print(f"{'':<28} {'seconds':>8} {'extra peak MB':>14}")
    print(f"{'raw faiss IndexFlatIP':<28} {t_raw:8.2f} {m_raw / MB:14.0f}")
    print(f"{'lit.search (auto: faiss)':<28} {t_ours:8.2f} {m_ours / MB:14.0f}")
    if a.torch_cpu:
        print(f"{'lit.search backend=torch':<28} {t_torch:8.2f} {m_torch / MB:14.0f}")
        agree = int((on_torch.indices == ours.indices).all(dim=1).sum())  # type: ignore[union-attr]
        print(f"torch engine lists equal to faiss engine's: {agree}/{a.queries}")
    print(f"time ratio ours / raw faiss: {t_ours / t_raw:.3f}  (target <= 1.1)")
    print(f"identical top-{a.k} rows to raw faiss: {same}/{a.queries} queries")


def part_ann_store(a: argparse.Namespace, parts: set[str]) -> None:
    root = Path(a.store_dir or Path(tempfile.gettempdir()) / f"lit-bench-store-{a.rows}x{a.dim}-s{a.seed}")
    print(f"\n== store of {a.rows} x {a.dim} float16 clustered rows ({a.clusters} clusters, sigma {a.sigma}) ==")
    store = make_store(root, a.rows, a.dim, a.clusters, a.sigma, a.seed)
    q = queries_for(store, a.ann_queries, a.clusters, a.sigma, a.seed)
    release_free_memory()
    resettable = reset_peak()
    base = vm("VmRSS")
    t_exact, exact = timed(lambda: search(q, store, a.k, gallery_block=a.block_rows))
    peak = vm("VmHWM") - base
    print(f"exact search over the store (faiss engine), {len(q)} queries: {t_exact:.1f} s "
          f"({len(q) * store.num_rows / t_exact / 1e6:.0f} M pairs/s)")
    if "store" in parts:
        how = "VmHWM after clear_refs" if resettable else "VmHWM since start (clear_refs refused)"
        print(f"store scan peak RSS above the level before it: {peak / MB:.0f} MB ({how}; store on disk "
              f"{store.num_rows * a.dim * 2 / MB:.0f} MB, block_rows {a.block_rows}) -> "
              f"{'under' if peak < 2 * GB else 'OVER'} the 2 GB target")
    if "ann" not in parts:
        return
    index_path = root.with_name(f"{root.name}.index-{a.factory.replace(',', '_')}.faiss")
    t_build, ann = timed(lambda: build_index(store, a.factory, path=index_path, nprobe=a.nprobe,
                                             overwrite=True, train_size=a.train_size, seed=a.seed))
    size = index_path.stat().st_size
    print(f"index {a.factory}: built in {t_build:.1f} s (train {ann.train_size} rows), "
          f"{size / store.num_rows:.1f} bytes a vector on disk ({ann.bytes_per_vector():.0f} in the lists)")
    print(f"{'':<36} {'seconds':>8} {'recall@1':>9} {'x exact':>8}")
    print(f"{'exact (search, store)':<36} {t_exact:8.2f} {1.0:9.3f} {1.0:8.1f}")
    for nprobe in a.nprobes:
        t_ann, found = timed(lambda: ann.search(q, store, a.k, factor=a.factor, nprobe=nprobe))
        hit = (found.indices[:, 0] == exact.indices[:, 0]).numpy()
        same_rows = found.indices == exact.indices
        score_diff = float((found.scores[same_rows] - exact.scores[same_rows]).abs().max())
        half = len(q) // 2
        label = f"ANN nprobe={nprobe} k'={a.k * a.factor}"
        print(f"{label:<36} {t_ann:8.2f} {hit.mean():9.3f} {t_exact / t_ann:8.1f}   "
              f"(copies {hit[:half].mean():.3f}, fresh {hit[half:].mean():.3f}; "
              f"max |score - exact| on equal rows {score_diff:.1e})")


def part_gpu(a: argparse.Namespace) -> None:
    print("\n== GPU ==")
    dev = torch.device(a.gpu_device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (run with --parts gpu on a GPU machine)")
        return
    cuda = dev.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    print(torch.cuda.get_device_name(dev) if cuda else f"{dev} (smoke run, not a GPU figure)",
          f"torch {torch.__version__}")
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    q = torch.randn(a.gpu_queries, a.dim, device=dev, generator=gen)
    g = torch.randn(a.gpu_gallery, a.dim, device=dev, generator=gen)

    def plain() -> tuple[torch.Tensor, torch.Tensor]:
        qn, gn = l2_normalize(q), l2_normalize(g)
        out = [torch.topk(qn[i : i + 4096] @ gn.T, a.k, dim=1) for i in range(0, len(qn), 4096)]
        return torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])

    def best_of(fn):  # type: ignore[no-untyped-def]
        best, out = float("inf"), None
        for _ in range(3):
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            best = min(best, time.perf_counter() - start)
        return best, out

    print(f"exact Q={a.gpu_queries} G={a.gpu_gallery} D={a.dim} k={a.k}")
    t_plain, (ps, pi) = best_of(plain)
    print(f"{'plain mm + topk (float32)':<34} {t_plain:8.3f} s")
    for precision in ("float32", "tf32", "bf16"):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t, res = best_of(lambda: search(q, g, a.k, precision=precision))  # type: ignore[arg-type]
        agree = float((res.indices.to(dev) == pi).all(dim=1).float().mean())
        print(f"{'lit.search ' + precision:<34} {t:8.3f} s  x{t / t_plain:.2f} of plain; lists equal to "
              f"plain: {agree:.4f}; peak GPU {torch.cuda.max_memory_allocated() / GB if cuda else 0:.1f} GB")
    del q, g
    if cuda:
        torch.cuda.empty_cache()
    tq = torch.randn(a.sp_queries, 197, 768, device=dev, generator=gen)
    tg = torch.randn(a.sp_gallery, 197, 768, device=dev, generator=gen)
    print(f"split-product Q={a.sp_queries} G={a.sp_gallery} T=197 D=768, k=10")
    t32, r32 = best_of(lambda: search(tq, tg, 10, similarity="split_product"))
    t_sp, full = best_of(lambda: split_product(tq, tg))
    tbf, rbf = best_of(lambda: search(tq, tg, 10, similarity="split_product", precision="bf16"))
    low_q, low_g = normalize_tokens(tq).to(torch.bfloat16), normalize_tokens(tg).to(torch.bfloat16)
    _, approx = best_of(lambda: _token_tile_bf16(low_q, low_g))  # the engine's bf16 product scores
    diff = float((approx.float() - full).abs().max())
    top1 = float((rbf.indices[:, 0] == r32.indices[:, 0]).float().mean())
    print(f"split_product float32 (scores only) {t_sp:8.3f} s")
    print(f"search float32                      {t32:8.3f} s")
    print(f"search bf16 (+ float32 rescoring)   {tbf:8.3f} s  top-1 agreement {top1:.4f}; lists equal "
          f"{float((rbf.indices == r32.indices).all(dim=1).float().mean()):.4f}")
    print(f"largest |bf16 - float32| split-product score before rescoring: {diff:.2e} "
          f"(the engine's bound: {score_slack(768, 'bf16'):.2e})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="exact,ann,store,gpu")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--gallery", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--torch-cpu", action="store_true", help="also time the torch engine in the exact part")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--clusters", type=int, default=10_000)
    p.add_argument("--sigma", type=float, default=0.5)
    p.add_argument("--ann-queries", type=int, default=1000)
    p.add_argument("--block-rows", type=int, default=65536)
    p.add_argument("--factory", default="IVF1024,PQ64np")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--nprobes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32])
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--store-dir", default=None)
    p.add_argument("--gpu-queries", type=int, default=10_000)
    p.add_argument("--gpu-gallery", type=int, default=1_000_000)
    p.add_argument("--gpu-device", default="cuda", help="'cpu' with tiny sizes: a smoke run of the GPU part")
    p.add_argument("--sp-queries", type=int, default=256)
    p.add_argument("--sp-gallery", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    parts = set(a.parts.split(","))
    print(f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads, {faiss.get_num_gpus()} GPUs), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), {os.cpu_count()} CPUs")
    if "exact" in parts:
        part_exact(a)
    if parts & {"ann", "store"}:
        part_ann_store(a, parts)
    if "gpu" in parts:
        part_gpu(a)


if __name__ == "__main__":
    main()
