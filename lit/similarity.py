"""Similarity functions between query and gallery descriptors.

Two kinds (:data:`lit.choices.SimilarityKind`):

* ``cosine``: global features ``(N, D)``, L2-normalised, inner product.
* ``split_product`` (Somepalli et al. 2023, Sec. 4): token features ``(N, T, D)``,
  ``s(q, g) = max_t <q_t, g_t>`` over corresponding tokens (CLS and patch tokens).

``split_product`` never materialises the ``(Q, G, T)`` tensor: it walks query
and gallery blocks of ``block_size`` rows and token chunks, keeping a running
max, so its extra memory is bounded by the block size whatever ``Q`` and ``G``
are (the ``(Q, G)`` output aside).
"""

from __future__ import annotations

from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from lit.choices import TokenNormalization

#: Bytes for one block's chunk of per-token products ``(t_chunk, Qb, Gb)`` float32. Large
#: enough that a 256 x 256 block takes all 197 tokens of a ViT-B/16 in one ``bmm`` (few,
#: big parallel ops hold up on a busy machine), small enough for < 100 MB extra memory.
CHUNK_BYTES = 64 * 2**20
_EPS = 1e-12


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """``x / max(||x||_2, eps)`` along ``dim``: zero vectors stay zero instead of NaN."""
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


def normalize_tokens(x: Tensor, mode: TokenNormalization = "token") -> Tensor:
    """Normalise token features ``(N, T, D)``.

    ``"token"``: every token has unit L2 norm (split-product scores on the cosine
    scale, so a 0.5 threshold means the same as for cosine). ``"global"``: the
    whole flattened ``T*D`` vector has unit norm (what the authors' code does).
    ``"none"``: ``x`` unchanged.
    """
    _check_mode(mode)
    if x.ndim != 3:
        raise ValueError(f"token features must be (N, T, D), got shape {tuple(x.shape)}")
    if mode == "token":
        return l2_normalize(x, dim=-1)
    if mode == "global":
        return l2_normalize(x.reshape(x.shape[0], -1), dim=-1).reshape(x.shape)
    return x


def cosine_similarity(queries: Tensor, gallery: Tensor, normalize: bool = True) -> Tensor:
    """Cosine similarity ``(Q, D), (G, D) -> (Q, G)`` float32.

    With ``normalize=False``: the plain inner product.
    """
    _check_pair(queries, gallery, ndim=2, what="global features (N, D)")
    q, g = queries.float(), gallery.float()
    if normalize:
        q, g = l2_normalize(q), l2_normalize(g)
    return q @ g.T


@torch.no_grad()
def split_product(
    queries: Tensor,
    gallery: Tensor,
    normalization: TokenNormalization = "token",
    block_size: int = 256,
) -> Tensor:
    """Split-product similarity ``(Q, T, D), (G, T, D) -> (Q, G)`` float32: ``max_t <q_t, g_t>``.

    Computed blockwise: for every block of ``block_size`` queries and
    ``block_size`` gallery rows, per-token products of a chunk of tokens come
    from one ``torch.bmm`` over ``(t, Qb, D) x (t, D, Gb)`` strided views of the
    inputs (no copies for float32), and a running max keeps ``(Qb, Gb)``.
    Normalisation is folded into the products instead of copying the inputs:
    ``"token"`` scales each token's products by the inverse token norms before
    the max; ``"global"`` scales the block's max by the inverse vector norms
    (a positive scale commutes with the max). Extra memory beyond the output
    is at most ``max(CHUNK_BYTES, 4 * block_size**2) + 8 * block_size**2``
    bytes plus the inverse norms (non-float32 inputs are cast a token chunk at
    a time, within ``CHUNK_BYTES``): under 70 MB at the default block size,
    whatever Q, G and T are. Not differentiable.
    """
    _check_pair(queries, gallery, ndim=3, what="token features (N, T, D)")
    _check_mode(normalization)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    num_q, num_tokens, dim = queries.shape
    num_g = gallery.shape[0]
    if num_tokens == 0 or dim == 0:
        raise ValueError(f"token features need T >= 1 and D >= 1, got T={num_tokens}, D={dim}")
    out = torch.empty(num_q, num_g, dtype=torch.float32, device=queries.device)
    if num_q == 0 or num_g == 0:
        return out

    qb_max, gb_max = min(block_size, num_q), min(block_size, num_g)
    cast = queries.dtype != torch.float32 or gallery.dtype != torch.float32
    per_token = qb_max * gb_max + ((qb_max + gb_max) * dim if cast else 0)
    t_chunk = max(1, min(num_tokens, CHUNK_BYTES // (4 * per_token)))
    buffer = torch.empty(t_chunk * qb_max * gb_max, dtype=torch.float32, device=queries.device)
    best_buf = torch.empty(qb_max * gb_max, dtype=torch.float32, device=queries.device)
    chunk_buf = torch.empty_like(best_buf)

    gallery_starts = range(0, num_g, block_size)
    g_scales = [_inverse_norms(gallery[g0 : g0 + block_size], normalization, t_chunk) for g0 in gallery_starts]
    for q0 in range(0, num_q, block_size):
        q_block = queries[q0 : q0 + block_size]
        q_scale = _inverse_norms(q_block, normalization, t_chunk)
        for g0, g_scale in zip(gallery_starts, g_scales):
            g_block = gallery[g0 : g0 + block_size]
            nq, ng = q_block.shape[0], g_block.shape[0]
            best = best_buf[: nq * ng].view(nq, ng)
            chunk_max = chunk_buf[: nq * ng].view(nq, ng)
            for t0 in range(0, num_tokens, t_chunk):
                t1 = min(num_tokens, t0 + t_chunk)
                a = q_block[:, t0:t1].transpose(0, 1).float()  # (t, nq, D) strided view
                b = g_block[:, t0:t1].permute(1, 2, 0).float()  # (t, D, ng) strided view
                prod = torch.bmm(a, b, out=buffer[: (t1 - t0) * nq * ng].view(t1 - t0, nq, ng))
                if normalization == "token":
                    prod.mul_(q_scale[t0:t1, :, None]).mul_(g_scale[t0:t1, None, :])
                if t0 == 0:
                    torch.amax(prod, dim=0, out=best)
                else:
                    torch.maximum(best, torch.amax(prod, dim=0, out=chunk_max), out=best)
            if normalization == "global":
                best.mul_(q_scale[:, None]).mul_(g_scale[None, :])
            out[q0 : q0 + nq, g0 : g0 + ng] = best
    return out


def _inverse_norms(block: Tensor, mode: TokenNormalization, t_chunk: int) -> Tensor:
    """Inverse L2 norms of a block: ``(T, N)`` per token for "token", ``(N,)`` per row for "global".

    Reduces token chunk by token chunk so a non-float32 block is cast a chunk at a time.
    """
    if mode == "none":
        return block.new_empty(0, dtype=torch.float32)
    num_tokens = block.shape[1]
    norms = torch.empty(num_tokens, block.shape[0], dtype=torch.float32, device=block.device)
    for t0 in range(0, num_tokens, t_chunk):
        norms[t0 : t0 + t_chunk] = torch.linalg.vector_norm(
            block[:, t0 : t0 + t_chunk].float(), dim=-1
        ).T
    if mode == "global":  # ||x|| = sqrt(sum_t ||x_t||^2)
        norms = torch.linalg.vector_norm(norms, dim=0)
    return norms.clamp_min_(_EPS).reciprocal_()


def _check_mode(mode: str) -> None:
    if mode not in get_args(TokenNormalization):
        raise ValueError(
            f"normalization must be one of {get_args(TokenNormalization)}, got {mode!r}"
        )


def _check_pair(queries: Tensor, gallery: Tensor, ndim: int, what: str) -> None:
    """One-line errors for the wrong type, rank, trailing shape, dtype or device."""
    for name, x in (("queries", queries), ("gallery", gallery)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != ndim:
            raise ValueError(f"{name} must be {what}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if queries.shape[1:] != gallery.shape[1:]:
        dims = "D" if ndim == 2 else "T, D"
        raise ValueError(
            f"queries {tuple(queries.shape)} and gallery {tuple(gallery.shape)} "
            f"must agree in ({dims})"
        )
    if queries.device != gallery.device:
        raise ValueError(f"queries on {queries.device} but gallery on {gallery.device}")
