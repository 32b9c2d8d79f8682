"""Plain per-query references for re-ranking, metrics and text neighbours (spec §4, §5).

One reference per job, shared by the tests and the benchmarks (the benchmarks time
them as the baseline, the way SCAN's ``i2t``/``t2i`` and the authors' ``rerank.py``
run: one query at a time in numpy). Nothing is shared with :mod:`acf_fast.ranking`:
a list is ordered by ``np.argsort(-scores, kind="stable")`` (score desc, index asc)
and a position is the count of spec §5, read one query at a time.

All functions take numpy arrays or CPU tensors. ``queries`` (optional) restricts a
loop to some images / texts, so a benchmark can time a slice and scale per query.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np


def _np(x):
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.float() if x.dtype.is_floating_point and x.dtype != x.double().dtype else x).numpy()
    return np.asarray(x)


def ordered(scores: np.ndarray) -> np.ndarray:
    """Indices of a 1-D score list by (score desc, index asc)."""
    return np.argsort(-scores, kind="stable")


def position(scores: np.ndarray, j: int) -> int:
    """0-based position of item j in its list: items scoring higher, plus equal ones with a smaller index."""
    v = scores[j]
    return int(np.count_nonzero(scores > v) + np.count_nonzero(scores[:j] == v))


def _reordered(cand: np.ndarray, r, n: Optional[int]) -> np.ndarray:
    r = np.asarray(r) if n is None else np.minimum(r, n + 1)
    return cand[np.lexsort((np.arange(len(cand)), r))]


def rerank_i2t_loop(S, k: int = 15, n: Optional[int] = None, queries: Optional[Iterable[int]] = None) -> np.ndarray:
    """Spec §5 I2T, one image at a time: (len(queries), k) int64 re-ordered top-k text ids.

    Image i's top-k texts C, each with r(t) = 1 + position of i in column t (capped at
    n + 1 when n is given), reordered by (r, original position).
    """
    S = _np(S)
    out = []
    for i in range(S.shape[0]) if queries is None else queries:
        cand = ordered(S[i])[:k]
        out.append(_reordered(cand, [position(S[:, t], i) + 1 for t in cand], n))
    return np.asarray(out, dtype=np.int64).reshape(-1, k)


def rerank_t2i_loop(S, neighbors, k: int = 20, n: Optional[int] = None,
                    queries: Optional[Iterable[int]] = None) -> np.ndarray:
    """Spec §5 T2I, one text at a time: (len(queries), k) int64 re-ordered top-k image ids.

    Text t's top-k images C, each with r(c) = 1 + min over u in ``neighbors[t]`` of
    u's position in row c (capped at n + 1), reordered by (r, original position).
    """
    S, neighbors = _np(S), _np(neighbors)
    out = []
    for t in range(S.shape[1]) if queries is None else queries:
        cand = ordered(S[:, t])[:k]
        out.append(_reordered(cand, [min(position(S[c], u) for u in neighbors[t]) + 1 for c in cand], n))
    return np.asarray(out, dtype=np.int64).reshape(-1, k)


def _new_list(scores: np.ndarray, head) -> np.ndarray:
    """A query's list after re-ranking: the head, then every other item in its original order."""
    lst = ordered(scores)
    if head is None:
        return lst
    head = np.asarray(head)
    return np.concatenate([head, lst[~np.isin(lst, head)]])


def i2t_ranks(S, txt2img, heads=None, queries: Optional[Iterable[int]] = None) -> np.ndarray:
    """0-based I2T rank of each queried image: the first of its captions in its list
    (re-ranked by ``heads`` (N, k) when given). (len(queries),) int64."""
    S, txt2img, heads = _np(S), _np(txt2img), _np(heads)
    out = []
    for i in range(S.shape[0]) if queries is None else queries:
        lst = _new_list(S[i], None if heads is None else heads[i])
        out.append(int(np.flatnonzero(txt2img[lst] == i)[0]))
    return np.asarray(out, dtype=np.int64)


def t2i_ranks(S, txt2img, heads=None, queries: Optional[Iterable[int]] = None) -> np.ndarray:
    """0-based T2I rank of each queried caption: where its image is in its list
    (re-ranked by ``heads`` (M, k) when given). (len(queries),) int64."""
    S, txt2img, heads = _np(S), _np(txt2img), _np(heads)
    out = []
    for t in range(S.shape[1]) if queries is None else queries:
        lst = _new_list(S[:, t], None if heads is None else heads[t])
        out.append(int(np.flatnonzero(lst == txt2img[t])[0]))
    return np.asarray(out, dtype=np.int64)


def summary(ranks) -> dict:
    """R@1, R@5, R@10 (percent), medr = floor(median) + 1, meanr = mean + 1 of 0-based ranks."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {f"r{K}": 100.0 * float(np.count_nonzero(r < K)) / r.size for K in (1, 5, 10)}
    out["medr"] = float(math.floor(np.median(r)) + 1)
    out["meanr"] = float(r.sum() / r.size + 1)
    return out


def recall_loop(S, txt2img, i2t_heads=None, t2i_heads=None) -> dict:
    """Spec §4 metrics both ways and rsum by the per-query loops; the layout of
    ``acf_fast.evaluate.recall_metrics``."""
    out = {"i2t": summary(i2t_ranks(S, txt2img, i2t_heads)), "t2i": summary(t2i_ranks(S, txt2img, t2i_heads))}
    out["rsum"] = sum(out[d][f"r{K}"] for d in ("i2t", "t2i") for K in (1, 5, 10))
    return out


def cosine_neighbors_loop(X, k: int) -> np.ndarray:
    """Nb(t) of spec §5 by cosine, one text at a time: t itself, then its k-1 nearest
    others by R(x, y) = x·y / max(|x||y|, 1e-8) in float64 of the float32 vectors,
    ties by smaller index. (M, k) int64."""
    X = _np(X).astype(np.float32).astype(np.float64)
    norms = np.sqrt((X * X).sum(1))
    out = []
    for t in range(X.shape[0]):
        # elementwise product and a row sum: equal rows give equal cosines (a BLAS
        # product may round two equal rows differently)
        cos = (X * X[t]).sum(1) / np.maximum(norms * norms[t], 1e-8)
        others = [u for u in ordered(cos) if u != t]
        out.append([t] + others[: k - 1])
    return np.asarray(out, dtype=np.int64)


def siblings_loop(txt2img, k: int) -> np.ndarray:
    """Nb(t) = t, then the other captions of its image by index (oracle mode), t
    repeated to fill the row. (M, k) int64."""
    txt2img = _np(txt2img)
    out = []
    for t, g in enumerate(txt2img):
        sib = [u for u in np.flatnonzero(txt2img == g) if u != t][: k - 1]
        out.append([t] + sib + [t] * (k - 1 - len(sib)))
    return np.asarray(out, dtype=np.int64)
