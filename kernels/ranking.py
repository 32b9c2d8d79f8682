"""Triton kernels of the re-ranker, the metrics and the text neighbours (spec §4, §5).

Every kernel here is exact: it counts, selects or sums in a fixed order, so its result
is the same integer (or the same float64 bits) as the CPU path in
:mod:`acf_fast.ranking` on the same input, ties included. The launch functions take
tensors on one device and never read a value back to the host, so a whole re-rank
can be captured in a CUDA graph.

Kernels
-------
- ``_positions_kernel``: 0-based position of many queries ``(line, item)`` inside
  their line, ``#{j: x_j > x_item} + #{j < item: x_j == x_item}``. One program
  streams one line once for up to ``QB`` queries of that line (a "chunk", sorted);
  each item finds by binary search how many of them it precedes and adds one to that
  histogram bin; a query's count is the sum of the bins above it. A line with more
  queries gets more chunks. The chunk table is built on the device with static
  shapes (:func:`chunk_table`).
- ``_target_counts_kernel``: the same count for one target per line (the metrics),
  lines given by strides, so the columns of S are read in place, coalesced.
- ``_topk_boundary_kernel``: ``torch.topk`` picks the right values but not which of
  several equal values at the k-th boundary; for a line whose (k+1)-th value equals
  its k-th, this re-selects the k items ``x > v_k`` plus the first equal ones by index.
  Untied lines return at once.
- ``_fold_dots_kernel``: float64 dot products of float32 vectors (the text-neighbour
  cosines), summed by folding halves (``p[:h] + p[h:]``, h = E/2, E/4, ...), the order of
  :func:`acf_fast.ranking.fold_sum`. Each product of two float32 values is exact in
  float64, so fusing multiply and add cannot change a bit, and the GPU gives the CPU's
  float64 bits.

Scores are float32, float16 or bfloat16 (float64 S takes the torch path of
:mod:`acf_fast.ranking`) and finite (the public functions validate S); padding uses
-inf, which then precedes nothing. Comparisons go through order-preserving integer
keys (``_order_key``): an integer compare cannot be flushed to zero (a float compare
under FTZ would call a subnormal equal to zero), and -0.0 and +0.0 get one key, as
``==`` on floats says. The counting kernels fold (key, -index) into one exact float64
(``_composite``), so the index rule of ties costs nothing per pair; that limits a line
to :data:`acf_fast.ranking.MAX_LINE` items.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from acf_fast.ranking import MAX_VECTOR

from . import interpreter  # noqa: F401  (importing it fixes triton 3.6's interpreter)

# Tile sizes (constexpr). Tests shrink them so that k and the queries per line exceed a block.
POSITIONS_BLOCK = 1024  # line items per step of _positions_kernel
POSITIONS_QB_MAX = 128  # queries per program (a binary search of log2(QB) + 1 probes per item)
# _target_counts_kernel: (lines, items) per tile and items per program along a line
# (more programs, summed by atomics): rows have items contiguous, columns lines.
TARGETS_ROWS = (1, 1024, 8192)
TARGETS_COLUMNS = (64, 32, 1024)
BOUNDARY_BLOCK = 1024


@triton.jit
def _order_key(x):
    """int32 key of a float32-or-narrower tensor: same order as the values, one key for -0.0 and +0.0."""
    if x.dtype == tl.bfloat16:
        # bf16 is the top half of a float32: widen the bits (the interpreter's cast flushes subnormals)
        b = x.to(tl.int16, bitcast=True).to(tl.int32) << 16
    else:
        b = x.to(tl.float32).to(tl.int32, bitcast=True)
    return tl.where(b < 0, -(b & 0x7FFFFFFF), b)


@triton.jit
def _composite(x, j, SPAN: tl.constexpr):
    """(key, -index) as one float64, exact (|key| < 2^31, index < SPAN <= 2^21): item j is
    before item i of the same line iff its composite is larger. One compare per pair,
    ties included."""
    return _order_key(x).to(tl.float64) * SPAN - j.to(tl.float64)


@triton.jit
def _positions_kernel(X, stride_line, stride_item, chunk_line, chunk_n, q_comp, out,
                      LENGTH: tl.constexpr, QB: tl.constexpr, LOG2_QB: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n = tl.load(chunk_n + pid)
    if n > 0:
        line = tl.load(chunk_line + pid).to(tl.int64)
        base = X + line * stride_line
        qc = q_comp + pid.to(tl.int64) * QB  # the chunk's query composites, ascending, +inf padded
        first = tl.load(qc + (QB // 2 - 1))  # every item's first probe
        offs = tl.arange(0, BLOCK)
        hist = tl.zeros([2 * QB], dtype=tl.int32)
        for j0 in range(0, LENGTH, BLOCK):
            j = j0 + offs
            cx = _composite(tl.load(base + j.to(tl.int64) * stride_item, mask=j < LENGTH, other=float("-inf")),
                            j, LENGTH + 1)
            # b = how many of the chunk's queries item j is before (composites below cx):
            # a branchless binary search, then one histogram bin per item.
            lo = tl.where(first < cx, QB // 2, 0)
            for s in tl.static_range(1, LOG2_QB):
                probe = tl.load(qc + lo + ((QB >> (s + 1)) - 1))
                lo = tl.where(probe < cx, lo + (QB >> (s + 1)), lo)
            hist += tl.histogram(lo + (tl.load(qc + lo) < cx).to(tl.int32), 2 * QB)
        # sorted query i is after every item with b > i
        above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0)
        r = tl.arange(0, 2 * QB)
        tl.store(out + pid.to(tl.int64) * QB + r, above.to(tl.int64), mask=r < n)


@triton.jit
def _target_counts_kernel(X, stride_line, stride_item, targets, out, n_lines,
                          LENGTH: tl.constexpr, BL: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    part = tl.program_id(1)
    lines = pid * BL + tl.arange(0, BL)
    lm = lines < n_lines
    row = X + lines.to(tl.int64) * stride_line
    t = tl.load(targets + lines, mask=lm, other=0).to(tl.int64)
    cq = _composite(tl.load(row + t * stride_item, mask=lm, other=0.0), t, LENGTH + 1)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BL, BLOCK], dtype=tl.int32)
    for jj in range(0, SPLIT, BLOCK):
        j = part * SPLIT + jj + offs
        x = tl.load(row[:, None] + j.to(tl.int64)[None, :] * stride_item, mask=lm[:, None] & (j < LENGTH)[None, :],
                    other=float("-inf"))
        acc += (_composite(x, j[None, :], LENGTH + 1) > cq[:, None]).to(tl.int32)
    tl.atomic_add(out + lines, tl.sum(acc, axis=1).to(tl.int64), mask=lm)


@triton.jit
def _topk_boundary_kernel(X, stride_line, stride_item, vals, idx,
                          K: tl.constexpr, KP: tl.constexpr, LENGTH: tl.constexpr, BLOCK: tl.constexpr):
    line = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, KP)
    kv = _order_key(tl.load(vals + line * (K + 1) + ks, mask=ks < K + 1, other=float("-inf")))
    thr = tl.sum(tl.where(ks == K - 1, kv, 0), axis=0)  # the k-th value
    nxt = tl.sum(tl.where(ks == K, kv, 0), axis=0)      # the (k+1)-th
    if nxt == thr:
        need = K - tl.sum(((kv > thr) & (ks < K)).to(tl.int32), axis=0)
        base = X + line * stride_line
        offs = tl.arange(0, BLOCK)
        taken = tl.full([], 0, tl.int32)  # equal items kept so far
        slot = tl.full([], 0, tl.int32)   # items written so far
        for j0 in range(0, LENGTH, BLOCK):
            j = j0 + offs
            kx = _order_key(tl.load(base + j.to(tl.int64) * stride_item, mask=j < LENGTH, other=float("-inf")))
            eq = (kx == thr).to(tl.int32)
            keep = (kx > thr) | ((eq == 1) & (taken + tl.cumsum(eq, axis=0) <= need))
            k32 = keep.to(tl.int32)
            pos = slot + tl.cumsum(k32, axis=0) - 1
            tl.store(idx + line * K + pos, j.to(tl.int64), mask=keep)
            taken += tl.sum(eq, axis=0)
            slot += tl.sum(k32, axis=0)


@triton.jit
def _fold_dots_kernel(X, stride_row, rows, cand, out, kc,
                      CB: tl.constexpr, E: tl.constexpr, E_PAD: tl.constexpr, LOG2: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * CB
    e = tl.arange(0, E_PAD)
    em = e < E
    t = tl.load(rows + r).to(tl.int64)
    xt = tl.load(X + t * stride_row + e, mask=em, other=0.0).to(tl.float64)
    for c in range(CB):
        if c0 + c < kc:
            u = tl.load(cand + r * kc + c0 + c).to(tl.int64)
            p = xt * tl.load(X + u * stride_row + e, mask=em, other=0.0).to(tl.float64)
            for _ in tl.static_range(LOG2):
                p = tl.sum(tl.reshape(p, [2, p.shape[0] // 2]), axis=0)  # p[:h] + p[h:]
            tl.store(out + r * kc + c0 + c, tl.sum(p, axis=0))


# ----------------------------------------------------------------------------- launchers


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def chunk_table(lines: torch.Tensor, n_lines: int, qb: int):
    """Group queries by line into chunks of at most ``qb``, on the device, static shapes.

    lines: (Q,) long line id of each query, sorted. Returns (chunk_line, chunk_n, slot):
    chunk_line, chunk_n (P,) long, P = ceil(Q / qb) + min(n_lines, Q) (a bound on the
    number of chunks known without reading the data; unused chunks have n = 0), and
    slot (Q,) long: where query q goes in a (P * qb) chunk-major table.
    """
    dev = lines.device
    Q = lines.numel()
    per_line = torch.zeros(n_lines, dtype=torch.long, device=dev).index_add_(0, lines, torch.ones_like(lines))
    line_start = torch.cumsum(per_line, 0) - per_line
    n_chunks = (per_line + qb - 1) // qb
    chunk_end = torch.cumsum(n_chunks, 0)
    P = -(-Q // qb) + min(n_lines, Q)
    p = torch.arange(P, device=dev)
    cl = torch.searchsorted(chunk_end, p, right=True).clamp_(max=n_lines - 1)
    first = line_start[cl] + (p - (chunk_end[cl] - n_chunks[cl])) * qb  # its first query
    cn = (torch.minimum(first + qb, line_start[cl] + per_line[cl]) - first).clamp_(min=0)
    cn = torch.where(p < chunk_end[-1], cn, 0)
    within = torch.arange(Q, device=dev) - line_start[lines]  # rank of each query in its line
    slot = ((chunk_end[lines] - n_chunks[lines]) + within // qb) * qb + within % qb
    return cl, cn, slot


def query_composites(X: torch.Tensor, lines: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """float64 composites of ``_composite`` for X[lines, items], computed with torch ops
    (the same integers, so the same bits as the kernel's)."""
    v = X[lines, items]
    if v.dtype == torch.bfloat16:
        bits = v.view(torch.int16).to(torch.int32) << 16
    else:
        bits = v.float().view(torch.int32)
    key = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    return key.double() * (X.shape[1] + 1) - items.double()


def count_positions(X: torch.Tensor, lines: torch.Tensor, items: torch.Tensor, *, block: int = None,
                    qb: int = None) -> torch.Tensor:
    """0-based position of ``items[q]`` in line ``lines[q]`` of X (R, L), any strides
    (rows with unit stride read fastest).

    lines, items: (Q,) long on X's device. Returns (Q,) long. X float32/16/bf16, finite.
    Queries are sorted by (line, composite) and cut into chunks of at most ``qb`` per
    line; each program streams its line once and bins every item by a binary search
    among its chunk: O(L log qb) per chunk instead of O(L qb) compares.
    """
    R, L = X.shape
    Q = lines.numel()
    out = torch.empty(Q, dtype=torch.long, device=X.device)
    if Q == 0:
        return out
    # at least 2: the first probe of a chunk is at QB // 2 - 1
    qb = max(2, qb or min(POSITIONS_QB_MAX, _pow2(-(-Q // R))))
    if qb & (qb - 1):
        raise ValueError(f"qb must be a power of two (the binary search halves it), got {qb}")
    block = block or min(POSITIONS_BLOCK, _pow2(L))
    comp = query_composites(X, lines, items)
    order = torch.sort(comp, stable=True).indices
    order = order.gather(0, torch.sort(lines[order], stable=True).indices)
    cl, cn, slot = chunk_table(lines[order], R, qb)
    table = torch.full((cl.numel() * qb,), float("inf"), dtype=torch.float64, device=X.device)
    table[slot] = comp[order]
    counts = torch.empty(cl.numel() * qb, dtype=torch.long, device=X.device)
    _positions_kernel[(cl.numel(),)](X, X.stride(0), X.stride(1), cl, cn, table, counts,
                                     LENGTH=L, QB=qb, LOG2_QB=qb.bit_length() - 1, BLOCK=block, num_warps=4)
    out[order] = counts[slot]
    return out


def count_targets(S: torch.Tensor, targets: torch.Tensor, axis: int) -> torch.Tensor:
    """0-based position of one target per line of S (N, M): rows (axis=1, targets (N,)
    text ids) or columns (axis=0, targets (M,) image ids), read in place. Returns long."""
    if axis == 1:
        n_lines, length, s_line, s_item = S.shape[0], S.shape[1], S.stride(0), S.stride(1)
    else:
        n_lines, length, s_line, s_item = S.shape[1], S.shape[0], S.stride(1), S.stride(0)
    bl, block, split = TARGETS_ROWS if axis == 1 else TARGETS_COLUMNS
    block = min(block, _pow2(length))
    split = max(block, -(-min(split, length) // block) * block)
    out = torch.zeros(n_lines, dtype=torch.long, device=S.device)
    grid = (triton.cdiv(n_lines, bl), triton.cdiv(length, split))
    _target_counts_kernel[grid](S, s_line, s_item, targets, out, n_lines,
                                LENGTH=length, BL=bl, BLOCK=block, SPLIT=split, num_warps=4)
    return out


def fix_topk_boundary(X: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, k: int, *, block: int = None) -> None:
    """Rewrite ``idx`` (R, k) for lines of X (R, L) whose top-k boundary is tied.

    vals: (R, k+1) the values of ``torch.topk(X, k + 1)`` (sorted). After the call,
    idx[r] holds, in index order, every item above the k-th value and the first
    equal ones by index; untied lines are left as they are.
    """
    R, L = X.shape
    block = block or min(BOUNDARY_BLOCK, _pow2(L))
    _topk_boundary_kernel[(R,)](X, X.stride(0), X.stride(1), vals.contiguous(), idx, K=k, KP=_pow2(k + 1), LENGTH=L,
                                BLOCK=block, num_warps=4)


def fold_dots(X: torch.Tensor, rows: torch.Tensor, cand: torch.Tensor, *, cb: int = 16) -> torch.Tensor:
    """float64 dot products of X[rows[r]] with X[cand[r, c]], X (M, E) float32 contiguous,
    rows (R,) and cand (R, kc) long: (R, kc) float64, the bits of
    ``fold_sum(X[rows, None].double() * X[cand].double())`` on any device."""
    R, kc = cand.shape
    E = X.shape[1]
    pad = _pow2(E)
    if pad > MAX_VECTOR:
        raise ValueError(f"fold_dots takes vectors of at most {MAX_VECTOR} values, got {E}")
    out = torch.empty(R, kc, dtype=torch.float64, device=X.device)
    if R and kc:
        _fold_dots_kernel[(R, triton.cdiv(kc, cb))](X, X.stride(0), rows, cand.contiguous(), out, kc, CB=cb, E=E,
                                                    E_PAD=pad, LOG2=pad.bit_length() - 1,
                                                    num_warps=4 if pad <= 2048 else 8)
    return out
