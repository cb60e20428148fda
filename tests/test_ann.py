"""lit.ann: IVF / PQ shortlists from faiss, re-ranked exactly from the rows.

Clustered synthetic features (as real descriptors are): with enough lists
probed, the re-ranked top-1 equals exact search's for nearly every query, and
every re-ranked score equals the exact engine's score of that row.
"""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from lit.ann import AnnIndex, build_index
from lit.errors import UserError
from lit.search import TensorRows, search


def clustered(num: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    return (centers[rng.integers(0, clusters, num)] + 0.35 * rng.standard_normal((num, dim))).astype(np.float32)


@pytest.fixture(autouse=True)
def one_faiss_thread() -> object:
    """k-means on tiny sets: one OpenMP thread is faster than spinning threads on a shared machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, torch.Tensor]:
    gallery = clustered(6000, 32, 40, seed=0)
    rng = np.random.default_rng(1)
    queries = gallery[rng.choice(6000, 200, replace=False)] + 0.2 * rng.standard_normal((200, 32)).astype(np.float32)
    return gallery, torch.from_numpy(queries)


@pytest.mark.parametrize(("factory", "nprobe", "factor"), [("IVF64,Flat", 16, 10), ("IVF32,PQ8x4np", 8, 20)])
def test_recall_and_exact_rerank(data: tuple[np.ndarray, torch.Tensor], factory: str, nprobe: int,
                                 factor: int) -> None:
    """4-bit PQ codes of 4 bytes rank poorly alone; the exact re-rank of a 100-row shortlist recovers top-1."""
    gallery, queries = data
    source = TensorRows(gallery)
    ann = build_index(source, factory, train_size=4000, seed=3, nprobe=nprobe)
    found = ann.search(queries, source, 5, factor=factor)
    exact = search(queries, torch.from_numpy(gallery), 5, backend="torch")
    recall = float((found.indices[:, 0] == exact.indices[:, 0]).float().mean())
    assert recall >= 0.95
    # every re-ranked score is the exact score of its row (float64 elementwise reference)
    g64 = gallery.astype(np.float64)
    g64 /= np.linalg.norm(g64, axis=1, keepdims=True)
    q64 = queries.double().numpy()
    q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
    rows = found.indices.numpy()
    ref = (q64[:, None, :] * g64[rows]).sum(-1)
    np.testing.assert_allclose(found.scores.numpy(), ref, rtol=1e-5, atol=1e-6)
    same = found.indices == exact.indices
    torch.testing.assert_close(found.scores[same], exact.scores[same], rtol=0, atol=0)
    assert (found.scores[:, 1:] <= found.scores[:, :-1]).all()


def test_low_nprobe_loses_matches_the_option_works(data: tuple[np.ndarray, torch.Tensor]) -> None:
    """nprobe is applied: probing 1 of 64 lists finds fewer exact top-1 rows than probing all."""
    gallery, queries = data
    source = TensorRows(gallery)
    ann = build_index(source, "IVF64,Flat", train_size=4000, seed=3)
    exact = search(queries, torch.from_numpy(gallery), 1, backend="torch").indices[:, 0]
    narrow = float((ann.search(queries, source, 1, factor=1, nprobe=1).indices[:, 0] == exact).float().mean())
    full = float((ann.search(queries, source, 1, factor=1, nprobe=64).indices[:, 0] == exact).float().mean())
    assert full == 1.0 and narrow < full


def test_ties_excludes_and_padding() -> None:
    rng = np.random.default_rng(4)
    unique = rng.standard_normal((5, 8)).astype(np.float32)
    gallery = unique[rng.integers(0, 5, 300)]
    source = TensorRows(gallery)
    ann = build_index(source, "IVF4,Flat", train_size=300, nprobe=4)
    q = torch.from_numpy(gallery[:10].copy())
    exclude = torch.arange(10)
    found = ann.search(q, source, 30, factor=20, exclude=exclude)
    exact = search(q, torch.from_numpy(gallery), 30, exclude=exclude, backend="torch")
    assert torch.equal(found.indices, exact.indices)  # 300 >= shortlist: all tie groups found, rows ascending
    assert not (found.indices == exclude[:, None]).any()
    small = TensorRows(gallery[:6])
    padded = build_index(small, "IVF2,Flat", train_size=6, nprobe=2).search(q[:2], small, 9, factor=1)
    assert (padded.indices[:, 6:] == -1).all() and torch.isneginf(padded.scores[:, 6:]).all()


def test_save_load_and_refusals(tmp_path: Path, data: tuple[np.ndarray, torch.Tensor]) -> None:
    gallery, queries = data
    source = TensorRows(gallery[:2000])
    path = tmp_path / "idx.faiss"
    ann = build_index(source, "IVF16,Flat", path=path, train_size=1000, nprobe=8)
    record = json.loads((tmp_path / "idx.faiss.json").read_text())
    assert record["factory"] == "IVF16,Flat" and record["num_rows"] == 2000 and record["nprobe"] == 8
    assert record["bytes_per_vector"] == 32 * 4 + 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    loaded = AnnIndex.load(path)
    a, b = ann.search(queries, source, 3), loaded.search(queries, source, 3)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    with pytest.raises(UserError, match="exists; pass overwrite=True"):
        build_index(source, "IVF16,Flat", path=path, train_size=1000)
    build_index(source, "IVF8,Flat", path=path, train_size=1000, overwrite=True)
    assert AnnIndex.load(path).factory == "IVF8,Flat"
    foreign = tmp_path / "notes.faiss"
    foreign.write_text("mine")
    with pytest.raises(UserError, match="not an index this suite wrote"):
        build_index(source, "IVF16,Flat", path=foreign, overwrite=True)
    assert foreign.read_text() == "mine"
    with pytest.raises(UserError, match="rebuild the index"):
        loaded.search(queries, TensorRows(gallery[:1999]), 3)
    with pytest.raises(UserError, match="cannot build index factory string 'IVFx'"):
        build_index(source, "IVFx")
    with pytest.raises(UserError, match="no ANN index"):
        AnnIndex.load(tmp_path / "missing.faiss")
    with pytest.raises(ValueError, match="global features"):
        build_index(TensorRows(np.zeros((4, 2, 3), np.float32)), "Flat")


def test_index_over_a_feature_store(tmp_path: Path, data: tuple[np.ndarray, torch.Tensor]) -> None:
    """Built from a float16 store (saved beside it by default), re-ranked from the store's rows."""
    from lit.store import FeatureStore, StoreWriter
    from models.descriptor_config import DescriptorConfig

    gallery, queries = data
    writer = StoreWriter(tmp_path / "train", DescriptorConfig("pixel").record(), (32,),
                         compare=DescriptorConfig.differences)
    for start in range(0, 3000, 1000):
        writer.write_shard(str(start), gallery[start : start + 1000], [str(i) for i in range(start, start + 1000)],
                           start=start)
    writer.finalize()
    store = FeatureStore.open(tmp_path / "train")
    ann = build_index(store, "IVF32,Flat", train_size=2000, nprobe=32, block_rows=512)
    assert (tmp_path / "train.index-IVF32_Flat.faiss").is_file()
    found = ann.search(queries, store, 4)
    exact = search(queries, torch.from_numpy(store.slice(0, 3000, np.float32)), 4, backend="torch")
    assert torch.equal(found.indices, exact.indices)  # every list probed: the shortlist holds the top 4
    torch.testing.assert_close(found.scores, exact.scores, rtol=0, atol=0)
