"""ACF-R+ re-ranking (spec §5; the authors' ``rerank.py``), vectorised on S's device.

S is (N images, M texts), higher = more similar. Lists are ordered by descending
score, ties by smaller index. Only the first k̂ of a list are reordered, by
(reverse position, original position); the caller keeps the rest behind them.

A reverse position is 1-based in the FULL ranking (``n=None``, as the authors) or
capped at n̂ + 1 (``n`` given). It is a count (see :mod:`acf_fast.ranking`), never a
full sort; the whole of S is streamed in blocks of lines, so a 5,000 x 25,000 S
needs well under a few hundred MB beyond itself.

- I2T, image i: C = top-k̂ texts of row i; r(t) = position of i in column t.
- T2I, text t: C = top-k̂ images of column t; r(c) = min over u in Nb(t) of u's
  position in row c. The minimum is the position of the best neighbour of t in row
  c (by (score desc, index asc)), so one count per (t, c) suffices.

Neighbour modes (:func:`text_neighbors`) - name the one used in every result:
``embedding`` (cosine of per-text vectors), ``profile`` (cosine between columns of
S: works for any model), ``siblings`` (the captions of t's ground-truth image: an
ORACLE that reads labels at test time, as the authors' ``t2i_rerank`` does).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .ranking import (
    DEFAULT_BUDGET_BYTES,
    check_cap,
    check_k,
    check_scores,
    lines_per_block,
    positions,
    topk_along,
    topk_lines,
)

NEIGHBOR_MODES = ("embedding", "profile", "siblings")
ORACLE_LABEL = "oracle (uses ground-truth captions)"


def _reorder(C: torch.Tensor, r: torch.Tensor, n: Optional[int]) -> torch.Tensor:
    if n is not None:
        r = r.clamp(max=n + 1)
    # C is already in original order, so a stable sort by r orders by (r, original position).
    return C.gather(1, torch.sort(r, dim=1, stable=True).indices)


def rerank_i2t(S, k: int = 15, n: Optional[int] = None) -> torch.Tensor:
    """Re-ranked heads of the image-to-text lists.

    Args:
        S: (N, M) float scores on any device (numpy accepted).
        k: k̂, how many of each list are reordered (authors: 15).
        n: n̂ cap of the reverse positions, or None for the full ranking.

    Returns:
        (N, k) long text ids on S's device: row i's top-k texts reordered by
        (position of i in the text's column, original position).
    """
    S = check_scores(S)
    N, M = S.shape
    k = check_k(k, M, "k", "list of texts per image")
    n = check_cap(n)
    C = topk_along(S, k, axis=1)
    rows = torch.arange(N, device=S.device).repeat_interleave(k)
    r = positions(S, C.reshape(-1), rows, axis=0).view(N, k)
    return _reorder(C, r, n)


def check_neighbors(neighbors, M: int, device) -> torch.Tensor:
    if isinstance(neighbors, np.ndarray):
        neighbors = torch.from_numpy(neighbors)
    if not isinstance(neighbors, torch.Tensor) or neighbors.dim() != 2 or neighbors.shape[0] != M:
        raise ValueError(f"neighbors must be a (M, k') = ({M}, k') integer tensor, got {getattr(neighbors, 'shape', type(neighbors).__name__)}")
    if neighbors.dtype.is_floating_point or neighbors.dtype == torch.bool or neighbors.shape[1] == 0:
        raise ValueError(f"neighbors must hold integer text ids with k' >= 1 columns, got dtype {neighbors.dtype}")
    if neighbors.numel() and (int(neighbors.min()) < 0 or int(neighbors.max()) >= M):
        raise ValueError(f"neighbors holds text ids outside [0, {M})")
    return neighbors.to(device=device, dtype=torch.long)


def rerank_t2i(S, neighbors, k: int = 20, n: Optional[int] = None) -> torch.Tensor:
    """Re-ranked heads of the text-to-image lists.

    Args:
        S: (N, M) float scores.
        neighbors: (M, k') long text ids, Nb(t) of spec §5 (t itself included by
            :func:`text_neighbors`; not required here).
        k: k̂ (authors: 20).
        n: n̂ cap, or None.

    Returns:
        (M, k) long image ids on S's device.
    """
    S = check_scores(S)
    N, M = S.shape
    k = check_k(k, N, "k", "list of images per text")
    n = check_cap(n)
    nb = check_neighbors(neighbors, M, S.device)
    C = topk_along(S, k, axis=0)  # (M, k) image ids
    # Best neighbour of t in row c by (score desc, index asc): its position is the min.
    best = torch.empty_like(C)
    step = max(1, DEFAULT_BUDGET_BYTES // (k * nb.shape[1] * 24))
    for a in range(0, M, step):
        c, u = C[a : a + step, :, None], nb[a : a + step, None, :]
        vals = S[c, u]  # (B, k, k')
        top = vals.max(dim=2, keepdim=True).values
        best[a : a + step] = torch.where(vals == top, u, M).min(dim=2).values
    r = positions(S, C.reshape(-1), best.reshape(-1), axis=1).view(M, k)
    return _reorder(C, r, n)


def _check_txt2img_for_siblings(txt2img, M: int) -> torch.Tensor:
    if txt2img is None:
        raise ValueError("text_neighbors('siblings') needs txt2img (caption -> image id, length M)")
    if isinstance(txt2img, np.ndarray):
        txt2img = torch.from_numpy(txt2img)
    if not isinstance(txt2img, torch.Tensor) or txt2img.dim() != 1 or txt2img.dtype.is_floating_point:
        raise ValueError("txt2img must be a 1-D integer array (caption -> image id)")
    if M is not None and txt2img.numel() != M:
        raise ValueError(f"txt2img has {txt2img.numel()} entries but there are {M} texts")
    if txt2img.numel() and int(txt2img.min()) < 0:
        raise ValueError("txt2img holds negative image ids")
    return txt2img.long()


def _nearest_by_cosine(X: torch.Tensor, k: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> torch.Tensor:
    """(M, k) ids: each row of X (M, E) itself first, then its k-1 nearest others by
    cosine (ties: smaller index). Cosine = dot / max(|x||y|, 1e-8), divided after the
    product so that identical vectors give bit-identical cosines."""
    from tqdm.auto import tqdm

    M = X.shape[0]
    X = X.float() if X.dtype in (torch.float16, torch.bfloat16) else X
    norms = X.norm(dim=1)
    out = torch.empty(M, k, dtype=torch.long, device=X.device)
    step = lines_per_block(M, 8 * 4, budget_bytes)
    # An M x M x E product: minutes for COCO 5K on a CPU, so show progress there.
    quiet = X.is_cuda or M * M * X.shape[1] < 10**11
    for a in tqdm(range(0, M, step), desc="text neighbours", unit="block", disable=quiet):
        b = min(M, a + step)
        cos = (X[a:b] @ X.T) / torch.clamp(norms[a:b, None] * norms[None, :], min=1e-8)
        rows = torch.arange(b - a, device=X.device)
        cos[rows, rows + a] = float("inf")  # t is its own first neighbour, whatever the ties
        out[a:b] = topk_lines(cos, k)[1]
    return out


def text_neighbors(mode: str, k: int = 5, *, S=None, text_vectors=None, txt2img=None) -> torch.Tensor:
    """Nb(t) for every text t, t itself first: (M, k) long text ids.

    Args:
        mode: "embedding" (cosine of ``text_vectors`` (M, E)), "profile" (cosine
            between columns of ``S`` (N, M)), or "siblings" (the captions of t's
            ground-truth image, from ``txt2img`` (M,): an oracle).
        k: k' (default 5).

    For "siblings", Nb(t) = t, then its image's other captions by index; an image
    with fewer than k captions repeats t to fill the row (harmless for the min of
    spec §5), one with more keeps the k - 1 lowest-indexed others. Result lives on
    the device of the input it was computed from.
    """
    if mode not in NEIGHBOR_MODES:
        raise ValueError(f"mode must be one of {NEIGHBOR_MODES}, got {mode!r}")
    if mode == "embedding":
        if text_vectors is None:
            raise ValueError("text_neighbors('embedding') needs text_vectors (M, E)")
        if isinstance(text_vectors, np.ndarray):
            text_vectors = torch.from_numpy(text_vectors)
        X = check_scores(text_vectors, "text_vectors")
        return _nearest_by_cosine(X, check_k(k, X.shape[0], "k", "number of texts"))
    if mode == "profile":
        if S is None:
            raise ValueError("text_neighbors('profile') needs S (N, M)")
        S = check_scores(S)
        # Columns of S as vectors; float32 at least, so the matmul is well defined on CPU.
        X = S.T if S.dtype == torch.float64 else S.T.float()
        return _nearest_by_cosine(X, check_k(k, S.shape[1], "k", "number of texts"))
    M = None if S is None else check_scores(S).shape[1]
    g = _check_txt2img_for_siblings(txt2img, M)
    M = g.numel()
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    order = torch.sort(g, stable=True).indices  # captions grouped by image, index order inside
    per_image = torch.bincount(g)
    starts = torch.cumsum(per_image, 0) - per_image
    width = int(per_image.max())
    members = torch.full((per_image.numel(), width), -1, dtype=torch.long, device=g.device)
    members[g[order], torch.arange(M, device=g.device) - starts[g[order]]] = order
    t = torch.arange(M, device=g.device)
    cand = members[g]  # (M, width)
    others = (cand >= 0) & (cand != t[:, None])
    cand = cand.gather(1, torch.sort((~others).to(torch.uint8), dim=1, stable=True).indices)
    n_others = others.sum(1, keepdim=True)
    out = t[:, None].repeat(1, k)
    take = min(k - 1, width)
    if take > 0:
        fill = cand[:, :take]
        ok = torch.arange(take, device=g.device)[None, :] < n_others
        out[:, 1 : 1 + take] = torch.where(ok, fill, t[:, None])
    return out
