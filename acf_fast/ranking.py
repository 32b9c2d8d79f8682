"""Ranking primitives shared by the re-ranker and the evaluator (spec §4, §5).

Every list is ordered by descending score, ties by smaller index. The position of
an item in a list is a COUNT, never read off a full sort:

    position(j) = #{j': s[j'] > s[j]} + #{j' < j: s[j'] == s[j]}      (0-based)

A "line" is a row of S (the texts of one image) or a column of S (the images of
one text). Two implementations give the same integers, ties included:

- ``triton`` (the GPU path, :mod:`acf_fast.kernels.ranking`): the whole S at once,
  one ``torch.topk`` per direction with the tied boundary re-selected by a kernel,
  positions by one streaming counting kernel, nothing read back to the host (so a
  re-rank can be captured in a CUDA graph). Used for float32/16/bf16 S on CUDA when
  a transposed copy of S fits in memory; on CPU tensors it runs only under
  ``TRITON_INTERPRET=1`` (the tests).
- ``torch`` (the CPU path, any device and dtype): lines in blocks whose temporaries
  stay under a byte budget (small on a CPU so blocks stay in cache), on the device
  where S lives; nothing here loops over queries in Python.

Counting many positions inside one line on the torch path (``positions``), three ways:

- survivors (tried first): only elements scoring at least the line's lowest query
  can be before any query, so keep those (one compare pass), sort just them by
  (line, value, index) and read every query's count off its place. Re-ranking
  queries sit near the top of their lines, so few elements survive;
- buckets (when too many survive; float32 or narrower): sort the line's query keys
  (not the line), binary-search every element among them (``torch.searchsorted``),
  histogram, suffix-sum. Each value and its index are packed into one int64 key
  ordering like (value desc, index asc), so ties are exact with one search;
- direct (float64, when too many survive): compare the whole line per query.

One position per line (``count_before_targets``, the metrics) is one compare per
item against a threshold that already holds the index rule of ties.

Column blocks are copied transposed in tiles (:func:`line_block`): on a CPU a walk
down a column of a large S misses the TLB at every row.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch

DEFAULT_BUDGET_BYTES = 64 * 2**20  # largest temporary of any block
CPU_PASS_BYTES = 32 * 2**20  # elementwise passes on a CPU: ~8M float32 per block

# A block falls back from "survivors" when more than this fraction of it survives.
SURVIVOR_MAX_FRACTION = 0.25

# A line switches from direct counting to buckets when it holds more queries
# than this (a binary search over q sorted keys costs ~ this many compares).
DIRECT_MAX_QUERIES_PER_LINE = 12

_INT64_MAX = torch.iinfo(torch.int64).max


def check_scores(S, name: str = "S") -> torch.Tensor:
    """Validate a similarity matrix S (N images, M texts); returns it as a tensor.

    Accepts a torch tensor or a numpy array (shared, not copied, unless it is not
    C-contiguous or not in native byte order). Refuses anything
    that is not 2-D, not floating point, empty, or holds NaN/Inf (ValueError).
    """
    if isinstance(S, np.ndarray):
        if S.dtype.kind != "f" or S.dtype.itemsize not in (2, 4, 8):
            raise ValueError(f"{name} must hold float16, float32 or float64 scores, got dtype {S.dtype}")
        # torch takes native byte order only: a big-endian array is converted (copied)
        S = torch.from_numpy(np.ascontiguousarray(S, dtype=S.dtype.newbyteorder("=")))
    if not isinstance(S, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(S).__name__}")
    if S.dim() != 2:
        raise ValueError(f"{name} must be 2-D (images, texts), got shape {tuple(S.shape)}")
    if not S.is_floating_point():
        raise ValueError(f"{name} must hold floating-point scores, got dtype {S.dtype}")
    if S.shape[0] == 0 or S.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(S.shape)}); need at least one image and one text")
    lo, hi = torch.aminmax(S)  # NaN propagates, Inf shows: one pass, no temporaries
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        step = max(1, DEFAULT_BUDGET_BYTES // max(1, S.shape[1] * S.element_size()))
        for r0 in range(0, S.shape[0], step):
            block = S[r0 : r0 + step]
            if not bool(torch.isfinite(block).all()):
                bad = (~torch.isfinite(block)).nonzero()[0]
                raise ValueError(
                    f"{name} contains NaN or Inf (first at [{r0 + int(bad[0])}, {int(bad[1])}]); clean the scores first"
                )
    return S


def check_k(k, length: int, name: str, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name} must be a positive int, got {k!r}")
    if k > length:
        raise ValueError(f"{name} = {k} is larger than the {what} ({length} items)")
    return int(k)


def check_cap(n) -> Optional[int]:
    """n̂ of spec §5: None (full ranking) or a positive int."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be None or a positive int, got {n!r}")
    return int(n)


BACKENDS = ("auto", "torch", "triton")
# Longest line of the triton path: its counting kernels fold (int32 key, -index) into
# one float64, exact while |key| * (length + 1) < 2^53.
MAX_LINE = 2**21 - 1
MAX_VECTOR = 16384  # longest vector whose float64 products the fold kernel holds in registers
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, S: torch.Tensor, *, copy_bytes: Optional[int] = None,
                    why_not: Optional[str] = "default") -> str:
    """"torch" or "triton" for the input S (see module doc).

    "auto" picks triton on CUDA when the kernels take S and ``copy_bytes`` more
    device bytes are free (default ``S.nbytes``: a transposed copy). ``why_not``: why
    the kernels cannot take S, None when they can; by default float32/16/bf16 with
    lines of at most ``MAX_LINE`` items. "triton" on a CPU tensor needs
    ``TRITON_INTERPRET=1`` (the tests).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if why_not == "default":
        why_not = None
        if S.dtype not in _TRITON_DTYPES or max(S.shape) > MAX_LINE:
            why_not = (f"it takes float32/float16/bfloat16 scores with lines of at most {MAX_LINE} items, "
                       f"got {S.dtype} of shape {tuple(S.shape)}")
    if backend == "auto":
        if not S.is_cuda or why_not is not None:
            return "torch"
        free, _ = torch.cuda.mem_get_info(S.device)
        need = S.nbytes if copy_bytes is None else copy_bytes
        return "triton" if need + (256 << 20) <= free else "torch"
    if backend == "triton":
        if not (S.is_cuda or _interpreting()):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import); "
                             "use backend='torch' on CPU")
        if why_not is not None:
            raise ValueError(f"backend='triton' cannot take this input: {why_not}; use backend='torch'")
    return backend


def _kernels():
    from .kernels import ranking as kernels  # imports triton: only on the triton path

    return kernels


def lines_per_block(line_len: int, bytes_per_elem: int = 8, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    return max(1, budget_bytes // max(1, line_len * bytes_per_elem))


def pass_budget(device) -> int:
    return DEFAULT_BUDGET_BYTES if torch.device(device).type == "cuda" else CPU_PASS_BYTES


TRANSPOSE_TILE_ROWS = 512  # rows of S per tile of a transposed copy: their pages fit the TLB


def line_block(S: torch.Tensor, axis: int, start: int, stop: int) -> torch.Tensor:
    """Lines [start, stop) of S as a (lines, length) tensor: rows (axis=1, a view) or
    columns (axis=0, a contiguous copy).

    A column walk on a CPU touches one page per row: copying S[:, start:stop]
    transposed in one go thrashes the TLB (~1.2 s of the 5,000 x 25,000 S against
    0.14 s in tiles of ``TRANSPOSE_TILE_ROWS`` rows, measured here), and so do
    torch.topk and compares along a strided dim; a contiguous block is cheap for both.
    """
    if axis == 1:
        return S[start:stop]
    if S.device.type != "cpu":
        return S[:, start:stop].T.contiguous()
    out = torch.empty(stop - start, S.shape[0], dtype=S.dtype)
    for r in range(0, S.shape[0], TRANSPOSE_TILE_ROWS):
        out[:, r : r + TRANSPOSE_TILE_ROWS].copy_(S[r : r + TRANSPOSE_TILE_ROWS, start:stop].T)
    return out


def rank_order(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Permutation of each row of (vals, idx) (R, k) into (value desc, index asc) order."""
    o = torch.sort(idx, dim=1, stable=True).indices
    # + 0.0 turns -0.0 into +0.0: a radix sort (GPU) orders the two zeros, a stable sort must not
    o2 = torch.sort(vals.gather(1, o) + 0.0, dim=1, descending=True, stable=True).indices
    return o.gather(1, o2)


def topk_lines(X: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k of every line of X (R, L) by (value desc, index asc); returns (values, indices) (R, k).

    ``torch.topk`` picks the right k values but neither the order of equal values
    nor which of several equal values at the boundary; both are fixed here (torch
    path: one host read to find the tied lines).
    """
    L = X.shape[1]
    if k < L:
        # The (k+1)-th value equals the k-th exactly when the boundary is tied.
        vals, idx = torch.topk(X, k + 1, dim=1, sorted=True)
        over = vals[:, k] == vals[:, k - 1]
        vals, idx = vals[:, :k], idx[:, :k]
    else:
        vals, idx = torch.topk(X, k, dim=1, sorted=True)
        over = torch.zeros(X.shape[0], dtype=torch.bool, device=X.device)
    thr = vals[:, -1:]
    if bool(over.any()):
        rows = over.nonzero().squeeze(1)
        Xb, tb = X[rows], thr[rows]
        gt = Xb > tb
        eq = Xb == tb
        need = k - gt.sum(1, keepdim=True)
        keep = gt | (eq & (eq.cumsum(1) <= need))
        idx[rows] = keep.nonzero()[:, 1].view(-1, k)
    vals = X.gather(1, idx)
    o = rank_order(vals, idx)
    return vals.gather(1, o), idx.gather(1, o)


def topk_exact(X: torch.Tensor, k: int) -> torch.Tensor:
    """triton path of :func:`topk_lines`: ids (R, k) of every line of X (R, L), ordered by
    (value desc, index asc), without reading anything back to the host."""
    R, L = X.shape
    if k == L:
        idx = torch.arange(L, device=X.device).expand(R, L).contiguous()
    else:
        vals, idx = torch.topk(X, k + 1, dim=1, sorted=True)
        idx = idx[:, :k].contiguous()
        _kernels().fix_topk_boundary(X, vals, idx, k)
    return idx.gather(1, rank_order(X.gather(1, idx), idx))


def positions_exact(X: torch.Tensor, lines: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """triton path of :func:`positions` on the lines (rows) of X (R, L): 1-based position
    of ``items[q]`` in line ``lines[q]``, (Q,) long, no host reads."""
    return _kernels().count_positions(X, lines, items) + 1


def topk_along(S: torch.Tensor, k: int, axis: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> torch.Tensor:
    """Deterministic top-k ids of every row (axis=1: (N, k) text ids) or column (axis=0: (M, k) image ids)."""
    n_lines, length = (S.shape[0], S.shape[1]) if axis == 1 else (S.shape[1], S.shape[0])
    out = torch.empty(n_lines, k, dtype=torch.long, device=S.device)
    step = lines_per_block(length, 4 * S.element_size(), budget_bytes)
    for a in range(0, n_lines, step):
        b = min(n_lines, a + step)
        # Columns stay a transposed view: topk along the strided dim beats copying first.
        out[a:b] = topk_lines(line_block(S, axis, a, b), k)[1]
    return out


def value_keys(x: torch.Tensor, ids: torch.Tensor, length: int) -> torch.Tensor:
    """int64 keys of scores x (float32 or narrower) at item indices ``ids`` (int64, broadcast
    with x) of lines of ``length`` items: larger key = earlier in the line (value desc, index asc)."""
    x = x.to(torch.float32) + 0.0  # -0.0 + 0.0 = +0.0, so both zeros get one key
    bits = x.contiguous().view(torch.int32)
    # Order-preserving map of IEEE bits to signed ints: negatives flip their magnitude bits.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return (bits << 32) | (length - 1 - ids)


def order_keys(X: torch.Tensor) -> torch.Tensor:
    """int64 keys of X (R, L) (float32 or narrower) that order like (value desc, index asc): larger = earlier."""
    L = X.shape[1]
    return value_keys(X, torch.arange(L, device=X.device, dtype=torch.int64), L)


def _count_direct(X: torch.Tensor, ql: torch.Tensor, qi: torch.Tensor, budget_bytes: int) -> torch.Tensor:
    """Items before item qi in line ql of X (R, L), one query at a time in vectorised batches."""
    L = X.shape[1]
    ar = torch.arange(L, device=X.device)
    out = torch.empty(ql.numel(), dtype=torch.long, device=X.device)
    step = max(1, budget_bytes // (L * max(4, X.element_size())))
    for a in range(0, ql.numel(), step):
        l, i = ql[a : a + step], qi[a : a + step]
        lines = X[l]
        v = lines.gather(1, i[:, None])
        out[a : a + step] = ((lines > v) | ((lines == v) & (ar[None, :] < i[:, None]))).sum(1)
    return out


def _count_buckets(X: torch.Tensor, ql: torch.Tensor, qi: torch.Tensor) -> torch.Tensor:
    """Same as ``_count_direct`` for float32-or-narrower X, by searching the line among its sorted queries."""
    R = X.shape[0]
    keys = order_keys(X)
    qk = keys[ql, qi]
    # Group queries by line, keys ascending inside a group.
    o = torch.sort(qk, stable=True).indices
    o = o[torch.sort(ql[o], stable=True).indices]
    ls, ks = ql[o], qk[o]
    per_line = torch.bincount(ls, minlength=R)
    q_max = int(per_line.max())
    starts = torch.cumsum(per_line, 0) - per_line
    slot = torch.arange(ls.numel(), device=X.device) - starts[ls]
    table = torch.full((R, q_max), _INT64_MAX, dtype=torch.int64, device=X.device)
    table[ls, slot] = ks
    # b[e] = number of this line's query keys < key(e); element e is before query j iff j < b[e].
    b = torch.searchsorted(table, keys)
    b += torch.arange(R, device=X.device)[:, None] * (q_max + 1)
    hist = torch.bincount(b.view(-1), minlength=R * (q_max + 1)).view(R, q_max + 1)
    before = hist.sum(1, keepdim=True) - torch.cumsum(hist, 1)  # before[:, j] = #{e: b[e] > j}
    out = torch.empty_like(qk)
    out[o] = before[ls, slot]
    return out


def _count_survivors(X: torch.Tensor, ql: torch.Tensor, qi: torch.Tensor, max_fraction: float):
    """Items before item qi in line ql of X (R, L), from the elements that score at least
    the line's lowest query; None when more than ``max_fraction`` of X would survive."""
    R, L = X.shape
    qv = X[ql, qi]
    low = torch.full((R,), float("inf"), dtype=X.dtype, device=X.device).scatter_reduce(0, ql, qv, "amin")
    keep = X >= low[:, None]
    n_keep = int(torch.count_nonzero(keep))  # (a bool .sum() is ~20x slower on CPU)
    if n_keep > max_fraction * R * L:
        return None
    nz = keep.nonzero()  # row-major order (documented), so el * L + ej is sorted
    el, ej = nz[:, 0], nz[:, 1]
    ev = X[el, ej] + 0.0  # -0.0 -> +0.0: a radix sort (GPU) must see one zero
    # Sort survivors ascending by (line, value, index desc): whatever follows an element
    # in its line scores higher, or equal with a smaller index, i.e. is before it.
    o = torch.sort(ej, descending=True, stable=True).indices
    o = o[torch.sort(ev[o], stable=True).indices]
    o = o[torch.sort(el[o], stable=True).indices]
    place = torch.empty_like(o)
    place[o] = torch.arange(o.numel(), device=X.device)
    line_end = torch.cumsum(torch.bincount(el, minlength=R), 0)
    after = line_end[el] - 1 - place
    where = torch.searchsorted(el * L + ej, ql * L + qi)
    return after[where]


def positions(
    S: torch.Tensor,
    lines: torch.Tensor,
    items: torch.Tensor,
    axis: int,
    budget_bytes: Optional[int] = None,
) -> torch.Tensor:
    """1-based position of ``items[q]`` in line ``lines[q]`` of S, for every query q.

    axis=1: lines are rows (items are text ids); axis=0: lines are columns (items are
    image ids). lines, items: (Q,) long on S's device. Returns (Q,) long, uncapped.
    """
    n_lines, length = (S.shape[0], S.shape[1]) if axis == 1 else (S.shape[1], S.shape[0])
    out = torch.empty(lines.numel(), dtype=torch.long, device=S.device)
    if lines.numel() == 0:
        return out
    budget = pass_budget(S.device) if budget_bytes is None else budget_bytes
    # Group queries by line; repeats are harmless (each finds the same count).
    srt = torch.sort(lines * length + items)
    ul, ui = srt.values // length, srt.values % length
    counts = torch.empty_like(ul)
    use_buckets = S.dtype != torch.float64
    step = lines_per_block(length, 4, budget)
    bounds = torch.searchsorted(ul, torch.arange(0, n_lines + step, step, device=S.device)).tolist()
    for blk, a in enumerate(range(0, n_lines, step)):
        qa, qb = bounds[blk], bounds[blk + 1]
        if qa == qb:
            continue
        b = min(n_lines, a + step)
        X = line_block(S, axis, a, b)
        ql, qi = ul[qa:qb] - a, ui[qa:qb]
        c = _count_survivors(X, ql, qi, SURVIVOR_MAX_FRACTION)
        if c is None:
            if use_buckets and (qb - qa) > DIRECT_MAX_QUERIES_PER_LINE * (b - a):
                c = _count_buckets(X, ql, qi)
            else:
                c = _count_direct(X, ql, qi, DEFAULT_BUDGET_BYTES)
        counts[qa:qb] = c
    out[srt.indices] = counts + 1
    return out


# count_before_targets samples every TIE_SAMPLE_STEP-th line to choose its method.
TIE_SAMPLE_STEP = 64
TIED_LINES_MAX_FRACTION = 0.25


def _count_by_threshold(X, v, tt, ar, dim, out_buf=None):
    """Items of X before their line's target (value v, index tt): x > nextafter(v, -inf)
    before the target's index, x > v after it. One compare per item."""
    thr = torch.where(ar < tt, torch.nextafter(v, v.new_tensor(float("-inf"))), v)
    # a float 0/1 result and a float sum: ~2x faster than a bool one on a CPU (measured)
    return torch.gt(X, thr, out=thr if out_buf is None else out_buf).sum(dim).long()


def count_before_targets(
    S: torch.Tensor, targets: torch.Tensor, axis: int, budget_bytes: Optional[int] = None
) -> torch.Tensor:
    """0-based position of one target per line: rows (axis=1, targets (N,) text ids) or
    columns (axis=0, targets (M,) image ids). Streams S once; returns (lines,) long.

    Two exact methods; a sample of lines picks the cheaper. Few lines tie their target
    (random floats): sum(sign(x - v)) and sum(|sign(x - v)|) give the items above and
    the ties in cheap float passes, and only the tied lines are recounted. Many do
    (scores of a bf16/fp16 model): one compare per item against a threshold that holds
    the index rule (:func:`_count_by_threshold`).
    """
    n_lines, length = (S.shape[0], S.shape[1]) if axis == 1 else (S.shape[1], S.shape[0])
    budget = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
    out = torch.empty(n_lines, dtype=torch.long, device=S.device)
    dim, ldim = (1, 0) if axis == 1 else (0, 1)
    # 16-bit scores compare exactly against float32 (it holds them all); float sums of
    # -1/0/+1 are exact below 2^24 items.
    fdtype = torch.float64 if S.dtype == torch.float64 or length >= 2**24 else torch.float32
    ar = torch.arange(length, device=S.device)
    ar = ar[None, :] if axis == 1 else ar[:, None]

    def line_targets(a, b):
        X = S[a:b] if axis == 1 else S[:, a:b]  # columns stay in place: rows of the block are contiguous
        tt = targets[a:b, None] if axis == 1 else targets[None, a:b]
        return X, tt, X.gather(dim, tt).to(fdtype)

    sample = torch.arange(0, n_lines, TIE_SAMPLE_STEP, device=S.device)
    Xs = S.index_select(ldim, sample)
    ts = targets[sample, None] if axis == 1 else targets[None, sample]
    tied_share = float(((Xs == Xs.gather(dim, ts)).sum(dim) > 1).float().mean())
    by_sign = tied_share <= TIED_LINES_MAX_FRACTION
    step = lines_per_block(length, 2 * torch.finfo(fdtype).bits // 8, budget)
    for a in range(0, n_lines, step):
        b = min(n_lines, a + step)
        X, tt, v = line_targets(a, b)
        if not by_sign:
            out[a:b] = _count_by_threshold(X, v, tt, ar, dim)
            continue
        sgn = torch.sub(X, v).sign_()  # x - v is 0 only when x == v, for finite floats
        total = sgn.sum(dim)
        nonzero = sgn.abs_().sum(dim)
        out[a:b] = ((total + nonzero) / 2).round().long()
        tied = (length - nonzero) > 1.5  # equal to the target besides itself
        if bool(tied.any()):
            lines = tied.nonzero().squeeze(1)
            out[a + lines] = _count_by_threshold(X.index_select(ldim, lines), v.index_select(ldim, lines),
                                                 tt.index_select(ldim, lines), ar, dim)
    return out


def target_positions(S: torch.Tensor, targets: torch.Tensor, axis: int, backend: str) -> torch.Tensor:
    """0-based position of one target per line (see :func:`count_before_targets`) on the
    resolved ``backend`` ("torch" or "triton"); (lines,) long on S's device."""
    if backend == "triton":
        return _kernels().count_targets(S, targets, axis)
    return count_before_targets(S, targets, axis)


def fold_sum(p: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim by folding halves (``p[..., :h] + p[..., h:]``, zero-padded
    to a power of two): a fixed order, so the same bits on every device and in
    ``kernels.ranking._fold_dots_kernel``."""
    n = p.shape[-1]
    width = 1 << max(0, n - 1).bit_length()
    if width != n:
        p = torch.nn.functional.pad(p, (0, width - n))
    while p.shape[-1] > 1:
        h = p.shape[-1] // 2
        p = p[..., :h] + p[..., h:]
    return p[..., 0]
