"""``acf_similarity_pairs``: ACF scores of an arbitrary list of (image, text) pairs.

    s = acf_similarity_pairs(V, v_mask, W, w_mask, pairs, heads=8, scale=None, u1=0.5, u2=0.8,
                             weights=None, G=None, global_emb=None, backend="auto")   # (P,)

``s[p] == acf_similarity(V, v_mask, W, w_mask, ...)[pairs[p, 0], pairs[p, 1]]`` under the
same spec §9 contract (float32: |Δ| ≤ 1e-4 from the float64 reference), with the same
keyword arguments and the same input checks (:func:`acf_fast.validate.check_similarity_inputs`),
plus the pair list's own. It is what a two-stage evaluation (``acf_fast.shortlist``)
needs: a cheap score shortlists candidates, ACF re-scores only those.

No new formula lives here: every backend reuses its grid code on the pairs' items.

- ``eager``: pairs grouped by text, each text's images through
  :func:`acf_fast.eager.eager_similarity` (its own per-text loop, on the gathered images).
- ``torch``: the per-item precompute (:func:`acf_fast.precompute.precompute_items`) of
  only the images and texts the pairs name, once each (per memory block, as the grid
  does), then pairs grouped by image: one :func:`acf_fast.fused_torch._pair_chunk` of
  1 image × its texts per call (chunked to the grid's memory budget). Huge finite
  features are rescaled exactly as the grid does (``fused_torch.with_magnitude_scaling``).
  Differentiable (chunks checkpointed when gradients are needed).
- ``triton``: kernel v1 (``acf_fast.kernels.pair_v1``), whose program already scores
  exactly one (image, text) pair; its list variant reads (i, j) from ``pairs`` instead
  of from the program id, so a pair list costs what its pairs cost. The tile kernel
  (v2) scores dense blocks of 3 images × 8 texts, so a sparse list would waste most of
  each tile (and ``kernels/tiles.py`` stays untouched). Limits are v1's: K ≤ 64
  regions, L ≤ 128 tokens, head width D / heads a power of two ≥ 16; forward only
  (gradients: use ``torch``).
- ``auto``: triton on CUDA tensors, torch on CPU.

Returns float32 (float64 for float64 inputs with ``eager`` / ``torch``, like the grid).
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import torch

from .similarity import _check_magnitudes, checked_call

__all__ = ["acf_similarity_pairs", "check_pairs"]


def check_pairs(pairs, N: int, M: int, device) -> torch.Tensor:
    """``pairs`` checked: (P, 2) int64 on ``device``, 0 ≤ pairs[:, 0] < N, 0 ≤ pairs[:, 1] < M.

    P = 0 is allowed (an empty list scores to an empty tensor). Any other shape, a
    float or bool dtype, another device, or an index out of range is a ValueError
    naming ``pairs`` (and the first offending row).
    """
    if not isinstance(pairs, torch.Tensor):
        raise ValueError(f"pairs must be a (P, 2) int64 torch.Tensor of (image, text) indices, got "
                         f"{type(pairs).__name__}")
    if pairs.dim() != 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must have shape (P, 2) (image index, text index), got {tuple(pairs.shape)}")
    if pairs.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"pairs must hold integer indices (int64), got {pairs.dtype}")
    if pairs.device != torch.device(device):
        raise ValueError(f"pairs is on {pairs.device} but the features are on {device}")
    pairs = pairs.to(torch.int64)
    for col, n, what in ((0, N, "image index (V has N"), (1, M, "text index (W has M")):
        bad = (pairs[:, col] < 0) | (pairs[:, col] >= n)
        if pairs.shape[0] and bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"pairs[{row}, {col}] = {int(pairs[row, col])} is not a valid {what} = {n} items, "
                             f"so it must lie in [0, {n}))")
    return pairs


def acf_similarity_pairs(
    V: torch.Tensor,
    v_mask: Optional[torch.Tensor],
    W: torch.Tensor,
    w_mask: Optional[torch.Tensor],
    pairs: torch.Tensor,
    *,
    heads: int = 8,
    scale: Optional[Tuple[float, float]] = None,
    u1: float = 0.5,
    u2: float = 0.8,
    weights: Optional[Mapping[str, torch.Tensor]] = None,
    G: Optional[torch.Tensor] = None,
    global_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """ACF score of each (image, text) pair of ``pairs`` (spec §3).

    Args:
        V, v_mask, W, w_mask, heads, scale, u1, u2, weights, G, global_emb, backend:
            exactly as :func:`acf_fast.acf_similarity` (V (N, K, D), W (M, L, D), masks
            (N, K) / (M, L) bool or None, G (N, D), global_emb (Gi (N, E), Gt (M, E))).
        pairs: (P, 2) integer tensor on V's device, rows (image index, text index);
            duplicates are fine, P = 0 gives an empty result.

    Returns:
        (P,) with ``out[p] = S[pairs[p, 0], pairs[p, 1]]`` of the grid: float32 (float64
        for float64 inputs on ``eager`` and ``torch``).
    """
    v_mask, w_mask, backend, kwargs = checked_call(V, v_mask, W, w_mask, heads=heads, scale=scale, u1=u1, u2=u2,
                                                   weights=weights, G=G, global_emb=global_emb, backend=backend)
    pairs = check_pairs(pairs, V.shape[0], W.shape[0], V.device)
    if backend != "torch" and V.dtype != torch.float64:  # kernel v1's pair list does not rescale
        _check_magnitudes(V, v_mask, W, w_mask, G, backend)
    if backend == "eager":
        return _eager_pairs(V, v_mask, W, w_mask, pairs, **kwargs)
    if backend == "torch":
        from .fused_torch import with_magnitude_scaling

        return with_magnitude_scaling(_torch_pairs, V, v_mask, W, w_mask, pairs=pairs, **kwargs)
    return _triton_pairs(V, v_mask, W, w_mask, pairs, **kwargs)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _take(t: Optional[torch.Tensor], idx) -> Optional[torch.Tensor]:
    return None if t is None else t[idx]


def _grouped(first: torch.Tensor, second: torch.Tensor, n_second: int):
    """Pairs sorted by (first, second): (order (P,), values of ``first`` per group,
    start offsets, stop offsets), groups = runs of equal ``first``."""
    order = torch.argsort(first * n_second + second, stable=True)
    keys, counts = torch.unique_consecutive(first[order], return_counts=True)
    stops = torch.cumsum(counts, 0)
    return order, keys.tolist(), (stops - counts).tolist(), stops.tolist()


def _scatter_back(order: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values[k] belongs to pair order[k]: the (P,) result in the caller's order (differentiable)."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return values[inverse]


# --------------------------------------------------------------------------- eager


def _eager_pairs(V, v_mask, W, w_mask, pairs, *, heads, scale, u1, u2, weights, G, global_emb):
    """Grouped by text: each text against its images, by the eager backend's own loop."""
    from .eager import eager_similarity

    P = pairs.shape[0]
    if P == 0:
        return torch.empty(0, dtype=_out_dtype(V.dtype), device=V.device)
    N = V.shape[0]
    order, texts, starts, stops = _grouped(pairs[:, 1], pairs[:, 0], N)
    img_sorted = pairs[order, 0]
    parts = []
    for j, a, b in zip(texts, starts, stops):
        ii = img_sorted[a:b]
        ge = None if global_emb is None else (global_emb[0][ii], global_emb[1][j:j + 1])
        s = eager_similarity(V[ii], _take(v_mask, ii), W[j:j + 1], None if w_mask is None else w_mask[j:j + 1],
                             heads=heads, scale=scale, u1=u1, u2=u2, weights=weights, G=_take(G, ii), global_emb=ge)
        parts.append(s[:, 0])
    return _scatter_back(order, torch.cat(parts))


# --------------------------------------------------------------------------- torch


def _valid_prefix(X: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Drop trailing rows that no item of X (n, T, D) has valid: they never count, and the
    per-pair cost grows with T (and T²)."""
    if mask is None:
        return X, None
    T = int(mask.any(0).nonzero().max()) + 1
    return X[:, :T], mask[:, :T]


def _texts_per_call(K: int, L: int, D: int, H: int, elem: int, device_type: str) -> int:
    """Texts scored against one image per ``_pair_chunk`` call: the grid's per-chunk memory
    budget, and on a CPU its cache-sized logits (never below the grid's 8 texts)."""
    from .fused_torch import _CACHE_BYTES, _PAIR_TEXTS, CHUNK_BUDGET_BYTES, _pair_bytes

    m = max(1, CHUNK_BUDGET_BYTES // _pair_bytes(K, L, D, H, elem))
    if device_type == "cpu":
        m = min(m, max(_PAIR_TEXTS, _CACHE_BYTES // (elem * H * K * L)))
    return m


def _torch_pairs(V, v_mask, W, w_mask, *, pairs, heads, scale, u1, u2, weights, G, global_emb, eps):
    """The torch backend on a pair list (inputs validated, already at unit scale).

    Blocks of images × texts bounded like the grid's (``fused_torch.ITEM_BUDGET_BYTES``
    each); in a block, only the items the pairs name are precomputed, then each image
    meets its texts in ``_pair_chunk`` calls of 1 × m.
    """
    from torch.utils.checkpoint import checkpoint

    from .fused_torch import _image_block, _pair_chunk, _text_block, run_setup, single_threaded_pool, without_grad
    from .precompute import precompute_items

    cdt, elem, emb_i, emb_t, need_grad = run_setup(V, W, G, global_emb, weights)
    P = pairs.shape[0]
    if P == 0:
        return torch.empty(0, dtype=cdt, device=V.device)
    N, K, D = V.shape
    M, L, _ = W.shape
    H = heads
    pairwise = G is not None
    i_block = _image_block(N, K, D, H, elem, pairwise)
    # the grid's text blocks: on length-sorted texts (the shortlist's) a block is a length
    # band, which _valid_prefix trims
    t_block = _text_block(M, L, D, H, elem, pairwise)
    # One key orders pairs by (image block, text block, image, text): every block's pairs
    # are one run, and inside it every image's texts are one run.
    i_all, j_all = pairs[:, 0], pairs[:, 1]
    n_tb = -(-M // t_block)
    cell = (i_all // i_block) * n_tb + j_all // t_block
    order = torch.argsort((cell * N + i_all) * M + j_all, stable=True)
    cells, counts = torch.unique_consecutive(cell[order], return_counts=True)
    # CPU without gradients: the grid's threading (fused_torch.torch_similarity's docstring):
    # whole runs of calls per Python thread, each op single-threaded, never an OpenMP
    # barrier per small op (which made this path ~8x slower on the busy 2-core machine).
    workers = torch.get_num_threads() if (V.device.type == "cpu" and not need_grad) else 1

    def run_calls(calls):
        """``calls``: (item side of one image, its emb_i row, text side, local text ids, their global ids);
        the texts are gathered here, one call at a time (a whole cell's would be P_cell items)."""
        out = []
        for img, ei, txts, idx, gidx in calls:
            txt = txts.select(idx)
            et = None if emb_t is None else emb_t[gidx]
            if need_grad:
                out.append(checkpoint(_pair_chunk, img, txt, scale[0], scale[1], u1, u2, ei, et, eps,
                                      use_reentrant=False)[0])
            else:
                out.append(_pair_chunk(img, txt, scale[0], scale[1], u1, u2, ei, et, eps)[0])
        return out

    values = []
    stop = 0
    for c, count in zip(cells.tolist(), counts.tolist()):
        start, stop = stop, stop + count
        sel = order[start:stop]
        ui, li = torch.unique(i_all[sel], return_inverse=True)  # sorted: li is non-decreasing here
        uj, lj = torch.unique(j_all[sel], return_inverse=True)
        Vb, vmb = _valid_prefix(V[ui], _take(v_mask, ui))
        Wb, wmb = _valid_prefix(W[uj], _take(w_mask, uj))
        imgs = precompute_items(Vb, vmb, weights, H, role="image", G=_take(G, ui))
        txts = precompute_items(Wb, wmb, weights, H, role="text", pairwise_global=pairwise)
        m_c = _texts_per_call(Vb.shape[1], Wb.shape[1], D, H, elem, V.device.type)
        firsts, runs = torch.unique_consecutive(li, return_counts=True)
        calls, offset = [], 0
        for a, run in zip(firsts.tolist(), runs.tolist()):
            img = imgs.select(slice(a, a + 1))
            ei = None if emb_i is None else emb_i[ui[a:a + 1]]
            for b0 in range(offset, offset + run, m_c):
                idx = lj[b0:min(offset + run, b0 + m_c)]
                calls.append((img, ei, txts, idx, uj[idx]))
            offset += run
        if workers == 1 or len(calls) == 1:
            values += run_calls(calls)
            continue
        step = -(-len(calls) // workers)
        with single_threaded_pool(workers) as pool:
            for part in pool.map(without_grad(run_calls), [calls[a:a + step] for a in range(0, len(calls), step)]):
                values += part
    return _scatter_back(order, torch.cat(values))


# --------------------------------------------------------------------------- triton


def _triton_pairs(V, v_mask, W, w_mask, pairs, *, heads, scale, u1, u2, weights, G, global_emb):
    """Kernel v1's list launch on the items the pairs name (precomputed once each)."""
    import os

    from .kernels import pair_v1

    if not V.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before import); "
                         "use backend='torch' on CPU")
    pair_v1.check_kernel_limits(V.shape[1], W.shape[1], V.shape[2], heads)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (V, W, G, *(global_emb or ()), *(weights or {}).values())
    ):
        raise ValueError("acf_similarity_pairs(backend='triton') is forward only; for gradients use "
                         "backend='torch' (or call it under torch.no_grad())")
    P = pairs.shape[0]
    out = torch.empty(P, dtype=torch.float32, device=V.device)
    if P == 0:
        return out
    ui, li = torch.unique(pairs[:, 0], return_inverse=True)
    uj, lj = torch.unique(pairs[:, 1], return_inverse=True)
    img, txt = pair_v1.prepare_sides(V[ui], _take(v_mask, ui), W[uj], _take(w_mask, uj), heads=heads,
                                     weights=weights, G=_take(G, ui))
    ge = None if global_emb is None else (global_emb[0][ui], global_emb[1][uj])
    # Sorted by image, then text: consecutive programs share an image (it stays in cache).
    local = torch.stack([li, lj], dim=1)
    order = torch.argsort(li * uj.numel() + lj, stable=True)
    scored = torch.empty(P, dtype=torch.float32, device=V.device)
    pair_v1.launch_pairs(img, txt, local[order].contiguous(), scored, scale=scale, u1=u1, u2=u2, global_emb=ge)
    out[order] = scored
    return out
