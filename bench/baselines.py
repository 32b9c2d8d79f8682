"""Plain numpy per-query loops: the baselines the re-ranker and metrics are timed against.

They follow spec §4 and §5 literally, one query at a time, the way SCAN's
``i2t``/``t2i`` and the authors' ``rerank.py`` do (vectorised only inside a query),
so a speed-up over them is a speed-up over the code people run today.
Ranks use the spec's deterministic ties: items scoring strictly higher plus items
scoring equal with a smaller index.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np


def _order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties by smaller index."""
    return np.argsort(-scores, kind="stable")


def i2t_ranks(S: np.ndarray, txt2img: np.ndarray, queries: Optional[Iterable[int]] = None) -> np.ndarray:
    """Rank (0-based) of each queried image's best caption in its row: (len(queries),) int64."""
    S = np.asarray(S)
    txt2img = np.asarray(txt2img)
    N, M = S.shape
    queries = list(range(N) if queries is None else queries)
    out = np.empty(len(queries), dtype=np.int64)
    pos = np.empty(M, dtype=np.int64)
    for n, i in enumerate(queries):
        pos[_order(S[i])] = np.arange(M)
        out[n] = pos[txt2img == i].min()
    return out


def t2i_ranks(S: np.ndarray, txt2img: np.ndarray, queries: Optional[Iterable[int]] = None) -> np.ndarray:
    """Rank (0-based) of each queried caption's image in its column: (len(queries),) int64."""
    S = np.asarray(S)
    txt2img = np.asarray(txt2img)
    queries = list(range(S.shape[1]) if queries is None else queries)
    return np.asarray([int(np.flatnonzero(_order(S[:, t]) == txt2img[t])[0]) for t in queries], dtype=np.int64)


def recall_loop(S: np.ndarray, txt2img: np.ndarray) -> dict:
    """Spec §4 R@1/5/10, medr, meanr both ways and rsum, by a per-query argsort loop.

    S (N, M) float, txt2img (M,) int. Returns the same dict layout as
    ``acf_fast.evaluate.recall_metrics``.
    """
    def summary(r):
        return {"r1": 100.0 * np.mean(r < 1), "r5": 100.0 * np.mean(r < 5), "r10": 100.0 * np.mean(r < 10),
                "medr": float(np.floor(np.median(r)) + 1), "meanr": float(r.mean() + 1)}

    a, b = summary(i2t_ranks(S, txt2img)), summary(t2i_ranks(S, txt2img))
    return {"i2t": a, "t2i": b, "rsum": a["r1"] + a["r5"] + a["r10"] + b["r1"] + b["r5"] + b["r10"]}


def rerank_i2t_loop(S: np.ndarray, k: int = 15, queries: Optional[Sequence[int]] = None) -> np.ndarray:
    """Spec §5 I2T re-ranking, one image at a time.

    Returns (len(queries), k) int64: the re-ordered top-k text indices of each
    queried image (the rest of each list keeps its order and is not materialised).
    """
    S = np.asarray(S)
    N, M = S.shape
    queries = range(N) if queries is None else queries
    out = []
    for i in queries:
        cand = _order(S[i])[:k]
        col = S[:, cand]  # (N, k)
        own = S[i, cand]
        r = (col > own).sum(0) + (col[:i] == own).sum(0)  # position of image i in each column
        out.append(cand[np.lexsort((np.arange(len(cand)), r))])
    return np.asarray(out, dtype=np.int64)


def rerank_t2i_loop(S: np.ndarray, neighbors: np.ndarray, k: int = 20, queries: Optional[Sequence[int]] = None) -> np.ndarray:
    """Spec §5 T2I re-ranking, one text at a time.

    ``neighbors`` (M, k') int: Nb(t), t included. Returns (len(queries), k) int64.
    """
    S = np.asarray(S)
    neighbors = np.asarray(neighbors)
    N, M = S.shape
    queries = range(M) if queries is None else queries
    out = []
    for t in queries:
        cand = _order(S[:, t])[:k]
        rows = S[cand]  # (k, M)
        nb = neighbors[t]
        own = rows[:, nb]  # (k, k')
        higher = (rows[:, None, :] > own[:, :, None]).sum(-1)
        before = np.arange(M)[None, None, :] < nb[None, :, None]
        ties = ((rows[:, None, :] == own[:, :, None]) & before).sum(-1)
        r = (higher + ties).min(1)
        out.append(cand[np.lexsort((np.arange(len(cand)), r))])
    return np.asarray(out, dtype=np.int64)
