"""Similarity references for the tests that do not depend on BLAS summation order.

A matrix product ``q @ g.T`` goes through BLAS, whose kernels (OpenBLAS picks
another one on AMD Zen, Intel AVX-512, ...) may sum the columns of one output
row in a different order from those of another: two identical gallery vectors
can then get reference scores one ulp apart, and a reference ranking that breaks
ties by gallery row is wrong on that machine only. These references compute in
float64 with an explicit elementwise product and sum, once per *unique* vector,
so identical vectors get bitwise-identical scores on every CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Array = np.ndarray | torch.Tensor


def _float64(x: Array) -> np.ndarray:
    return (x.detach().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)).copy()


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of ``x`` (first axis) and, for each row, which distinct row it is."""
    flat = np.ascontiguousarray(x.reshape(len(x), -1))
    unique, inverse = np.unique(flat, axis=0, return_inverse=True)
    return unique.reshape((len(unique),) + x.shape[1:]), inverse.reshape(-1)


def pairwise(queries: Array, gallery: Array, score: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """``(Q, G)`` float64 matrix of ``score(query_rows, gallery_rows)``, computed once per pair of unique rows."""
    q, g = _float64(queries), _float64(gallery)
    if len(q) == 0 or len(g) == 0:
        return np.zeros((len(q), len(g)))
    unique_q, row_q = _unique_rows(q)
    unique_g, row_g = _unique_rows(g)
    table = np.empty((len(unique_q), len(unique_g)))
    chunk = max(1, 2**22 // max(1, unique_g[0].size * len(unique_g)))  # bounded (chunk, G, ...) products
    for start in range(0, len(unique_q), chunk):
        table[start:start + chunk] = score(unique_q[start:start + chunk], unique_g)
    return table[row_q][:, row_g]


def _dot(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Inner products of (n, D) and (m, D) rows as an explicit product and sum (no BLAS)."""
    return (q[:, None, :] * g[None, :, :]).sum(axis=-1)


def _unit(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return x / np.maximum(np.sqrt((x * x).sum(axis=axes, keepdims=True)), 1e-12)


def cosine_scores(queries: Array, gallery: Array) -> np.ndarray:
    """Cosine similarity ``(Q, G)`` in float64 (L2-normalised rows, explicit products)."""
    return pairwise(queries, gallery, lambda q, g: _dot(_unit(q, (1,)), _unit(g, (1,))))


def dot_scores(queries: Array, gallery: Array) -> np.ndarray:
    """Plain inner products ``(Q, G)`` in float64 (explicit products)."""
    return pairwise(queries, gallery, _dot)


def split_product_scores(queries: Array, gallery: Array, mode: str) -> np.ndarray:
    """Split-product ``max_t <q_t, g_t>`` ``(Q, G)`` in float64 for token features ``(N, T, D)``.

    ``mode``: ``token`` normalises every token, ``global`` every whole (T, D) vector, ``none`` nothing.
    """

    def score(q: np.ndarray, g: np.ndarray) -> np.ndarray:
        if mode == "token":
            q, g = _unit(q, (2,)), _unit(g, (2,))
        elif mode == "global":
            q, g = _unit(q, (1, 2)), _unit(g, (1, 2))
        elif mode != "none":
            raise ValueError(f"unknown mode {mode!r}")
        return (q[:, None] * g[None]).sum(axis=-1).max(axis=-1)

    return pairwise(queries, gallery, score)

def reference_topk(
    scores: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stable ranking by (-score, row); excluded rows removed; -1 / -inf padding."""
    num_q, num_g = scores.shape
    out_i = np.full((num_q, k), -1, dtype=np.int64)
    out_s = np.full((num_q, k), -np.inf)
    for r in range(num_q):
        rows = np.arange(num_g)
        if exclude is not None and exclude[r] >= 0:
            rows = rows[rows != exclude[r]]
        order = rows[np.lexsort((rows, -scores[r, rows]))][:k]
        out_i[r, : len(order)] = order
        out_s[r, : len(order)] = scores[r, order]
    return out_s, out_i
