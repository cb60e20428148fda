"""Reference tests for lit.search.

The reference is a float64 numpy brute force: the full similarity matrix,
excluded entries removed, every row ranked with a stable sort on
(-score, gallery row). Ties come from exactly duplicated gallery vectors,
whose reference scores are equal by construction: the scores are computed
once per unique vector with an explicit product and sum
(``tests/reference_scores.py``), never by a BLAS matrix product, whose
kernels may score identical columns an ulp apart (OpenBLAS on AVX-512).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit.search import SearchResult, TensorRows, normalized_rows, rerank, search, self_search, similarity_for
from tests.reference_scores import cosine_scores, reference_topk, split_product_scores

MODES = ["token", "global", "none"]


def cosine_matrix(q: torch.Tensor, g: torch.Tensor) -> np.ndarray:
    return cosine_scores(q, g)


def split_product_matrix(q: torch.Tensor, g: torch.Tensor, mode: str) -> np.ndarray:
    return split_product_scores(q, g, mode)




def assert_matches(result: SearchResult, ref: tuple[np.ndarray, np.ndarray]) -> None:
    ref_s, ref_i = ref
    assert result.scores.dtype == torch.float32 and result.indices.dtype == torch.int64
    np.testing.assert_array_equal(result.indices.numpy(), ref_i)
    np.testing.assert_allclose(result.scores.numpy(), ref_s, rtol=1e-5, atol=1e-5)


def assert_ties_by_row(result: SearchResult) -> None:
    """Scores descending; where returned scores are equal, rows ascend."""
    s, i = result.scores, result.indices
    assert (s[:, 1:] <= s[:, :-1]).all()
    tied = (s[:, 1:] == s[:, :-1]) & (i[:, 1:] >= 0)
    assert (i[:, 1:][tied] > i[:, :-1][tied]).all()


def duplicated(unique: torch.Tensor, num: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``num`` rows drawn from ``unique`` (exact copies), and which unique row each is."""
    group = torch.randint(0, unique.shape[0], (num,), generator=torch.Generator().manual_seed(seed))
    return unique[group].clone(), group.numpy()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_cosine_matches_bruteforce() -> None:
    q, g = torch.randn(40, 24, generator=gen(0)), torch.randn(300, 24, generator=gen(1)) * 5
    result = search(q, g, 10)
    assert_matches(result, reference_topk(cosine_matrix(q, g), 10))


def test_blockwise_equals_one_shot() -> None:
    q, g = torch.randn(23, 16, generator=gen(2)), torch.randn(101, 16, generator=gen(3))
    one_shot = search(q, g, 12)
    blocked = search(q, g, 12, gallery_block=7, query_block=5)
    assert torch.equal(one_shot.indices, blocked.indices)
    assert torch.equal(one_shot.scores, blocked.scores)
    assert_matches(blocked, reference_topk(cosine_matrix(q, g), 12))


@pytest.mark.parametrize(
    ("gallery_block", "k"), [(65536, 5), (65536, 40), (65536, 110), (37, 40), (1, 7)]
)
def test_exact_ties_break_by_row(gallery_block: int, k: int) -> None:
    """~50 copies of each of 6 vectors: k cuts through tie groups, beyond faiss's spare candidates
    (k=110: faiss selects by partition, not a heap, and keeps arbitrary tied rows)."""
    q = torch.randn(30, 16, generator=gen(4))
    g, _ = duplicated(torch.randn(6, 16, generator=gen(5)), 300, seed=6)
    result = search(q, g, k, gallery_block=gallery_block)
    assert_matches(result, reference_topk(cosine_matrix(q, g), k))
    assert_ties_by_row(result)


def test_ties_on_faiss_blas_path() -> None:
    """Enough queries for faiss's BLAS kernels, which can score identical vectors an ulp apart."""
    q = torch.randn(1100, 128, generator=gen(7))
    g, _ = duplicated(torch.randn(4, 128, generator=gen(8)), 300, seed=9)
    g[::7] = torch.randn(g[::7].shape, generator=gen(10))  # some distinct rows in between
    result = search(q, g, 30, gallery_block=150)
    assert_matches(result, reference_topk(cosine_matrix(q, g), 30))
    assert_ties_by_row(result)


def test_exclude_drops_one_row_per_query() -> None:
    q = torch.randn(12, 8, generator=gen(11))
    g, _ = duplicated(torch.randn(3, 8, generator=gen(12)), 40, seed=13)
    exclude = torch.randint(-1, 40, (12,), generator=gen(14))
    exclude[0] = -1
    ref = reference_topk(cosine_matrix(q, g), 15, exclude.numpy())
    for block in (65536, 6):
        result = search(q, g, 15, exclude=exclude, gallery_block=block)
        assert_matches(result, ref)
        assert not (result.indices == exclude[:, None]).any()


def test_self_search_excludes_own_row() -> None:
    feats = torch.randn(50, 10, generator=gen(15))
    feats[20] = feats[3]  # a duplicate: row 3's best match is row 20 and vice versa
    result = self_search(feats, 4, gallery_block=9)
    ref = reference_topk(cosine_matrix(feats, feats), 4, np.arange(50))
    assert_matches(result, ref)
    assert result.indices[3, 0] == 20 and result.indices[20, 0] == 3
    assert result.scores[3, 0] == pytest.approx(1.0)
    with pytest.raises(TypeError, match="exclude"):
        self_search(feats, 4, exclude=torch.zeros(50, dtype=torch.long))


def test_fewer_than_k_items_are_padded() -> None:
    q, g = torch.randn(4, 6, generator=gen(16)), torch.randn(3, 6, generator=gen(17))
    result = search(q, g, 5)
    assert_matches(result, reference_topk(cosine_matrix(q, g), 5))
    assert (result.indices[:, 3:] == -1).all() and torch.isneginf(result.scores[:, 3:]).all()
    excluded = search(q, g, 5, exclude=torch.tensor([0, 1, 2, -1]), gallery_block=2)
    assert (excluded.indices[:3, 2:] == -1).all() and (excluded.indices[3, 3:] == -1).all()
    empty = search(q, g[:0], 2)
    assert (empty.indices == -1).all() and torch.isneginf(empty.scores).all()
    assert search(q[:0], g, 2).indices.shape == (0, 2)
    tokens = search(q[:, None], g[:, None], 5, similarity="split_product", gallery_block=2)
    assert_matches(tokens, reference_topk(cosine_matrix(q, g), 5))


@pytest.mark.parametrize("mode", MODES)
def test_split_product_matches_bruteforce(mode: str) -> None:
    q = torch.randn(11, 5, 6, generator=gen(18))
    unique = torch.randn(9, 5, 6, generator=gen(19))
    unique[::2] *= 3.0  # different norms matter to "none" and "global", not to "token"
    unique[1, 2] *= 0.1  # and one token with a different norm matters to "token" and "none"
    g, _ = duplicated(unique, 45, seed=20)
    exclude = torch.randint(-1, 45, (11,), generator=gen(21))
    ref = reference_topk(split_product_matrix(q, g, mode), 8, exclude.numpy())
    for gallery_block, query_block in ((65536, 4096), (4, 3)):
        result = search(
            q, g, 8, similarity="split_product", normalization=mode,  # type: ignore[arg-type]
            exclude=exclude, gallery_block=gallery_block, query_block=query_block,
        )
        assert_matches(result, ref)
        assert_ties_by_row(result)


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    q, g = torch.randn(3, 4, generator=gen(22)), torch.randn(10, 4, generator=gen(23))
    search(q, g, 2, gallery_block=4, progress=True)
    assert "3/3" in capsys.readouterr().err


def test_input_errors() -> None:
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    tok = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match=r"differ in feature shape \(4,\) vs \(5,\)"):
        search(q, torch.randn(5, 5), 2)
    with pytest.raises(ValueError, match="k must be a positive int"):
        search(q, g, 0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        search(q, g, True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gallery_block must be a positive int"):
        search(q, g, 2, gallery_block=0)
    with pytest.raises(ValueError, match="need similarity='split_product'"):
        search(tok, tok, 2)
    with pytest.raises(ValueError, match="need similarity='cosine'"):
        search(q, g, 2, similarity="split_product")
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        search(torch.randn(3), g, 2)
    with pytest.raises(ValueError, match="similarity must be one of"):
        search(q, g, 2, similarity="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="normalization must be one of"):
        search(tok, tok, 2, similarity="split_product", normalization="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating point"):
        search(q.long(), g, 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        search(q.numpy(), g, 2)  # type: ignore[arg-type]


def test_exclude_errors() -> None:
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"exclude must have shape \(3,\)"):
        search(q, g, 2, exclude=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer gallery rows"):
        search(q, g, 2, exclude=torch.zeros(3))
    with pytest.raises(ValueError, match=r"in \[0, 5\) or -1"):
        search(q, g, 2, exclude=torch.tensor([0, 5, -1]))
    with pytest.raises(ValueError, match=r"in \[0, 5\) or -1"):
        search(q, g, 2, exclude=torch.tensor([0, -2, 1]))


def test_non_finite_features_are_rejected() -> None:
    q, g = torch.randn(3, 4), torch.randn(5, 4)
    g[2, 1] = float("nan")
    with pytest.raises(ValueError, match="gallery row 2 contains NaN or inf"):
        search(q, g, 2)
    q[1, 0] = float("inf")
    with pytest.raises(ValueError, match="queries row 1 contains NaN or inf"):
        search(q, torch.randn(5, 4), 2)
    tok = torch.randn(3, 2, 4)
    tok[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        search(tok, tok, 2, similarity="split_product")


def test_reference_scores_do_not_depend_on_row_position() -> None:
    """The reference itself: copies of one vector score bitwise-equal wherever they sit in the gallery
    (a BLAS product may not: OpenBLAS's AVX-512 kernel sums the last columns of a 300-wide row in
    another order), and every score is the correctly rounded dot product to float64 precision."""
    import math

    q = torch.randn(64, 300, generator=gen(24))
    g, group = duplicated(torch.randn(5, 300, generator=gen(25)), 300, seed=26)
    scores = cosine_matrix(q, g)
    for k in range(5):
        copies = scores[:, group == k]
        assert (copies == copies[:, :1]).all()
    qn = q.double().numpy() / np.linalg.norm(q.double().numpy(), axis=1, keepdims=True)
    gn = g.double().numpy() / np.linalg.norm(g.double().numpy(), axis=1, keepdims=True)
    for r, c in [(0, 0), (5, 296), (63, 299)]:
        assert scores[r, c] == pytest.approx(math.fsum(qn[r] * gn[c]), abs=1e-14)


@pytest.mark.parametrize(("gallery_block", "k"), [(13, 10), (40, 25), (7, 3)])
def test_ties_at_the_kth_place_across_blocks(gallery_block: int, k: int) -> None:
    """Copies of the same few vectors in every gallery block: the faiss engine rescores only the
    candidates of a later block that can still enter the running top k, so a copy that ties with
    the k-th place from a later block must lose to the earlier row, and one that beats it must enter."""
    unique = torch.randn(5, 12, generator=gen(30))
    g, _ = duplicated(unique, 200, seed=31)
    g[::3] = torch.randn(g[::3].shape, generator=gen(32))  # distinct rows between the copies
    q = torch.cat([unique[:3], torch.randn(20, 12, generator=gen(33))])
    exclude = torch.randint(-1, 200, (23,), generator=gen(34))
    for excl in (None, exclude):
        result = search(q, g, k, exclude=excl, gallery_block=gallery_block, query_block=7)
        ref = reference_topk(cosine_matrix(q, g), k, None if excl is None else excl.numpy())
        assert_matches(result, ref)
        assert_ties_by_row(result)
        assert torch.equal(result.indices, search(q, g, k, exclude=excl, backend="torch").indices)


def test_one_entry_for_tensors_and_row_sources() -> None:
    """A RowSource gallery takes the same arguments as a tensor and gives the same lists; its
    similarity is named like a tensor's (tokens need similarity='split_product')."""
    q, g = torch.randn(9, 8, generator=gen(35)), torch.randn(60, 8, generator=gen(36))
    for backend in ("faiss", "torch"):
        in_memory = search(q, g, 6, gallery_block=16, backend=backend)  # type: ignore[arg-type]
        streamed = search(q, TensorRows(g), 6, gallery_block=16, backend=backend)  # type: ignore[arg-type]
        assert torch.equal(in_memory.indices, streamed.indices) and torch.equal(in_memory.scores, streamed.scores)
    tokens = torch.randn(30, 3, 8, generator=gen(37))
    with pytest.raises(ValueError, match="need similarity='split_product'"):
        search(tokens[:4], TensorRows(tokens), 2)
    found = search(tokens[:4], TensorRows(tokens), 2, similarity=similarity_for((3, 8)))
    assert_matches(found, reference_topk(split_product_matrix(tokens[:4], tokens, "token"), 2))
    with pytest.raises(TypeError, match="gallery must be a torch.Tensor or a RowSource"):
        search(q, [[0.0] * 8], 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="differ in feature shape"):
        search(q, TensorRows(torch.randn(5, 7)), 2)


def test_similarity_for_feature_shapes() -> None:
    assert similarity_for((512,)) == "cosine"
    assert similarity_for((197, 768)) == "split_product"
    with pytest.raises(ValueError, match="global"):
        similarity_for(())


def test_rerank_orders_candidates_exactly() -> None:
    """rerank: the float64 reference restricted to each query's candidates, in (score desc, row asc)
    order, padded to k; on the rows the torch engine returns, its scores are bitwise the engine's."""
    q = torch.randn(6, 10, generator=gen(38))
    g, _ = duplicated(torch.randn(8, 10, generator=gen(39)), 50, seed=40)
    candidates = torch.stack([torch.randperm(50, generator=gen(41 + i))[:9] for i in range(6)])
    candidates[0, 4:] = -1
    result = rerank(q, candidates, TensorRows(g), 7)
    scores = cosine_matrix(q, g)
    for r in range(6):
        rows = [c for c in candidates[r].tolist() if c >= 0]
        expected = sorted(rows, key=lambda c: (-scores[r, c], c))[:7]
        expected += [-1] * (7 - len(expected))
        assert result.indices[r].tolist() == expected
        kept = [c for c in expected if c >= 0]
        np.testing.assert_allclose(result.scores[r, : len(kept)].numpy(), scores[r, kept], rtol=1e-5, atol=1e-6)
        assert torch.isneginf(result.scores[r, len(kept):]).all()
    engine = search(q, g, 5, backend="torch")
    again = rerank(q, engine.indices, TensorRows(g), 5)
    assert torch.equal(again.indices, engine.indices) and torch.equal(again.scores, engine.scores)


def test_normalized_rows_names_the_bad_row() -> None:
    x = torch.randn(6, 4, generator=gen(42))
    out = normalized_rows(x)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    x[4, 2] = float("inf")
    with pytest.raises(ValueError, match="gallery row 14 contains NaN or inf"):
        normalized_rows(x, "gallery", 10)

