"""ACF-R+ re-ranking (spec §5; the authors' ``rerank.py``), vectorised on S's device.

S is (N images, M texts), higher = more similar. Lists are ordered by descending
score, ties by smaller index. Only the first k̂ of a list are reordered, by
(reverse position, original position); the caller keeps the rest behind them.

A reverse position is 1-based in the FULL ranking (``n=None``, as the authors) or
capped at n̂ + 1 (``n`` given). It is a count (see :mod:`acf_fast.ranking`), never a
full sort.

- I2T, image i: C = top-k̂ texts of row i; r(t) = position of i in column t.
- T2I, text t: C = top-k̂ images of column t; r(c) = min over u in Nb(t) of u's
  position in row c. The minimum is the position of the best neighbour of t in row
  c (by (score desc, index asc)), so one count per (t, c) suffices.

Two backends give the same ids (:mod:`acf_fast.ranking`): ``triton`` on CUDA (one
top-k per direction over the whole S and one counting kernel, with no host read
after the input checks, so :class:`CapturedRerank` can replay it as a CUDA graph)
and ``torch`` (S streamed in blocks of lines; the CPU path).

Neighbour modes (:func:`text_neighbors`) - name the one used in every result:
``embedding`` (cosine of per-text vectors), ``profile`` (cosine between columns of
S: works for any model), ``siblings`` (the captions of t's ground-truth image: an
ORACLE that reads labels at test time, as the authors' ``t2i_rerank`` does).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .ranking import (
    DEFAULT_BUDGET_BYTES,
    MAX_VECTOR,
    check_cap,
    check_k,
    check_scores,
    fold_sum,
    lines_per_block,
    positions,
    positions_exact,
    rank_order,
    resolve_backend,
    topk_along,
    topk_exact,
)

NEIGHBOR_MODES = ("embedding", "profile", "siblings")
ORACLE_LABEL = "oracle (uses ground-truth captions)"


def _reorder(C: torch.Tensor, r: torch.Tensor, n: Optional[int]) -> torch.Tensor:
    if n is not None:
        r = r.clamp(max=n + 1)
    # C is already in original order, so a stable sort by r orders by (r, original position).
    return C.gather(1, torch.sort(r, dim=1, stable=True).indices)


def _heads_i2t(S: torch.Tensor, k: int, n: Optional[int], backend: str, St: Optional[torch.Tensor] = None):
    """I2T heads of a checked S; ``St`` = S.T.contiguous() when the caller has it (triton)."""
    N = S.shape[0]
    rows = torch.arange(N, device=S.device).repeat_interleave(k)
    if backend == "triton":
        C = topk_exact(S, k)
        r = positions_exact(S.T.contiguous() if St is None else St, C.reshape(-1), rows)
    else:
        C = topk_along(S, k, axis=1)
        r = positions(S, C.reshape(-1), rows, axis=0)
    return _reorder(C, r.view(N, k), n)


def _best_neighbors(S: torch.Tensor, C: torch.Tensor, nb: torch.Tensor, step: int) -> torch.Tensor:
    """(M, k) the best u of Nb(t) in row C[t, j] by (score desc, index asc); no host reads."""
    M = S.shape[1]
    best = torch.empty_like(C)
    for a in range(0, M, step):
        c, u = C[a : a + step, :, None], nb[a : a + step, None, :]
        vals = S[c, u]  # (B, k, k')
        top = vals.max(dim=2, keepdim=True).values
        best[a : a + step] = torch.where(vals == top, u, M).min(dim=2).values
    return best


def _heads_t2i(S: torch.Tensor, nb: torch.Tensor, k: int, n: Optional[int], backend: str,
               St: Optional[torch.Tensor] = None):
    """T2I heads of a checked S and checked neighbours (M, k')."""
    M = S.shape[1]
    if backend == "triton":
        C = topk_exact(S.T.contiguous() if St is None else St, k)  # (M, k) image ids
        best = _best_neighbors(S, C, nb, M)
        r = positions_exact(S, C.reshape(-1), best.reshape(-1))
    else:
        C = topk_along(S, k, axis=0)
        best = _best_neighbors(S, C, nb, max(1, DEFAULT_BUDGET_BYTES // (k * nb.shape[1] * 24)))
        r = positions(S, C.reshape(-1), best.reshape(-1), axis=1)
    return _reorder(C, r.view(M, k), n)


def rerank_i2t(S, k: int = 15, n: Optional[int] = None, *, backend: str = "auto") -> torch.Tensor:
    """Re-ranked heads of the image-to-text lists.

    Args:
        S: (N, M) float scores on any device (numpy accepted).
        k: k̂, how many of each list are reordered (authors: 15).
        n: n̂ cap of the reverse positions, or None for the full ranking.
        backend: "auto" (triton for float32/16/bf16 S on CUDA when a copy of S fits,
            else torch), "torch" or "triton"; the ids are the same.

    Returns:
        (N, k) long text ids on S's device: row i's top-k texts reordered by
        (position of i in the text's column, original position).
    """
    S = check_scores(S)
    k = check_k(k, S.shape[1], "k", "list of texts per image")
    n = check_cap(n)
    return _heads_i2t(S, k, n, resolve_backend(backend, S))


def check_neighbors(neighbors, M: int, device) -> torch.Tensor:
    if isinstance(neighbors, np.ndarray):
        neighbors = torch.from_numpy(neighbors)
    if not isinstance(neighbors, torch.Tensor) or neighbors.dim() != 2 or neighbors.shape[0] != M:
        raise ValueError(f"neighbors must be a (M, k') = ({M}, k') integer tensor, got {getattr(neighbors, 'shape', type(neighbors).__name__)}")
    if neighbors.dtype.is_floating_point or neighbors.dtype == torch.bool or neighbors.shape[1] == 0:
        raise ValueError(f"neighbors must hold integer text ids with k' >= 1 columns, got dtype {neighbors.dtype}")
    lo, hi = torch.aminmax(neighbors)
    if int(lo) < 0 or int(hi) >= M:
        raise ValueError(f"neighbors holds text ids outside [0, {M})")
    return neighbors.to(device=device, dtype=torch.long)


def rerank_t2i(S, neighbors, k: int = 20, n: Optional[int] = None, *, backend: str = "auto") -> torch.Tensor:
    """Re-ranked heads of the text-to-image lists.

    Args:
        S: (N, M) float scores.
        neighbors: (M, k') long text ids, Nb(t) of spec §5 (t itself included by
            :func:`text_neighbors`; not required here).
        k: k̂ (authors: 20).
        n: n̂ cap, or None.
        backend: as :func:`rerank_i2t`.

    Returns:
        (M, k) long image ids on S's device.
    """
    S = check_scores(S)
    k = check_k(k, S.shape[0], "k", "list of images per text")
    n = check_cap(n)
    nb = check_neighbors(neighbors, S.shape[1], S.device)
    return _heads_t2i(S, nb, k, n, resolve_backend(backend, S))


def rerank(S, neighbors, k_i2t: int = 15, k_t2i: int = 20, n: Optional[int] = None, *,
           backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Both directions at once: (:func:`rerank_i2t` heads (N, k_i2t), :func:`rerank_t2i`
    heads (M, k_t2i)), S checked once and, on the triton path, transposed once."""
    S = check_scores(S)
    N, M = S.shape
    k_i2t = check_k(k_i2t, M, "k_i2t", "list of texts per image")
    k_t2i = check_k(k_t2i, N, "k_t2i", "list of images per text")
    n = check_cap(n)
    nb = check_neighbors(neighbors, M, S.device)
    return _rerank_both(S, nb, k_i2t, k_t2i, n, resolve_backend(backend, S))


def _rerank_both(S, nb, k_i2t, k_t2i, n, backend):
    St = S.T.contiguous() if backend == "triton" else None
    return _heads_i2t(S, k_i2t, n, backend, St), _heads_t2i(S, nb, k_t2i, n, backend, St)


class CapturedRerank:
    """:func:`rerank` of one CUDA score buffer, captured once in a CUDA graph and replayed.

    Build it on the buffer you will refill (``S`` (N, M) float32/16/bf16 CUDA, and the
    neighbours (M, k')); each call checks the buffer's current contents (one host read:
    NaN/Inf are refused before any work) and replays the graph. The returned heads are
    the graph's own output tensors, overwritten by the next call: clone them to keep
    them. Same ids as :func:`rerank`.
    """

    def __init__(self, S: torch.Tensor, neighbors, k_i2t: int = 15, k_t2i: int = 20, n: Optional[int] = None):
        if not isinstance(S, torch.Tensor) or not S.is_cuda:
            raise ValueError("CapturedRerank needs S as a CUDA tensor (the buffer the graph reads)")
        self.S = check_scores(S)
        N, M = S.shape
        # held by the object: the graph reads these buffers at every replay
        self.args = (check_neighbors(neighbors, M, S.device), check_k(k_i2t, M, "k_i2t", "list of texts per image"),
                     check_k(k_t2i, N, "k_t2i", "list of images per text"), check_cap(n), resolve_backend("triton", S))
        stream = torch.cuda.Stream(S.device)
        stream.wait_stream(torch.cuda.current_stream(S.device))
        with torch.cuda.stream(stream):  # warm-up: compiles the kernels, fills the allocator's pool
            _rerank_both(self.S, *self.args)
        torch.cuda.current_stream(S.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.heads = _rerank_both(self.S, *self.args)

    def __call__(self) -> Tuple[torch.Tensor, torch.Tensor]:
        check_scores(self.S)
        self.graph.replay()
        return self.heads


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


# --------------------------------------------------------------------------- text neighbours

# Approximate candidates per text beyond the k' - 1 asked for; a text whose k'-th exact
# cosine does not clear the best excluded candidate by the error bound gets 4x as many.
NEIGHBOR_MARGIN = 8


def approx_error_bound(dtype: torch.dtype, E: int) -> float:
    """Bound on |approximate - exact| cosine of two unit vectors of length E stored in
    ``dtype`` (float16 or float32) and multiplied with float32 accumulation: input
    rounding (2u), output rounding (u), the sum (E u32), fp16 subnormals; times 2
    for the float32 normalisation and the float64 side. u is bf16's 2^-8 when float32
    matmuls may run in reduced precision (``torch.set_float32_matmul_precision``)."""
    u32 = 2.0**-24
    if dtype == torch.float16:
        u, sub = 2.0**-11, 2 * 2.0**-25 * E**0.5
    else:
        u, sub = (u32 if torch.get_float32_matmul_precision() == "highest" else 2.0**-8), 0.0
    return 2 * (3.03 * u + 1.01 * E * u32 + sub)


def _approx_candidates(U: torch.Tensor, rows: torch.Tensor, kc: int, budget_bytes: int):
    """For each row t in ``rows``: the kc others u with the largest approximate cosine
    U[t]·U[u] (not t), and the (kc+1)-th value (-inf when kc = M - 1)."""
    M = U.shape[0]
    cand = torch.empty(rows.numel(), kc, dtype=torch.long, device=U.device)
    nxt = torch.full((rows.numel(),), float("-inf"), dtype=torch.float64, device=U.device)
    step = lines_per_block(M, 2 * U.element_size(), budget_bytes)
    for a in range(0, rows.numel(), step):
        r = rows[a : a + step]
        P = U[r] @ U.T
        P[torch.arange(r.numel(), device=U.device), r] = float("-inf")  # t is not its own candidate
        vals, idx = torch.topk(P, min(kc + 1, M - 1), dim=1)
        cand[a : a + step] = idx[:, :kc]
        if kc < M - 1:
            nxt[a : a + step] = vals[:, kc].double()
    return cand, nxt


def _exact_cosines(X: torch.Tensor, norms: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor, backend: str,
                   budget_bytes: int) -> torch.Tensor:
    """float64 cosines of X[rows[r]] and X[cand[r, c]] by :func:`fold_sum`: the same bits on
    every device and backend. X (M, E) float32, norms (M,) float64."""
    if backend == "triton":
        from .kernels import ranking as kernels

        dots = kernels.fold_dots(X, rows, cand)
    else:
        dots = torch.empty(cand.shape, dtype=torch.float64, device=X.device)
        step = max(1, budget_bytes // (cand.shape[1] * X.shape[1] * 8 * 2))
        for a in range(0, rows.numel(), step):
            r, c = rows[a : a + step], cand[a : a + step]
            dots[a : a + step] = fold_sum(X[r, None, :].double() * X[c].double())
    return dots / torch.clamp(norms[rows, None] * norms[cand], min=1e-8)


def _nearest_by_cosine(X: torch.Tensor, k: int, backend: str) -> torch.Tensor:
    """(M, k) ids: each row of X (M, E) itself first, then its k-1 nearest others by
    cosine R = x·y / max(|x||y|, 1e-8), ties by smaller index.

    The cosine that decides is computed from the rows rounded to float32, in float64
    with a fixed summation order (:func:`fold_sum`), so every device and backend
    picks the same neighbours. It is computed only for candidates: the k-1 + margin
    largest approximate cosines of unit rows (float16 matmul on the triton path,
    float32 otherwise; float16 rather than bfloat16 because unit vectors need no
    bfloat16 range and float16's 11 significant bits make the bound 8x tighter at the
    same tensor-core speed, so fewer texts retry). A text is settled when its (k-1)-th exact cosine exceeds every
    excluded candidate's approximate cosine by more than the error bound
    (:func:`approx_error_bound`; 0 is the floor where the 1e-8 clamp can shrink a
    cosine); the others retry with 4x the candidates, up to all of them.
    """
    M, E = X.shape
    X = X.float().contiguous()
    dev = X.device
    norms = fold_sum(X.double() ** 2).sqrt()
    out = torch.arange(M, device=dev)[:, None].repeat(1, k)
    if k == 1:
        return out
    approx = torch.float16 if backend == "triton" else torch.float32
    U = (X.double() / torch.where(norms > 0, norms, 1.0)[:, None]).to(approx)
    eps = approx_error_bound(approx, E)
    shrunk = norms * norms.min() < 1e-8  # rows with a partner whose cosine the clamp may shrink
    budget = (2 << 30) if X.is_cuda else DEFAULT_BUDGET_BYTES
    kc = min(M - 1, k - 1 + NEIGHBOR_MARGIN)
    todo = torch.arange(M, device=dev)
    reduced = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False  # the bound assumes fp32 sums
    try:
        while todo.numel():
            cand, nxt = _approx_candidates(U, todo, kc, budget)
            cos = _exact_cosines(X, norms, todo, cand, backend, budget)
            o = rank_order(cos, cand)[:, : k - 1]
            last = cos.gather(1, o[:, -1:]).squeeze(1)
            bound = nxt + eps
            bound = torch.where(shrunk[todo], bound.clamp(min=0.0), bound)
            ok = (last > bound) | (kc == M - 1)
            out[todo[ok], 1:] = cand.gather(1, o)[ok]
            todo = todo[~ok]
            kc = min(M - 1, 4 * kc)
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced
    return out


def text_neighbors(mode: str, k: int = 5, *, S=None, text_vectors=None, txt2img=None,
                   backend: str = "auto") -> torch.Tensor:
    """Nb(t) for every text t, t itself first: (M, k) long text ids.

    Args:
        mode: "embedding" (cosine of ``text_vectors`` (M, E)), "profile" (cosine
            between columns of ``S`` (N, M)), or "siblings" (the captions of t's
            ground-truth image, from ``txt2img`` (M,): an oracle).
        k: k' (default 5).
        backend: "auto" | "torch" | "triton" for the cosine modes (triton: float16
            candidates on CUDA and a float64 kernel for the exact check); the ids
            are the same.

    Cosine neighbours follow :func:`_nearest_by_cosine` (float32 vectors, float64
    cosines in a fixed order, ties by smaller index). For "siblings", Nb(t) = t, then
    its image's other captions by index; an image with fewer than k captions repeats
    t to fill the row (harmless for the min of spec §5), one with more keeps the
    k - 1 lowest-indexed others. Result lives on the device of the input it was
    computed from.
    """
    if mode not in NEIGHBOR_MODES:
        raise ValueError(f"mode must be one of {NEIGHBOR_MODES}, got {mode!r}")
    if mode == "embedding":
        if text_vectors is None:
            raise ValueError("text_neighbors('embedding') needs text_vectors (M, E)")
        text_vectors = check_scores(text_vectors, "text_vectors")
    elif mode == "profile" and S is None:
        raise ValueError("text_neighbors('profile') needs S (N, M)")
    S = None if S is None else check_scores(S)
    if mode == "siblings":
        txt2img = _check_txt2img_for_siblings(txt2img, None if S is None else S.shape[1])
    return neighbors_of_checked(mode, k, S, text_vectors, txt2img, backend)


def neighbors_of_checked(mode: str, k, S: Optional[torch.Tensor], text_vectors: Optional[torch.Tensor],
                         txt2img: Optional[torch.Tensor], backend: str = "auto") -> torch.Tensor:
    """:func:`text_neighbors` of inputs already checked (S and text_vectors by
    ``check_scores``, txt2img a long tensor): the evaluator's entry, so a re-ranked
    evaluation reads S's values for validation once."""
    if mode == "siblings":
        return _siblings(txt2img, k)
    X = text_vectors if mode == "embedding" else S.T
    k = check_k(k, X.shape[0], "k", "number of texts")
    return _nearest_by_cosine(X, k, _neighbor_backend(backend, X))


def _neighbor_backend(backend: str, X: torch.Tensor) -> str:
    """The cosine modes read float32 copies of the vectors (any float dtype) and need no
    transposed copy; the fold kernel takes vectors of up to ``MAX_VECTOR`` values."""
    why_not = None if X.shape[1] <= MAX_VECTOR else f"vectors longer than {MAX_VECTOR} values"
    return resolve_backend(backend, X, copy_bytes=0, why_not=why_not)


def _siblings(g: torch.Tensor, k) -> torch.Tensor:
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
