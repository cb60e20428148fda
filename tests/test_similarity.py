"""Reference tests for lit.similarity.

Independent references: scikit-learn's cosine similarity, a float64 numpy
split-product that materialises the (Q, G, T) products, and hand-computed
cases. The memory bound is checked twice: no ``torch.bmm`` output anywhere
near (Q, G, T), and the peak RSS of a child process on a case whose naive
(Q, G, T) tensor takes 512 MB.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity as sk_cosine

from lit import similarity
from lit.similarity import (
    cosine_similarity,
    l2_normalize,
    normalize_tokens,
    split_product,
)
from tests.reference_scores import dot_scores, split_product_scores

REPO = Path(__file__).resolve().parents[1]
MODES = ["token", "global", "none"]


def numpy_split_product(q: np.ndarray, g: np.ndarray, mode: str) -> np.ndarray:
    """float64 brute force: normalise, all (Q, G, T) token products, max over T (explicit products,
    no einsum/BLAS kernel whose summation order depends on alignment or CPU)."""
    return split_product_scores(q, g, mode)


def test_l2_normalize_unit_norm_and_zero_vector() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 1.0]])
    out = l2_normalize(x)
    expected = [[0.6, 0.8], [0, 0], [-math.sqrt(0.5), math.sqrt(0.5)]]
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-7)
    col = l2_normalize(x, dim=0)
    np.testing.assert_allclose(np.linalg.norm(col.numpy(), axis=0), [1.0, 1.0], atol=1e-6)


def test_normalize_tokens_modes() -> None:
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    tok = normalize_tokens(x, "token")
    np.testing.assert_allclose(tok.norm(dim=-1).numpy(), np.ones((4, 3)), atol=1e-6)
    glob = normalize_tokens(x, "global")
    np.testing.assert_allclose(glob.reshape(4, -1).norm(dim=1).numpy(), np.ones(4), atol=1e-6)
    # global keeps the relative size of tokens within a sample
    ratio = glob.norm(dim=-1) / x.norm(dim=-1)
    np.testing.assert_allclose(ratio.numpy(), ratio[:, :1].expand(-1, 3).numpy(), rtol=1e-5)
    assert normalize_tokens(x, "none") is x


def test_normalize_tokens_errors() -> None:
    with pytest.raises(ValueError, match="normalization must be one of"):
        normalize_tokens(torch.zeros(2, 3, 4), "l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, T, D\)"):
        normalize_tokens(torch.zeros(2, 3))


def test_cosine_similarity_matches_sklearn() -> None:
    gen = torch.Generator().manual_seed(1)
    q, g = torch.randn(7, 12, generator=gen), torch.randn(9, 12, generator=gen)
    out = cosine_similarity(q, g)
    assert out.dtype == torch.float32 and out.shape == (7, 9)
    np.testing.assert_allclose(out.numpy(), sk_cosine(q.numpy(), g.numpy()), atol=1e-6)
    raw = cosine_similarity(q.double(), g.double(), normalize=False)
    assert raw.dtype == torch.float32
    np.testing.assert_allclose(raw.numpy(), dot_scores(q, g), rtol=1e-5, atol=1e-5)


def test_cosine_similarity_errors() -> None:
    with pytest.raises(ValueError, match=r"must agree in \(D\)"):
        cosine_similarity(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"global features \(N, D\)"):
        cosine_similarity(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match="floating point"):
        cosine_similarity(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        cosine_similarity(np.zeros((2, 3)), torch.zeros(2, 3))  # type: ignore[arg-type]


def test_split_product_hand_computed() -> None:
    # tokens: q = (1, 0), (0, 2); g = (3, 0), (0, -1); products 3 and -2
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    g = torch.tensor([[[3.0, 0.0], [0.0, -1.0]]])
    assert split_product(q, g, "none").item() == pytest.approx(3.0)
    assert split_product(q, g, "token").item() == pytest.approx(1.0)  # cosines 1 and -1
    assert split_product(q, g, "global").item() == pytest.approx(3.0 / math.sqrt(5 * 10))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("shape", "block_size"),
    [((13, 17, 5, 7), 4), ((6, 23, 3, 16), 5), ((3, 2, 1, 4), 256), ((9, 9, 11, 3), 1)],
)
def test_split_product_matches_bruteforce(
    mode: str, shape: tuple[int, ...], block_size: int
) -> None:
    nq, ng, t, d = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q, g = torch.randn(nq, t, d, generator=gen), torch.randn(ng, t, d, generator=gen) * 3
    ref = numpy_split_product(q.numpy(), g.numpy(), mode)
    out = split_product(q, g, mode, block_size=block_size)  # type: ignore[arg-type]
    assert out.shape == (nq, ng) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
    qn, gn = normalize_tokens(q, mode), normalize_tokens(g, mode)  # type: ignore[arg-type]
    naive = torch.einsum("qtd,gtd->qgt", qn, gn).amax(-1)
    np.testing.assert_allclose(out.numpy(), naive.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_split_product_other_dtypes(mode: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 4, 6, generator=gen).to(dtype)
    g = torch.randn(7, 4, 6, generator=gen).to(dtype)
    out = split_product(q, g, mode, block_size=3)  # type: ignore[arg-type]
    assert out.dtype == torch.float32
    ref = numpy_split_product(q.double().numpy(), g.double().numpy(), mode)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_split_product_single_token_is_cosine() -> None:
    gen = torch.Generator().manual_seed(4)
    q, g = torch.randn(5, 1, 8, generator=gen), torch.randn(6, 1, 8, generator=gen)
    expected = sk_cosine(q[:, 0].numpy(), g[:, 0].numpy())
    np.testing.assert_allclose(split_product(q, g, "token").numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(split_product(q, g, "global").numpy(), expected, atol=1e-6)


def test_split_product_zero_tokens_and_empty_inputs() -> None:
    q = torch.zeros(2, 3, 4)
    q[1, 0, 0] = 1.0
    g = torch.ones(3, 3, 4)
    out = split_product(q, g, "token")
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.numpy(), [[0, 0, 0], [0.5, 0.5, 0.5]], atol=1e-6)
    assert split_product(torch.zeros(0, 3, 4), g).shape == (0, 3)
    assert split_product(q, torch.zeros(0, 3, 4)).shape == (2, 0)


def test_split_product_errors() -> None:
    a = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"must agree in \(T, D\)"):
        split_product(a, torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match=r"must agree in \(T, D\)"):
        split_product(a, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"token features \(N, T, D\)"):
        split_product(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="block_size"):
        split_product(a, a, block_size=0)
    with pytest.raises(ValueError, match="normalization must be one of"):
        split_product(a, a, "cls")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="T >= 1"):
        split_product(torch.zeros(2, 0, 4), torch.zeros(2, 0, 4))


def test_split_product_never_builds_qgt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every per-token product block stays within CHUNK_BYTES, far below (Q, G, T)."""
    sizes: list[int] = []
    real_bmm = torch.bmm

    def recording_bmm(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        out = real_bmm(*args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "bmm", recording_bmm)
    monkeypatch.setattr(similarity, "CHUNK_BYTES", 4 * 8 * 8 * 3)  # 3 tokens of an 8 x 8 block
    gen = torch.Generator().manual_seed(5)
    q, g = torch.randn(20, 10, 4, generator=gen), torch.randn(30, 10, 4, generator=gen)
    out = split_product(q, g, "token", block_size=8)
    assert sizes, "split_product no longer uses torch.bmm: update this test"
    assert max(sizes) <= 3 * 8 * 8 < 20 * 30 * 10
    ref = numpy_split_product(q.numpy(), g.numpy(), "token")
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)


def test_split_product_peak_memory_is_bounded() -> None:
    """A child process's peak RSS grows < 100 MB where naive (Q, G, T) needs 512 MB."""
    code = textwrap.dedent(
        """
        import torch
        from lit.similarity import split_product
        torch.manual_seed(0)
        torch.set_num_threads(1)  # memory, not speed: immune to a busy machine
        q, g = torch.randn(128, 256, 8), torch.randn(4096, 256, 8)
        split_product(q[:2], g[:2])  # load kernels, start threads
        open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM (peak RSS) to current RSS
        rss = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0])
        before = rss("VmRSS")
        out = split_product(q, g, "none")
        print((rss("VmHWM") - before) / 1024, out.shape[0] * out.shape[1] * 4 / 2**20)
        """
    )
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs")
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    extra_mb, output_mb = map(float, res.stdout.split())
    naive_mb = 128 * 4096 * 256 * 4 / 2**20
    assert naive_mb > 500
    assert extra_mb < 100, f"peak RSS grew {extra_mb:.0f} MB (output {output_mb:.0f} MB)"
