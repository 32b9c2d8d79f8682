"""Streaming evaluation: spec §4 metrics and §5 ACF-R+ re-ranking without ever holding S.

S (N images, M texts) is never materialised: it is read as tiles from a BLOCK SCORER

    score(image_rows: LongTensor (n,), text_cols: LongTensor (m,)) -> (n, m) float tensor

(ids on the CPU; the result on any device, all tiles on one device and of one dtype).
The same code serves ACF (:class:`ACFBlockScorer`, the chunks of
:func:`acf_fast.scoring.score_split`) and any user's model. Memory is O((N + M) · k)
plus one tile and its temporaries.

Every quantity is a COUNT (:mod:`acf_fast.ranking`: position = items scoring higher
+ items scoring equal with a smaller index), so passes over the tiles suffice:

1. ground truth: the tiles holding a pair (txt2img[t], t) are scored and the pairs
   read off (for caption t -> t // 5 and contiguous tiles, a band of about
   N / tile_rows tiles; for a scattered txt2img up to a full pass). From them: each
   caption's own score and each image's best caption (score desc, index asc; the
   I2T rank is the position of that caption, as :func:`acf_fast.evaluate._ranks_i2t`).
2. every tile: per query, the candidates that beat its target (the rank), and with
   ``rerank`` the per-row (k_i2t) and per-column (k_t2i) top-k lists, merged tile by
   tile by (value desc, index asc) like :func:`acf_fast.ranking.topk_lines`.
3. (rerank) every tile: I2T reverse positions (image i in the column of each of its
   top-k texts) as counts, and the scores S[c, u] for each T2I candidate c and
   neighbour u in Nb(t) (the best neighbour by (score desc, index asc) gives the min
   of spec §5, as :func:`acf_fast.rerank._best_neighbors`).
4. (rerank) every tile: T2I reverse positions (the best neighbour in row c) as counts.

So metrics cost the ground-truth band plus one full pass of scoring; metrics and
re-ranking, the band plus three. The result equals
:func:`acf_fast.evaluate.evaluate_protocol` on the S assembled from the same tiles,
exactly (ranks, ties, heads). The scorer must be deterministic: each pass re-reads
the entries it already saw (ground truth, top-k values, neighbour scores) and a
scorer that returns different values for the same tile is refused.

Neighbour modes for T2I: ``embedding`` (text vectors (M, E), as in memory) and
``siblings`` (txt2img: the oracle). ``profile`` takes cosines between COLUMNS of S,
which a stream never holds: refused.

    result = stream_evaluate(dot_scorer(A, B), N, M, rerank=True, text_vectors=B)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .evaluate import (_apply_heads, _check_rerank_inputs, _rsum, protocol_folds, protocol_result, protocol_spec,
                       summarize_ranks)
from .file_digest import tensors_sha256
# SURVIVOR_MAX_FRACTION: the fraction of a tile past which _count_lines' survivors give way to a search per item
from .ranking import (_INT64_MAX, SURVIVOR_MAX_FRACTION, _count_by_threshold, check_cap, check_k, rank_order,
                      topk_lines, value_keys)
from .rerank import _reorder, neighbors_of_checked
from .stream_state import EVERY_S, STAGES, StreamState
from .validate import check_txt2img

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_TILE_ROWS = 1024
DEFAULT_TILE_COLS = 8192
# Largest (elements) temporary of the float64 query-by-query counts inside one tile (passes 3 and 4).
QUERY_BLOCK_ELEMENTS = 4 << 20

PROFILE_REFUSAL = ("neighbors='profile' needs the columns of S (cosines between them), which a streaming "
                   "evaluation never holds; use neighbors='embedding' with text_vectors (M, E) or "
                   "'siblings' (oracle), or evaluate without --stream")


class _Axis:
    """One axis of the tile grid: tiles (ids as given to the scorer, the permutation that
    sorts them, the sorted ids), and per id its tile and its place in the sorted tile."""

    def __init__(self, tiles: Optional[Sequence], length: int, size: int, name: str):
        if tiles is None:
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
                raise ValueError(f"{name} size must be a positive int, got {size!r}")
            tiles = [torch.arange(a, min(length, a + size)) for a in range(0, length, int(size))]
        self.calls, self.perms, self.ids = [], [], []
        self.tile_of = torch.full((length,), -1, dtype=torch.long)
        self.local = torch.empty(length, dtype=torch.long)
        for k, ids in enumerate(tiles):
            ids = torch.as_tensor(ids)
            if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"{name} tile {k} must be a non-empty 1-D integer tensor of ids")
            ids = ids.long().cpu()
            if int(ids.min()) < 0 or int(ids.max()) >= length:
                raise ValueError(f"{name} tile {k} holds ids outside [0, {length})")
            if bool((self.tile_of[ids] >= 0).any()) or torch.unique(ids).numel() != ids.numel():
                raise ValueError(f"{name} tiles must cover every id in [0, {length}) exactly once; tile {k} repeats one")
            srt = torch.sort(ids)
            perm = None if bool((srt.indices == torch.arange(ids.numel())).all()) else srt.indices
            self.calls.append(ids)
            self.perms.append(perm)
            self.ids.append(srt.values)
            self.tile_of[srt.values] = k
            self.local[srt.values] = torch.arange(ids.numel())
        if bool((self.tile_of < 0).any()):
            raise ValueError(f"{name} tiles must cover every id in [0, {length}) exactly once; "
                             f"id {int((self.tile_of < 0).nonzero()[0])} is in none")

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device) -> "_Axis":
        self.ids = [x.to(device) for x in self.ids]
        self.tile_of, self.local = self.tile_of.to(device), self.local.to(device)
        self.perms = [None if p is None else p.to(device) for p in self.perms]
        return self


class _Tiles:
    """Scores tiles through the user's scorer, checked, rows and columns sorted by id."""

    def __init__(self, score: Scorer, rows: _Axis, cols: _Axis):
        if not callable(score):
            raise ValueError(f"score must be a callable score(image_rows, text_cols) -> (n, m), got {type(score).__name__}")
        self.score, self.rows, self.cols = score, rows, cols
        self.dtype = self.device = None
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, ri: int, ci: int) -> torch.Tensor:
        r, c = self.rows.calls[ri], self.cols.calls[ci]
        t0 = time.perf_counter()
        X = self.score(r, c)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        where = f"score(image_rows of tile {ri}, text_cols of tile {ci})"
        if isinstance(X, np.ndarray):
            X = torch.from_numpy(X)
        if not isinstance(X, torch.Tensor) or tuple(X.shape) != (r.numel(), c.numel()):
            raise ValueError(f"{where} must return a ({r.numel()}, {c.numel()}) tensor, "
                             f"got {getattr(X, 'shape', type(X).__name__)}")
        if not X.is_floating_point():
            raise ValueError(f"{where} must return floating-point scores, got dtype {X.dtype}")
        if self.dtype is None:
            self.dtype, self.device = X.dtype, X.device
            self.rows.to(X.device)
            self.cols.to(X.device)
        elif X.dtype != self.dtype or X.device != self.device:
            raise ValueError(f"{where} returned {X.dtype} on {X.device}; earlier tiles were {self.dtype} on "
                             f"{self.device}: every tile must have one dtype and device")
        lo, hi = torch.aminmax(X)
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            raise ValueError(f"{where} returned NaN or Inf scores; clean the scores first")
        pr, pc = self.rows.perms[ri], self.cols.perms[ci]
        if pr is not None:
            X = X[pr]
        if pc is not None:
            X = X[:, pc]
        return X


def _cmp(X: torch.Tensor) -> torch.Tensor:
    """X in a dtype whose nextafter and sums are exact for its values (16-bit -> float32)."""
    return X if X.dtype in (torch.float32, torch.float64) else X.float()


def _before_targets(X: torch.Tensor, dim: int, v: torch.Tensor, ti: torch.Tensor, ids: torch.Tensor,
                    buf: torch.Tensor) -> torch.Tensor:
    """Items of each line of X before the line's target (value v, global index ti), lines
    being the rows (dim=1) or columns (dim=0) of X, items with global indices ``ids``
    (ascending). A line whose target lies outside the tile's index range compares every
    item against one threshold (all items earlier: nextafter(v, -inf); all later: v);
    only lines whose target falls inside the range take the per-item rule. ``buf``: a
    scratch tensor like X."""
    v = v.to(X.dtype)
    down = torch.nextafter(v, v.new_tensor(float("-inf")))
    thr = torch.where(ids[-1] < ti, down, v)
    out = torch.gt(X, thr[:, None] if dim == 1 else thr[None, :], out=buf).sum(dim).long()
    mixed = ((ids[0] < ti) & (ti <= ids[-1])).nonzero().squeeze(1)
    if mixed.numel():
        if dim == 1:
            out[mixed] = _count_by_threshold(X[mixed], v[mixed, None], ti[mixed, None], ids[None, :], 1)
        else:
            out[mixed] = _count_by_threshold(X[:, mixed], v[None, mixed], ti[None, mixed], ids[:, None], 0)
    return out


def _count_lines(X: torch.Tensor, axis: int, ids: torch.Tensor, length: int, ql: torch.Tensor, qv: torch.Tensor,
                 qi: torch.Tensor) -> torch.Tensor:
    """Items of the lines of tile X (R, C) before each query: lines are rows (axis=1) or
    columns (axis=0); query q is item qi[q] (global index) of value qv[q] in line ql[q]
    (local); ``ids`` are the global indices of the items along a line (C,) or (R,), in
    lines of ``length`` items. Returns (Q,) long counts within this tile.

    float32 or narrower: items are keyed (value desc, index asc) by one int64
    (:func:`.value_keys`). Survivors (tried first): only items scoring at least their line's
    lowest query can be before any query (re-ranking queries sit near the top of their
    lines, so few survive); they and the queries are sorted by (line, key) together and
    each query's count read off its place. Otherwise every item is searched among its
    line's sorted query keys and histogrammed. float64: one compare per (query, item).
    """
    Q = ql.numel()
    if X.dtype == torch.float64:
        X = X.T.contiguous() if axis == 0 else X
        out = torch.empty(Q, dtype=torch.long, device=X.device)
        step = max(1, QUERY_BLOCK_ELEMENTS // X.shape[1])
        for s in range(0, Q, step):
            sl = slice(s, s + step)
            out[sl] = _count_by_threshold(X[ql[sl]], qv[sl][:, None].to(X.dtype), qi[sl][:, None], ids[None, :], 1)
        return out
    R = X.shape[0] if axis == 1 else X.shape[1]
    qk = value_keys(qv, qi, length)
    low = torch.full((R,), float("inf"), dtype=X.dtype, device=X.device).scatter_reduce(0, ql, qv.to(X.dtype), "amin")
    keep = X >= (low[:, None] if axis == 1 else low[None, :])
    n_keep = int(torch.count_nonzero(keep))
    if n_keep <= SURVIVOR_MAX_FRACTION * X.numel():
        nz = keep.nonzero()
        el, ej = (nz[:, 0], nz[:, 1]) if axis == 1 else (nz[:, 1], nz[:, 0])
        ek = value_keys(X[nz[:, 0], nz[:, 1]], ids[ej], length)
        # survivors first, then queries; stable sorts by key, then line: a query's own item
        # (equal key) lands before it, and whatever follows it in its line is before it.
        lines, keys = torch.cat([el, ql]), torch.cat([ek, qk])
        o = torch.sort(keys, stable=True).indices
        o = o[torch.sort(lines[o], stable=True).indices]
        place = torch.empty_like(o)
        place[o] = torch.arange(o.numel(), device=X.device)
        seen = torch.cumsum((o < n_keep).long(), 0)  # survivors at or before each sorted place
        upto = torch.cumsum(torch.bincount(el, minlength=R), 0)  # survivors in lines <= each line
        return upto[ql] - seen[place[n_keep:]]
    if axis == 0:
        X = X.T.contiguous()
    o = torch.sort(qk, stable=True).indices
    o = o[torch.sort(ql[o], stable=True).indices]  # by line, keys ascending inside
    ls = ql[o]
    per_line = torch.bincount(ls, minlength=R)
    width = int(per_line.max())
    slot = torch.arange(Q, device=X.device) - (torch.cumsum(per_line, 0) - per_line)[ls]
    table = torch.full((R, width), _INT64_MAX, dtype=torch.int64, device=X.device)
    table[ls, slot] = qk[o]
    # b = number of the line's query keys below the item's key: the item is before query j iff j < b
    b = torch.searchsorted(table, value_keys(X, ids[None, :], length))
    b += torch.arange(R, device=X.device)[:, None] * (width + 1)
    hist = torch.bincount(b.view(-1), minlength=R * (width + 1)).view(R, width + 1)
    before = hist.sum(1, keepdim=True) - torch.cumsum(hist, 1)
    out = torch.empty(Q, dtype=torch.long, device=X.device)
    out[o] = before[ls, slot]
    return out


def _merge_topk(vals: torch.Tensor, idx: torch.Tensor, X: torch.Tensor, axis: int, ids: torch.Tensor, k: int,
                length: int):
    """Top-k (value desc, index asc) of each line of [current (vals, idx) (lines, k) | tile
    X's lines]: rows (axis=1) or columns (axis=0) of X, whose items have the global
    indices ``ids`` (ascending) in lines of ``length`` items. Returns the new (vals, idx).

    Once every list is full, only items scoring at least their line's k-th can enter:
    those survivors and the lists are sorted together by (line, key) (:func:`.value_keys`),
    with no top-k over the tile (a torch.topk over short columns costs ~5x a pass);
    a dense top-k merge otherwise (first tiles, float64, too many survivors)."""
    n_lines = X.shape[0] if axis == 1 else X.shape[1]
    if X.dtype != torch.float64 and bool(torch.isfinite(vals[:, -1]).all()):
        kth = vals[:, -1]
        keep = X >= (kth[:, None] if axis == 1 else kth[None, :])
        if int(torch.count_nonzero(keep)) <= SURVIVOR_MAX_FRACTION * X.numel():
            nz = keep.nonzero()
            el, ej = (nz[:, 0], nz[:, 1]) if axis == 1 else (nz[:, 1], nz[:, 0])
            allv = torch.cat([vals.reshape(-1), X[nz[:, 0], nz[:, 1]]])
            alli = torch.cat([idx.reshape(-1), ids[ej]])
            alll = torch.cat([torch.arange(n_lines, device=X.device).repeat_interleave(k), el])
            o = torch.sort(value_keys(allv, alli, length), descending=True, stable=True).indices
            o = o[torch.sort(alll[o], stable=True).indices]  # by line, best first inside
            counts = torch.bincount(alll, minlength=n_lines)
            take = o[(torch.cumsum(counts, 0) - counts)[:, None] + torch.arange(k, device=X.device)[None, :]]
            return allv[take], alli[take]
    lines = X if axis == 1 else X.T.contiguous()
    tv, ti = topk_lines(lines, min(k, lines.shape[1]))
    v = torch.cat([vals, tv.to(vals.dtype)], 1)
    i = torch.cat([idx, ids[ti]], 1)
    o = rank_order(v, i)[:, :k]
    return v.gather(1, o), i.gather(1, o)


def _groups(keys: torch.Tensor, n_groups: int):
    """(order, bounds): ``order`` sorts ``keys`` (stable), group g is order[bounds[g]:bounds[g+1]]."""
    order = torch.sort(keys, stable=True).indices
    counts = torch.bincount(keys, minlength=n_groups)
    bounds = torch.zeros(n_groups + 1, dtype=torch.long, device=keys.device)
    bounds[1:] = torch.cumsum(counts, 0)
    return order, bounds.tolist()


def _nondeterministic(what: str) -> ValueError:
    return ValueError(f"the scorer returned a different {what} than in an earlier pass: a streaming evaluation "
                      "re-scores tiles, so score(image_rows, text_cols) must be deterministic")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tile", disable=not enabled, leave=False)


@dataclass
class StreamRanks:
    """0-based ranks (plain, and re-ranked when asked), the re-ranked heads, and how it ran.

    i2t (N,), t2i (M,) long; i2t_heads (N, k_i2t) text ids and t2i_heads (M, k_t2i) image
    ids (None without re-ranking), with i2t_reranked (N,), t2i_reranked (M,);
    info: tiles scored per pass, scorer and total seconds per pass."""

    i2t: torch.Tensor
    t2i: torch.Tensor
    i2t_heads: Optional[torch.Tensor] = None
    t2i_heads: Optional[torch.Tensor] = None
    i2t_reranked: Optional[torch.Tensor] = None
    t2i_reranked: Optional[torch.Tensor] = None
    info: dict = field(default_factory=dict)


@torch.no_grad()
def stream_ranks(
    score: Scorer,
    N: int,
    M: int,
    txt2img=None,
    *,
    rerank: bool = False,
    k_i2t: int = 15,
    k_t2i: int = 20,
    kprime: int = 5,
    n: Optional[int] = None,
    neighbors: Optional[str] = None,
    text_vectors=None,
    backend: str = "auto",
    tile_rows: int = DEFAULT_TILE_ROWS,
    tile_cols: int = DEFAULT_TILE_COLS,
    row_tiles: Optional[Sequence] = None,
    col_tiles: Optional[Sequence] = None,
    progress: bool = False,
    state=None,
) -> StreamRanks:
    """Ranks of the (N, M) grid that ``score`` defines, plain and ACF-R+ re-ranked, read
    tile by tile (see the module doc).

    Args:
        score: score(image_rows (n,) long CPU, text_cols (m,) long CPU) -> (n, m) float.
        N, M: images and texts.
        txt2img: (M,) integer image of each caption; None = t // 5.
        rerank, k_i2t, k_t2i, kprime, n: as :func:`acf_fast.evaluate.evaluate_protocol`.
        neighbors: "embedding" (needs text_vectors (M, E)) or "siblings"; None =
            "embedding"; "profile" is refused (it needs S's columns).
        backend: for the embedding neighbours ("auto" | "torch" | "triton"; same ids).
        tile_rows, tile_cols: contiguous tile sizes; or row_tiles / col_tiles: explicit
            lists of id tensors that partition [0, N) / [0, M) (e.g. a model's chunks).
        progress: tqdm bars per pass.
        state: a :class:`acf_fast.stream_state.FoldState`: resume from its saved pass
            and row tile, and save there as the passes go (None: nothing saved).
    """
    for name, v in (("N", N), ("M", M)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    N, M = int(N), int(M)
    g = check_txt2img(txt2img, N, M).cpu()
    if rerank:
        neighbors, text_vectors = _check_stream_rerank(True, neighbors, text_vectors, M)
        k_i2t = check_k(k_i2t, M, "k_i2t", "list of captions per image")
        k_t2i = check_k(k_t2i, N, "k_t2i", "list of images per caption")
        check_k(kprime, M if neighbors != "siblings" else 10**18, "kprime", "number of captions")
        n = check_cap(n)
    rows = _Axis(row_tiles, N, tile_rows, "row_tiles" if row_tiles is not None else "tile_rows")
    cols = _Axis(col_tiles, M, tile_cols, "col_tiles" if col_tiles is not None else "tile_cols")
    tiles = _Tiles(score, rows, cols)
    nR, nC = len(rows), len(cols)
    info = {"tiles": [nR, nC], "passes": {}}
    saved = state.load() if state is not None else None
    stage, start, kept = ("ground_truth", 0, {}) if saved is None else saved
    if saved is not None:
        info["resumed"] = {"stage": stage, "row_tile": start}
    on_disk = [(_stage_index(stage), start)]

    def begin(name):  # first row tile of pass ``name``: nR if the saved state is past it, ``start`` in it, else 0
        return nR if _stage_index(name) < _stage_index(stage) else (start if name == stage else 0)

    def save(name, nxt, force=False, **tensors):
        # Only forward: a resumed run passing the saves of the passes it skips must not put
        # an earlier position over the saved one (its counts would then be added twice).
        if state is None or (_stage_index(name), nxt) <= on_disk[0]:
            return
        kept.update({k: v for k, v in tensors.items() if v is not None})
        if state.save(name, nxt, kept, force=force):
            on_disk[0] = (_stage_index(name), nxt)

    def record(name, t0, calls0, secs0):
        info["passes"][name] = {"tiles": tiles.calls - calls0, "score_s": round(tiles.seconds - secs0, 3),
                                "total_s": round(time.perf_counter() - t0, 3)}

    # ---- pass 1: ground-truth pairs, from the tiles that hold them
    t0, c0, s0 = time.perf_counter(), tiles.calls, tiles.seconds
    t_all = torch.arange(M)
    order, bounds = _groups(rows.tile_of[g] * nC + cols.tile_of[t_all], nR * nC)
    own = None
    keys = [key for key in range(nR * nC) if bounds[key] < bounds[key + 1]]
    if saved is not None:  # one tile: the scorer's device and dtype, and a check of the saved scores
        keys = keys[:1]
    bar = _progress(len(keys), "stream: ground truth", progress)
    for key in keys:
        X = tiles(key // nC, key % nC)
        if own is None:
            own = torch.empty(M, dtype=X.dtype, device=X.device) if saved is None else kept["own"].to(X.device)
            g, t_all, order = g.to(X.device), t_all.to(X.device), order.to(X.device)
        ts = order[bounds[key] : bounds[key + 1]]
        if saved is None:
            own[ts] = X[rows.local[g[ts]], cols.local[ts]]
        elif own.dtype != X.dtype or not bool((X[rows.local[g[ts]], cols.local[ts]] == own[ts]).all()):
            raise _nondeterministic("ground-truth score (saved by the run this one resumes)")
        bar.update()
    bar.close()
    dev, dtype = tiles.device, tiles.dtype
    save("ranks", 0, force=True, own=own)

    def restore(name, make):  # a saved tensor on the scorer's device, else make() a fresh one
        return kept[name].to(dev) if name in kept else make()

    top = torch.full((N,), float("-inf"), dtype=dtype, device=dev).scatter_reduce(0, g, own, "amax")
    best = torch.full((N,), M, dtype=torch.long, device=dev).scatter_reduce(
        0, g, torch.where(own == top[g], t_all, M), "amin")
    w = own[best]  # score of each image's best caption: its I2T target
    record("ground_truth", t0, c0, s0)

    # ---- pass 2: ranks (counts) and, for re-ranking, the top-k lists
    t0, c0, s0 = time.perf_counter(), tiles.calls, tiles.seconds
    cnt_i2t = restore("cnt_i2t", lambda: torch.zeros(N, dtype=torch.long, device=dev))
    cnt_t2i = restore("cnt_t2i", lambda: torch.zeros(M, dtype=torch.long, device=dev))
    rv = ri_ = cv = ci_ = None
    if rerank:
        rv = restore("rv", lambda: torch.full((N, k_i2t), float("-inf"), dtype=dtype, device=dev))
        ri_ = restore("ri", lambda: torch.full((N, k_i2t), M, dtype=torch.long, device=dev))
        cv = restore("cv", lambda: torch.full((M, k_t2i), float("-inf"), dtype=dtype, device=dev))
        ci_ = restore("ci", lambda: torch.full((M, k_t2i), N, dtype=torch.long, device=dev))
    first = begin("ranks")
    bar = _progress(nR * nC, "stream: ranks" + (" + top-k" if rerank else ""), progress)
    bar.update(first * nC)
    buf = None
    for a in range(first, nR):
        R = rows.ids[a]
        w_R, best_R = w[R], best[R]
        for b in range(nC):
            C = cols.ids[b]
            X = tiles(a, b)
            Xc = _cmp(X)
            if buf is None or buf.shape != Xc.shape or buf.dtype != Xc.dtype:
                buf = torch.empty_like(Xc)  # scratch of _before_targets, reused across tiles of one shape
            # T2I: caption t's target is image g[t] in column t; I2T: image i's is best[i] in row i.
            cnt_i2t[R] += _before_targets(Xc, 1, w_R, best_R, C, buf)
            cnt_t2i[C] += _before_targets(Xc, 0, own[C], g[C], R, buf)
            # the pairs of pass 1 inside this tile (grouped there by tile) must read the same:
            # a deterministic scorer
            ts = order[bounds[a * nC + b] : bounds[a * nC + b + 1]]
            if ts.numel() and not bool((X[rows.local[g[ts]], cols.local[ts]] == own[ts]).all()):
                raise _nondeterministic("ground-truth score")
            if rerank:
                rv[R], ri_[R] = _merge_topk(rv[R], ri_[R], X, 1, C, k_i2t, M)
                cv[C], ci_[C] = _merge_topk(cv[C], ci_[C], X, 0, R, k_t2i, N)
            bar.update()
        save("ranks", a + 1, cnt_i2t=cnt_i2t, cnt_t2i=cnt_t2i, rv=rv, ri=ri_, cv=cv, ci=ci_)
    bar.close()
    record("ranks", t0, c0, s0)
    out = StreamRanks(cnt_i2t, cnt_t2i, info=info)
    if not rerank:
        save("done", 0, force=True, cnt_i2t=cnt_i2t, cnt_t2i=cnt_t2i)
        return out
    save("reverse_i2t", 0, force=True, cnt_i2t=cnt_i2t, cnt_t2i=cnt_t2i, rv=rv, ri=ri_, cv=cv, ci=ci_)

    # ---- neighbours Nb(t) (M, k'), t first: from text vectors or txt2img, never from S
    t0 = time.perf_counter()
    nb = neighbors_of_checked(neighbors, kprime, None, text_vectors, g.cpu(), backend).to(dev)
    info["neighbors_s"] = round(time.perf_counter() - t0, 3)
    kp = nb.shape[1]

    # ---- pass 3: I2T reverse positions; scores S[c, u] of each T2I candidate c and neighbour u
    t0, c0, s0 = time.perf_counter(), tiles.calls, tiles.seconds
    qi = torch.arange(N, device=dev).repeat_interleave(k_i2t)  # image i ...
    qt, qv = ri_.reshape(-1), rv.reshape(-1)  # ... and each text t of its top-k, with S[i, t]
    q_order, q_bounds = _groups(cols.tile_of[qt], nC)
    rev_i2t = restore("rev_i2t", lambda: torch.zeros(N * k_i2t, dtype=torch.long, device=dev))
    pt = torch.arange(M, device=dev).repeat_interleave(k_t2i)  # text t ...
    pc = ci_.reshape(-1)  # ... and each image c of its top-k
    p_order, p_bounds = _groups(rows.tile_of[pc], nR)
    best_u = restore("best_u", lambda: torch.empty(M * k_t2i, dtype=torch.long, device=dev))
    best_v = restore("best_v", lambda: torch.empty(M * k_t2i, dtype=dtype, device=dev))
    first = begin("reverse_i2t")
    bar = _progress(nR * nC, "stream: reverse positions (I2T)", progress)
    bar.update(first * nC)
    for a in range(first, nR):
        R = rows.ids[a]
        mine = p_order[p_bounds[a] : p_bounds[a + 1]]  # T2I candidates in this row tile
        pq = mine.repeat_interleave(kp)
        pu = nb[pt[mine]].reshape(-1)
        u_order, u_bounds = _groups(cols.tile_of[pu], nC)
        pvals = torch.empty(pu.numel(), dtype=dtype, device=dev)
        for b in range(nC):
            X = tiles(a, b)
            sel = q_order[q_bounds[b] : q_bounds[b + 1]]
            if sel.numel():  # lines = the tile's columns
                rev_i2t[sel] += _count_lines(X, 0, R, N, cols.local[qt[sel]], qv[sel], qi[sel])
            inside = sel[rows.tile_of[qi[sel]] == a]
            if inside.numel() and not bool((X[rows.local[qi[inside]], cols.local[qt[inside]]] == qv[inside]).all()):
                raise _nondeterministic("top-k score")
            us = u_order[u_bounds[b] : u_bounds[b + 1]]
            pvals[us] = X[rows.local[pc[pq[us]]], cols.local[pu[us]]]
            bar.update()
        # the best neighbour of t in row c, by (score desc, index asc): spec §5's min
        vals, uu = pvals.view(-1, kp), pu.view(-1, kp)
        topv = vals.max(dim=1, keepdim=True).values
        best_u[mine] = torch.where(vals == topv, uu, M).min(dim=1).values
        best_v[mine] = topv.squeeze(1)
        save("reverse_i2t", a + 1, rev_i2t=rev_i2t, best_u=best_u, best_v=best_v)
    bar.close()
    record("reverse_i2t_and_neighbour_scores", t0, c0, s0)
    save("reverse_t2i", 0, force=True, rev_i2t=rev_i2t, best_u=best_u, best_v=best_v)

    # ---- pass 4: T2I reverse positions (best neighbour's position in row c)
    t0, c0, s0 = time.perf_counter(), tiles.calls, tiles.seconds
    rev_t2i = restore("rev_t2i", lambda: torch.zeros(M * k_t2i, dtype=torch.long, device=dev))
    first = begin("reverse_t2i")
    bar = _progress(nR * nC, "stream: reverse positions (T2I)", progress)
    bar.update(first * nC)
    for a in range(first, nR):
        sel = p_order[p_bounds[a] : p_bounds[a + 1]]
        lr = rows.local[pc[sel]]
        for b in range(nC):
            X = tiles(a, b)
            if sel.numel():  # lines = the tile's rows
                rev_t2i[sel] += _count_lines(X, 1, cols.ids[b], M, lr, best_v[sel], best_u[sel])
            inside = sel[cols.tile_of[best_u[sel]] == b]
            if inside.numel() and not bool((X[rows.local[pc[inside]], cols.local[best_u[inside]]] == best_v[inside]).all()):
                raise _nondeterministic("neighbour score")
            bar.update()
        save("reverse_t2i", a + 1, rev_t2i=rev_t2i)
    bar.close()
    record("reverse_t2i", t0, c0, s0)
    save("done", 0, force=True, rev_t2i=rev_t2i)

    # ---- re-ranked heads (1-based reverse positions, capped by n) and their ranks
    r_i2t = (rev_i2t + 1).view(N, k_i2t)
    r_t2i = (rev_t2i + 1).view(M, k_t2i)
    heads_i2t, hv_i2t = _reorder(ri_, r_i2t, n), _reorder(rv, r_i2t, n)
    heads_t2i, hv_t2i = _reorder(ci_, r_t2i, n), _reorder(cv, r_t2i, n)
    img = torch.arange(N, device=dev)
    out.i2t_heads, out.t2i_heads = heads_i2t, heads_t2i
    out.i2t_reranked = _apply_heads(out.i2t, heads_i2t, g[heads_i2t] == img[:, None], w, hv_i2t, best, heads_i2t)
    out.t2i_reranked = _apply_heads(out.t2i, heads_t2i, heads_t2i == g[:, None], own, hv_t2i, g, heads_t2i)
    info["neighbors"] = neighbors
    return out


_ORDER = ("ground_truth",) + STAGES


def _stage_index(stage: str) -> int:
    return _ORDER.index(stage)


def _metrics(i2t: torch.Tensor, t2i: torch.Tensor) -> dict:
    out = {"i2t": summarize_ranks(i2t), "t2i": summarize_ranks(t2i)}
    out["rsum"] = _rsum(out)
    return out


def _fold_scorer(score: Scorer, a: int, caps: torch.Tensor) -> Scorer:
    return lambda r, c: score(r + a, caps[c])


def _fold_tiles(tiles: Optional[Sequence], keep: torch.Tensor, length: int) -> Optional[list]:
    """Tiles restricted to the ids ``keep`` (sorted) and renumbered 0.. within them."""
    if tiles is None:
        return None
    new = torch.full((length,), -1, dtype=torch.long)
    new[keep] = torch.arange(keep.numel())
    out = []
    for ids in tiles:
        ids = new[torch.as_tensor(ids).long().cpu()]
        if (ids >= 0).any():
            out.append(ids[ids >= 0])
    return out


def stream_evaluate(
    score: Scorer,
    N: int,
    M: int,
    protocol: str = "any",
    txt2img=None,
    *,
    rerank: bool = False,
    k_i2t: int = 15,
    k_t2i: int = 20,
    kprime: int = 5,
    n: Optional[int] = None,
    neighbors: Optional[str] = None,
    text_vectors=None,
    backend: str = "auto",
    tile_rows: int = DEFAULT_TILE_ROWS,
    tile_cols: int = DEFAULT_TILE_COLS,
    row_tiles: Optional[Sequence] = None,
    col_tiles: Optional[Sequence] = None,
    progress: bool = False,
    details: bool = False,
    work=None,
    fingerprint: Optional[dict] = None,
    save_every_s: float = EVERY_S,
):
    """:func:`acf_fast.evaluate.evaluate_protocol` of the grid ``score`` defines, without S.

    Same arguments (S replaced by ``score``, N, M and the tiling of :func:`stream_ranks`)
    and the same result dict, equal to the in-memory one on the S assembled from the
    tiles. ``details=True`` returns (result, [StreamRanks per fold]) (one fold except
    coco1k), with the re-ranked heads.

    ``work``: a folder where the passes save their progress (:mod:`acf_fast.stream_state`,
    at most every ``save_every_s`` seconds and at the end of each pass); a rerun with the
    same ``fingerprint`` (a JSON-able dict of what ``score`` depends on: model, data,
    settings; required with ``work``) and the same arguments resumes there and returns
    the same result. The key folder is kept afterwards (a rerun reads the finished folds).
    """
    spec = protocol_spec(protocol, N, M, what="a grid")
    g = check_txt2img(txt2img, N, M).cpu()
    neighbors, text_vectors = _check_stream_rerank(rerank, neighbors, text_vectors, M)
    opts = dict(rerank=rerank, k_i2t=k_i2t, k_t2i=k_t2i, kprime=kprime, n=n, neighbors=neighbors, backend=backend,
                tile_rows=tile_rows, tile_cols=tile_cols, progress=progress)
    state = None
    if work is not None:
        if not isinstance(fingerprint, dict):
            raise ValueError("work= needs fingerprint=, a dict of what the scorer's scores depend on (model, data, "
                             f"settings), got {fingerprint!r}")
        settings = {k: v for k, v in opts.items() if k not in ("backend", "progress")}
        settings.update(N=int(N), M=int(M), protocol=protocol, txt2img=tensors_sha256(g),
                        text_vectors=tensors_sha256(text_vectors if rerank else None),
                        row_tiles=_tiles_digest(row_tiles), col_tiles=_tiles_digest(col_tiles))
        state = StreamState(work, dict(fingerprint, stream=settings), every_s=save_every_s)
    try:
        parts, runs = _stream_folds(score, N, M, spec["folds"], g, text_vectors, row_tiles, col_tiles, state, opts)
    finally:
        if state is not None:
            state.close()
    result = protocol_result(protocol, N, M, parts, **opts)
    if state is not None:
        for r in runs:
            r.info["work"] = str(state.root)
    return (result, runs) if details else result


def _tiles_digest(tiles: Optional[Sequence]) -> Optional[str]:
    return None if tiles is None else tensors_sha256(*[torch.as_tensor(t).long() for t in tiles])


def _stream_folds(score, N, M, folds, g, text_vectors, row_tiles, col_tiles, state, opts):
    """(per-fold parts for protocol_result, [StreamRanks per fold])."""
    rerank = opts["rerank"]
    runs, parts = [], []
    for f, (a, b, caps) in enumerate(protocol_folds(N, g, folds)):
        fold_state = None if state is None else state.fold(f)
        if caps is None:
            run = stream_ranks(score, N, M, g, text_vectors=text_vectors, row_tiles=row_tiles, col_tiles=col_tiles,
                               state=fold_state, **opts)
        else:
            tv = None if text_vectors is None else text_vectors[caps.to(text_vectors.device)]
            run = stream_ranks(_fold_scorer(score, a, caps), b - a, caps.numel(), g[caps] - a, text_vectors=tv,
                               row_tiles=_fold_tiles(row_tiles, torch.arange(a, b), N),
                               col_tiles=_fold_tiles(col_tiles, caps, M), state=fold_state, **opts)
        runs.append(run)
        parts.append({"images": (a, b), "plain": _metrics(run.i2t, run.t2i),
                      "reranked": _metrics(run.i2t_reranked, run.t2i_reranked) if rerank else None})
    return parts, runs


def _check_stream_rerank(rerank: bool, neighbors, text_vectors, M: int):
    """``evaluate._check_rerank_inputs`` plus what a stream cannot do: ``profile``
    neighbours (columns of S) and re-ranking without text neighbours (the default,
    ``profile``, would need S). Returns (neighbors, text_vectors)."""
    if rerank and neighbors == "profile":
        raise ValueError(PROFILE_REFUSAL)
    if rerank and neighbors is None and text_vectors is None:
        raise ValueError("re-ranking a stream needs text neighbours: pass text_vectors (M, E) "
                         "(neighbors='embedding') or neighbors='siblings' (oracle); 'profile' needs S")
    return _check_rerank_inputs(rerank, neighbors, text_vectors, M)


def dot_scorer(A: torch.Tensor, B: torch.Tensor) -> Scorer:
    """A cheap block scorer: score(rows, cols) = A[rows] @ B[cols].T ((N, D), (M, D) on one
    device; the result on that device, A's dtype). Each call is one matmul of its block."""
    def score(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return A[rows.to(A.device)] @ B[cols.to(B.device)].T

    return score


class ACFBlockScorer:
    """ACF on a data split as a block scorer: images encoded per row tile (once per tile
    per pass), texts encoded once (:func:`acf_fast.scoring.encode_texts`), each tile
    scored by ``model.score`` per text chunk, as :func:`acf_fast.scoring.score_images`.

    ``row_tiles`` are the image chunks of ``chunk_images`` and ``col_tiles`` the
    length-sorted text chunks, so every entry is the one :func:`acf_fast.scoring.score_split`
    computes (same calls, same padding). Tiles are float32 on the scoring device.
    Other column sets are scored too (each chunk's subset, padded to the chunk).
    """

    def __init__(self, model, data, texts, device, *, backend: str, precision: str, chunk_images: int):
        self.model, self.data, self.texts, self.device = model, data, texts, device
        self.backend, self.precision = backend, precision
        N, M = data.num_images, texts.count
        self.row_tiles = [torch.arange(a, min(N, a + chunk_images)) for a in range(0, N, chunk_images)]
        sizes = [W.shape[0] for W, _ in texts.chunks]
        starts = np.cumsum([0] + sizes)
        self.col_tiles = [texts.order[a:b] for a, b in zip(starts[:-1], starts[1:])]
        self.chunk_of = torch.empty(M, dtype=torch.long)
        self.place = torch.empty(M, dtype=torch.long)
        self.chunk_of[texts.order] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        self.place[texts.order] = torch.cat([torch.arange(s) for s in sizes])
        self._rows = None  # (first, count) of the encoded images
        self._encoded = None

    def _images(self, rows: torch.Tensor):
        """(V, G, region mask) of a contiguous run of images, kept for the next call (a
        row of tiles asks for the same images once per text chunk)."""
        from .scoring import _autocast, _eval_mode, image_tensors

        key = (int(rows[0]), rows.numel())
        if key != self._rows:
            if not bool((rows == torch.arange(key[0], key[0] + key[1])).all()):
                raise ValueError("ACFBlockScorer scores contiguous runs of images (its row_tiles, or runs inside them)")
            regions, rmask, glob = image_tensors(self.data, slice(key[0], key[0] + key[1]), self.device)
            with _eval_mode(self.model), _autocast(self.precision):
                V, G = self.model.encode_images(regions, rmask, glob)
            self._rows, self._encoded = key, (V, G, rmask)
        return self._encoded

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        from .scoring import _autocast, _eval_mode

        V, G, rmask = self._images(rows)
        out = torch.empty(rows.numel(), cols.numel(), dtype=torch.float32, device=self.device)
        ch = self.chunk_of[cols]
        with _eval_mode(self.model), _autocast(self.precision):
            for c in torch.unique(ch).tolist():
                where = (ch == c).nonzero().squeeze(1)
                W, m = self.texts.chunks[c]
                pos = self.place[cols[where]]
                if pos.numel() != W.shape[0] or not bool((pos == torch.arange(W.shape[0])).all()):
                    W, m = W[pos.to(W.device)], m[pos.to(m.device)]
                out[:, where.to(self.device)] = self.model.score(V, rmask, G, W, m, backend=self.backend).float()
        return out


def stream_split(checkpoint, folder, split: str = "test", protocol: str = "any", *, backend: str = "auto",
                 device="auto", precision: str = "fp32", chunk_images: int = 256, text_chunk: Optional[int] = None,
                 progress: bool = True, work=None, save_every_s: float = EVERY_S, **opts):
    """``acf-fast evaluate --data --stream``: :func:`stream_evaluate` of a checkpoint on a
    SCAN-layout split, with the model as the block scorer (:class:`ACFBlockScorer`) and its
    text vectors for ``embedding`` neighbours. Progress is saved under ``work`` (default
    :func:`default_stream_work`) and a rerun resumes. Returns (result dict, scoring info)."""
    from .scoring import default_text_chunk, encode_texts, open_split, scoring_settings, split_fingerprint

    if opts.get("rerank") and opts.get("neighbors") == "profile":
        raise ValueError(PROFILE_REFUSAL)
    opened = open_split(checkpoint, folder, split, backend=backend, device=device, precision=precision,
                        chunk_images=chunk_images)
    model, data, dev = opened.model, opened.data, opened.device
    words, word_mask, M = opened.words, opened.word_mask, opened.data.num_captions
    text_chunk = text_chunk or default_text_chunk(dev)
    texts = encode_texts(model, words, word_mask, dev, precision=precision, text_chunk=text_chunk)
    scorer = ACFBlockScorer(model, data, texts, dev, backend=backend, precision=precision, chunk_images=chunk_images)
    settings = scoring_settings(backend, precision, dev, text_chunk)
    fingerprint = split_fingerprint(model, folder, split, settings)
    if work is None and opened.checkpoint is not None:
        work = default_stream_work(opened.checkpoint, split)
    t0 = time.perf_counter()
    result, runs = stream_evaluate(scorer, data.num_images, M, protocol, np.asarray(data.txt2img, dtype=np.int64),
                                   text_vectors=texts.vectors, row_tiles=scorer.row_tiles, col_tiles=scorer.col_tiles,
                                   progress=progress, details=True, work=work, fingerprint=fingerprint,
                                   save_every_s=save_every_s, **opts)
    info = {"stream": True, **settings, "chunk_images": chunk_images, "split": split,
            "seconds": round(time.perf_counter() - t0, 3), "passes": [r.info for r in runs]}
    return result, info


def default_stream_work(checkpoint, split: str):
    """Where a streaming evaluation saves its progress by default:
    ``<checkpoint folder>/eval_<checkpoint name>_<split>_stream``, beside (never inside)
    the full grid's chunk folder, whose key folders it would otherwise prune."""
    from .scoring import default_work

    base = default_work(checkpoint, split)
    return base.with_name(base.name + "_stream")
