"""The torch search engine (``backend="torch"``), run on CPU tensors: the same code path as on CUDA.

References are float64 elementwise products summed in numpy (no BLAS, so no
dependence on the CPU's kernels); ties come from exactly duplicated gallery
vectors, whose reference scores are equal by construction. The engine must
return the reference's rows exactly (also where reduced-precision products
blur the ranking: its shortlist is rescored in float32) and the same lists as
the faiss engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lit.search as lit_search
from lit.search import SearchResult, TensorRows, search, self_search
from lit.similarity import split_product
from tests.reference_scores import reference_topk

PRECISIONS = ["float32", "tf32", "bf16"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit64(x: torch.Tensor, axes: tuple[int, ...] = (-1,)) -> np.ndarray:
    a = x.double().numpy()
    return a / np.sqrt((a * a).sum(axis=axes, keepdims=True))


def cosine64(q: torch.Tensor, g: torch.Tensor) -> np.ndarray:
    """(Q, G) cosine scores from float64 elementwise products (no matrix product)."""
    return (unit64(q)[:, None, :] * unit64(g)[None, :, :]).sum(-1)


def split_product64(q: torch.Tensor, g: torch.Tensor, mode: str) -> np.ndarray:
    """(Q, G) split-product scores in float64, elementwise: max over tokens of per-token dots."""
    if mode == "token":
        qn, gn = unit64(q), unit64(g)
    elif mode == "global":
        qn, gn = unit64(q, (-2, -1)), unit64(g, (-2, -1))
    else:
        qn, gn = q.double().numpy(), g.double().numpy()
    return (qn[:, None] * gn[None]).sum(-1).max(-1)




def assert_matches(result: SearchResult, ref: tuple[np.ndarray, np.ndarray]) -> None:
    assert result.scores.dtype == torch.float32 and result.indices.dtype == torch.int64
    assert result.scores.device.type == "cpu" and result.indices.device.type == "cpu"
    np.testing.assert_array_equal(result.indices.numpy(), ref[1])
    np.testing.assert_allclose(result.scores.numpy(), ref[0], rtol=1e-5, atol=1e-5)


def assert_ties_by_row(result: SearchResult) -> None:
    s, i = result.scores, result.indices
    assert (s[:, 1:] <= s[:, :-1]).all()
    tied = (s[:, 1:] == s[:, :-1]) & (i[:, 1:] >= 0)
    assert (i[:, 1:][tied] > i[:, :-1][tied]).all()


def tied_gallery(num: int, dim: int, groups: int, seed: int) -> torch.Tensor:
    """``num`` rows: exact copies of ``groups`` vectors, every 5th row a distinct vector instead."""
    unique = torch.randn(groups, dim, generator=gen(seed))
    pick = torch.randint(0, groups, (num,), generator=gen(seed + 1))
    g = unique[pick].clone()
    g[::5] = torch.randn(g[::5].shape, generator=gen(seed + 2))
    return g


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(("gallery_block", "k"), [(65536, 5), (37, 40), (1000, 130)])
def test_torch_cosine_equals_reference_and_faiss(precision: str, gallery_block: int, k: int) -> None:
    """~35 copies of each of 6 vectors: k cuts through tie groups, past the first shortlist."""
    q = torch.randn(25, 24, generator=gen(0))
    g = tied_gallery(260, 24, 6, seed=1) * 3.0
    exclude = torch.randint(-1, 260, (25,), generator=gen(4))
    ref = reference_topk(cosine64(q, g), k, exclude.numpy())
    ours = search(q, g, k, exclude=exclude, gallery_block=gallery_block, query_block=7,
                  backend="torch", precision=precision)  # type: ignore[arg-type]
    assert_matches(ours, ref)
    assert_ties_by_row(ours)
    assert not (ours.indices == exclude[:, None]).any()
    faiss = search(q, g, k, exclude=exclude, gallery_block=gallery_block, backend="faiss")
    assert torch.equal(ours.indices, faiss.indices)
    torch.testing.assert_close(ours.scores, faiss.scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_reduced_precision_near_ties(precision: str) -> None:
    """Distinct rows whose scores differ by less than bf16's rounding still come out in exact order."""
    q = torch.randn(6, 64, generator=gen(5))
    base = torch.randn(1, 64, generator=gen(6))
    g = base + 1e-3 * torch.randn(300, 64, generator=gen(7))  # 300 rows within ~1e-3 of one score
    g = torch.cat([torch.randn(200, 64, generator=gen(8)), g])
    ref = reference_topk(cosine64(q, g), 10)
    assert_matches(search(q, g, 10, backend="torch", precision=precision, gallery_block=64), ref)  # type: ignore[arg-type]


def test_k_beyond_gallery_is_padded() -> None:
    q, g = torch.randn(4, 6, generator=gen(9)), torch.randn(3, 6, generator=gen(10))
    for precision in PRECISIONS:
        result = search(q, g, 5, backend="torch", precision=precision)  # type: ignore[arg-type]
        assert_matches(result, reference_topk(cosine64(q, g), 5))
        assert (result.indices[:, 3:] == -1).all() and torch.isneginf(result.scores[:, 3:]).all()
        excluded = search(q, g, 5, exclude=torch.tensor([0, 1, 2, -1]), gallery_block=2, backend="torch",
                          precision=precision)  # type: ignore[arg-type]
        assert_matches(excluded, reference_topk(cosine64(q, g), 5, np.array([0, 1, 2, -1])))
    assert (search(q, g[:0], 2, backend="torch").indices == -1).all()
    assert search(q[:0], g, 2, backend="torch").indices.shape == (0, 2)


@pytest.mark.parametrize("mode", ["token", "global", "none"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_split_product_on_device_path(mode: str, precision: str) -> None:
    """Tokens: the float64 reference, and the one-tile split-product + stable sort ranking."""
    q = torch.randn(11, 5, 6, generator=gen(11))
    unique = torch.randn(9, 5, 6, generator=gen(12))
    unique[::2] *= 3.0  # norms matter to "none" and "global"
    unique[1, 2] *= 0.1  # one token's norm matters to "token" and "none"
    pick = torch.randint(0, 9, (45,), generator=gen(13))
    g = unique[pick].clone()
    exclude = torch.randint(-1, 45, (11,), generator=gen(14))
    ref = reference_topk(split_product64(q, g, mode), 8, exclude.numpy())
    one_tile = split_product(q, g, mode).numpy().astype(np.float64)  # type: ignore[arg-type]
    one_tile_ref = reference_topk(one_tile, 8, exclude.numpy())
    for gallery_block, query_block in ((65536, 4096), (4, 3)):
        result = search(q, g, 8, similarity="split_product", normalization=mode, exclude=exclude,  # type: ignore[arg-type]
                        gallery_block=gallery_block, query_block=query_block, precision=precision)  # type: ignore[arg-type]
        assert_matches(result, ref)
        np.testing.assert_array_equal(result.indices.numpy(), one_tile_ref[1])
        assert_ties_by_row(result)


def test_no_copies_per_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge stays on the features' device: the number of host copies does not grow with the tiles."""
    calls = {"n": 0}
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self: torch.Tensor, *a: object, **kw: object) -> torch.Tensor:
        calls["n"] += 1
        return real_cpu(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    q, g = torch.randn(30, 8, generator=gen(15)), torch.randn(400, 8, generator=gen(16))
    tq, tg = torch.randn(30, 3, 8, generator=gen(17)), torch.randn(400, 3, 8, generator=gen(18))
    counts = []
    for block in (400, 4):
        calls["n"] = 0
        search(q, g, 5, backend="torch", gallery_block=block, query_block=7)
        search(tq, tg, 5, similarity="split_product", gallery_block=block, query_block=7)
        counts.append(calls["n"])
    assert counts[0] == counts[1] <= 8


def test_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: faiss for CPU float32 cosine; the torch engine for tokens and reduced precision."""
    used: list[str] = []
    real_faiss, real_torch = lit_search._search_global, lit_search._search_torch
    monkeypatch.setattr(lit_search, "_search_global", lambda *a, **kw: used.append("faiss") or real_faiss(*a, **kw))
    monkeypatch.setattr(lit_search, "_search_torch", lambda *a, **kw: used.append("torch") or real_torch(*a, **kw))
    q, g, t = torch.randn(3, 4), torch.randn(9, 4), torch.randn(9, 2, 4)
    search(q, g, 2)
    search(q, g, 2, precision="bf16")
    search(t[:3], t, 2, similarity="split_product")
    search(q, g, 2, backend="torch")
    search(q, g, 2, backend="faiss")
    search(q, TensorRows(g), 2)
    assert used == ["faiss", "torch", "torch", "torch", "faiss", "faiss"]
    with pytest.raises(ValueError, match="backend='faiss' searches global features"):
        search(t[:3], t, 2, similarity="split_product", backend="faiss")
    with pytest.raises(ValueError, match="precision='bf16' needs backend='torch'"):
        search(q, g, 2, backend="faiss", precision="bf16")
    with pytest.raises(ValueError, match="backend must be one of"):
        search(q, g, 2, backend="gpu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision must be one of"):
        search(q, g, 2, precision="fp16")  # type: ignore[arg-type]


def test_search_streams_a_row_source() -> None:
    """A float16 array behind the RowSource protocol: blocks streamed, both engines, self-exclusion."""
    g = tied_gallery(300, 16, 5, seed=19).numpy().astype(np.float16)
    q = torch.from_numpy(g[:20].astype(np.float32))
    exclude = torch.arange(20)
    ref = reference_topk(cosine64(q, torch.from_numpy(g.astype(np.float32))), 7, exclude.numpy())
    for backend in ("faiss", "torch"):
        result = search(q, TensorRows(g), 7, exclude=exclude, gallery_block=64, backend=backend)  # type: ignore[arg-type]
        assert_matches(result, ref)
    tokens = np.random.default_rng(0).standard_normal((50, 3, 4)).astype(np.float16)
    tq = torch.from_numpy(tokens[:6].astype(np.float32))
    result = search(tq, TensorRows(tokens), 4, similarity="split_product", gallery_block=16)
    assert_matches(result, reference_topk(split_product64(tq, torch.from_numpy(tokens.astype(np.float32)), "token"), 4))
    with pytest.raises(ValueError, match="differ in feature shape"):
        search(torch.randn(2, 5), TensorRows(g), 3)


def test_non_finite_rows_are_named() -> None:
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    g[2, 1] = float("nan")
    with pytest.raises(ValueError, match="gallery row 2 contains NaN or inf"):
        search(q, g, 2, backend="torch", gallery_block=2)
    q[1, 0] = float("inf")
    with pytest.raises(ValueError, match="queries row 1 contains NaN or inf"):
        search(q, torch.randn(5, 4), 2, backend="torch")


def test_self_search_on_torch_engine() -> None:
    feats = torch.randn(50, 10, generator=gen(20))
    feats[20] = feats[3]
    result = self_search(feats, 4, backend="torch", precision="bf16", gallery_block=9)
    assert_matches(result, reference_topk(cosine64(feats, feats), 4, np.arange(50)))
    assert result.indices[3, 0] == 20 and result.indices[20, 0] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu() -> None:  # pragma: no cover - runs on GPU machines only
    q = torch.randn(300, 64, generator=gen(21))
    g = tied_gallery(5000, 64, 40, seed=22)
    cpu = search(q, g, 10, backend="torch")
    for precision in PRECISIONS:
        gpu = search(q.cuda(), g.cuda(), 10, precision=precision)  # type: ignore[arg-type]
        assert torch.equal(gpu.indices, cpu.indices)
        torch.testing.assert_close(gpu.scores, cpu.scores, rtol=1e-5, atol=1e-6)


def test_search_on_a_feature_store(tmp_path: Path) -> None:
    """A real float16 store in three shards: both engines equal the float64 reference on its rows."""
    from lit.store import FeatureStore, StoreWriter
    from models.descriptor_config import DescriptorConfig

    g = tied_gallery(240, 16, 6, seed=23).numpy()
    writer = StoreWriter(tmp_path / "store", DescriptorConfig("pixel").record(), (16,),
                         compare=DescriptorConfig.differences)
    for name, start in (("a", 0), ("b", 100), ("c", 170)):
        stop = {"a": 100, "b": 170, "c": 240}[name]
        writer.write_shard(name, g[start:stop], [f"k{i}" for i in range(start, stop)], start=start)
    writer.finalize()
    store = FeatureStore.open(tmp_path / "store")
    stored = torch.from_numpy(store.slice(0, 240, np.float32))  # the float16 values searched
    q = torch.randn(15, 16, generator=gen(24))
    exclude = torch.randint(-1, 240, (15,), generator=gen(25))
    ref = reference_topk(cosine64(q, stored), 12, exclude.numpy())
    for backend, precision in (("faiss", "float32"), ("torch", "float32"), ("torch", "bf16")):
        result = search(q, store, 12, exclude=exclude, gallery_block=32, backend=backend,  # type: ignore[arg-type]
                        precision=precision)  # type: ignore[arg-type]
        assert_matches(result, ref)
        assert_ties_by_row(result)
