"""``backend="torch"``: spec §8's restructured algebra in batched PyTorch, the CPU fast path.

Readable twin of the Triton kernel. Per-item work (projections, Gram matrices, global
rows) is done by :func:`acf_fast.precompute.precompute_items`; per pair only
attention logits (H·K·L), the two softmaxes, the cosine numerators and the norms
a Γ aᵀ are computed, as big batched GEMMs over a chunk of images × texts:

    logits_i2t   (H, n·K, d) @ (H, d, m·L)        one GEMM for the whole chunk (and, with
                                                   z_x, z_y absent, the t2i logits are its transpose)
    ‖w*‖²        (m, n·K, H·L) @ Γw (m, H·L, H·L)  per text; block-diagonal Γ (acf-code): per
                                                   head, on strided views of the logits layout
    ‖v*‖²        (n, m·L, H·K) @ Γv (n, H·K, H·K)  per image, likewise

Loop order: images are precomputed once per *image block* (as many images as fit
in ``ITEM_BUDGET_BYTES``; for N up to a few thousand at D = 1024 that is all of
them, so once), texts once per (image block, text block of ``_TEXT_BLOCK``), never
per image chunk; each text block's pair grid is then walked in small pair chunks.

Memory: a pair chunk is sized for cache (``_CACHE_BYTES``: its logits tensor ~4 MiB)
and never over ``CHUNK_BUDGET_BYTES`` (512 MiB), estimated as ``_PAIR_TENSORS``
(H·K·L)-sized tensors plus a few D-vectors per pair; per-item tensors are bounded by
``ITEM_BUDGET_BYTES`` (1 GiB) for the image block plus the same for a text block
(full-Γ items: elem·((H·T)² + H·T·D + ...) bytes each, ~1.6 MB per image at K = 36,
D = 1024, H = 8). So any N and M run in bounded memory: S itself (N·M·4 bytes) is
the only output that grows with the grid.

Backward: plain autograd through the precompute; every pair chunk runs under
``torch.utils.checkpoint`` (non-reentrant) when gradients are needed, so the
backward recomputes that chunk's attention instead of storing per-pair tensors for
the whole grid: memory in training is one chunk's activations at a time.

Arithmetic is float32 (float64 for float64 inputs); the output is float32 (float64
for float64 inputs).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from .notation import EPS, cosine_from_squares
from .precompute import ItemSide, compute_dtype, precompute_items

CHUNK_BUDGET_BYTES = 512 * 2**20
ITEM_BUDGET_BYTES = 1024 * 2**20
# Live (H·K·L)-sized tensors per pair at the peak of a chunk, both directions
# (logits, two softmaxes, numerator products, permuted copies, Γ products), with room
# for the autograd-saved ones when the chunk is recomputed in the backward.
_PAIR_TENSORS = 16
# Speed, not memory, sets the usual chunk: the chunk's (H, n·K, m·L) logits are sized
# to stay in cache (~4 MiB; 2-core EPYC, 2 MiB L2 + 32 MiB L3). At K = 36, L = 32, H = 8
# that is ~110 pairs, e.g. 13 images × 8 texts; 64×64 chunks ran 1.5-4× slower there.
_CACHE_BYTES = 4 * 2**20
_PAIR_TEXTS = 8
# Texts precomputed together (one (m·L, D) x (D, D) GEMM each); bounded by ITEM_BUDGET_BYTES too.
_TEXT_BLOCK = 64


def _pair_bytes(K: int, L: int, D: int, H: int, elem: int) -> int:
    """Bytes one (image, text) pair of a pair chunk holds at its peak."""
    return elem * (_PAIR_TENSORS * H * K * L + 8 * D + 8 * (K + L))


def _chunk_shape(N: int, M: int, K: int, L: int, D: int, H: int, elem: int,
                 device_type: str = "cpu") -> tuple[int, int]:
    """(images, texts) per pair chunk, never over CHUNK_BUDGET_BYTES.

    On CPU the chunk is cache-sized (``_CACHE_BYTES``); on a GPU (where this backend
    serves as the kernels' reference) cache blocking buys nothing and launch counts
    matter, so the chunk fills the memory budget, roughly square in pairs.
    """
    pairs = max(1, CHUNK_BUDGET_BYTES // _pair_bytes(K, L, D, H, elem))
    if device_type == "cpu":
        pairs = max(1, min(pairs, _CACHE_BYTES // (elem * H * K * L)))
        m = max(1, min(M, _PAIR_TEXTS, pairs))
    else:
        m = max(1, min(M, math.isqrt(pairs)))
    n = max(1, min(N, pairs // m))
    return n, m


def _item_bytes(T: int, D: int, H: int, elem: int, pairwise: bool) -> int:
    """Bytes of one item's precompute (full Γ, Q/Kk/O, norms, global rows)."""
    d = D // H
    return elem * ((H * T) ** 2 + 3 * H * T * d + T + (H * T * D + D if pairwise else 0))


def _image_block(N: int, K: int, D: int, H: int, elem: int, pairwise: bool) -> int:
    return max(1, min(N, ITEM_BUDGET_BYTES // _item_bytes(K, D, H, elem, pairwise)))


def _text_block(M: int, L: int, D: int, H: int, elem: int, pairwise: bool) -> int:
    return max(1, min(M, _TEXT_BLOCK, ITEM_BUDGET_BYTES // _item_bytes(L, D, H, elem, pairwise)))


def _quad_i2t(A: torch.Tensor, gram: torch.Tensor, block_diagonal: bool) -> torch.Tensor:
    """‖w*‖² = a Γw aᵀ for every (image, region, text). A (H, n, K, m, L) -> (m, n·K).

    gram: per text (m, H·L, H·L), or block-diagonal (m, H, L, L).
    """
    H, n, K, m, L = A.shape
    if block_diagonal:
        # Per head, A[h] seen as (m, n·K, L) is a strided view (no copy) that BLAS reads directly.
        sq = None
        for h in range(H):
            a = A[h].permute(2, 0, 1, 3).reshape(m, n * K, L)
            part = torch.linalg.vecdot(torch.bmm(a, gram[:, h]), a)
            sq = part if sq is None else sq + part
        return sq
    a = A.permute(3, 1, 2, 0, 4).reshape(m, n * K, H * L)
    return torch.linalg.vecdot(torch.bmm(a, gram), a)


def _quad_t2i(B: torch.Tensor, gram: torch.Tensor, block_diagonal: bool) -> torch.Tensor:
    """‖v*‖² = b Γv bᵀ for every (text, word, image). B (H, m, L, n, K), any strides -> (n, m·L).

    gram: per image (n, H·K, H·K), or block-diagonal (n, H, K, K).
    """
    H, m, L, n, K = B.shape
    if block_diagonal:
        sq = None
        for h in range(H):
            b = B[h].permute(2, 0, 1, 3).reshape(n, m * L, K)
            part = torch.linalg.vecdot(torch.bmm(b, gram[:, h]), b)
            sq = part if sq is None else sq + part
        return sq
    b = B.permute(3, 1, 2, 0, 4).reshape(n, m * L, H * K)
    return torch.linalg.vecdot(torch.bmm(b, gram), b)


def _pair_chunk(img: ItemSide, txt: ItemSide, s_i2t: float, s_t2i: float, u1: float, u2: float,
                emb_i: Optional[torch.Tensor], emb_t: Optional[torch.Tensor], eps: float = EPS) -> torch.Tensor:
    """S for n images × m texts from their precomputes. Returns (n, m) in the compute dtype.
    ``eps``: the cosines' clamp for these (possibly rescaled, see :func:`magnitude_scales`) items."""
    n, H, K, d = img.Q.shape
    m, _, L, _ = txt.Q.shape
    dt = img.Q.dtype
    neg_inf = torch.tensor(float("-inf"), dtype=dt, device=img.Q.device)
    zero = torch.zeros((), dtype=dt, device=img.Q.device)
    wbias = torch.where(txt.mask, zero, neg_inf)  # (m, L)
    vbias = torch.where(img.mask, zero, neg_inf)  # (n, K)
    vmf = img.mask.to(dt)
    wmf = txt.mask.to(dt)
    vw = vmf / vmf.sum(1, keepdim=True)  # (n, K) weights of the mean over valid regions
    ww = wmf / wmf.sum(1, keepdim=True)  # (m, L)

    def heads_rows(x):  # (b, H, T, d) -> (H, b*T, d)
        return x.transpose(0, 1).reshape(H, -1, d)

    def heads_cols(x):  # (b, H, T, d) -> (H, d, b*T)
        return x.permute(1, 3, 0, 2).reshape(H, d, -1)

    # ---- regions attend to words: A (H, n, K, m, L), softmax over the text's valid words
    Kw_cols = heads_cols(txt.Kk)
    raw_i2t = torch.bmm(heads_rows(img.Q), Kw_cols).view(H, n, K, m, L)
    A = torch.softmax(torch.add(wbias, raw_i2t, alpha=s_i2t), dim=-1)
    E_i2t = raw_i2t if img.o_is_q else torch.bmm(heads_rows(img.O), Kw_cols).view(H, n, K, m, L)
    num_i2t = torch.linalg.vecdot(A, E_i2t).sum(0)  # (n, K, m)
    sq_w = _quad_i2t(A, txt.gram, txt.block_diagonal).view(m, n, K).permute(1, 2, 0)  # (n, K, m)
    cos_i2t = cosine_from_squares(num_i2t, (img.norm ** 2)[:, :, None], sq_w, eps)
    local_i2t = (cos_i2t * vw[:, :, None]).sum(1)  # (n, m)

    # ---- words attend to regions: B seen as (H, m, L, n, K), softmax over the image's valid regions
    if img.shared_qk and txt.shared_qk:
        # z_x, z_y absent: Qw·Kv is the transpose of Qv·Kw, no second GEMM. The softmax runs
        # over dim 2 of the stored (H, n, K, m, L) layout (fast), then is viewed as (H, m, L, n, K).
        B = torch.softmax(torch.add(vbias[:, :, None, None], raw_i2t, alpha=s_t2i), dim=2).permute(0, 3, 4, 1, 2)
        raw_t2i = raw_i2t.permute(0, 3, 4, 1, 2)
    else:
        raw_t2i = torch.bmm(heads_rows(txt.Q), heads_cols(img.Kk)).view(H, m, L, n, K)
        B = torch.softmax(torch.add(vbias, raw_t2i, alpha=s_t2i), dim=-1)
    if txt.o_is_q:
        E_t2i = raw_t2i
    else:
        E_t2i = torch.bmm(heads_rows(txt.O), heads_cols(img.Kk)).view(H, m, L, n, K)
    num_t2i = torch.linalg.vecdot(B, E_t2i).sum(0)  # (m, L, n)
    sq_v = _quad_t2i(B, img.gram, img.block_diagonal).view(n, m, L).permute(1, 2, 0)  # (m, L, n)
    cos_t2i = cosine_from_squares(num_t2i, (txt.norm ** 2)[:, :, None], sq_v, eps)
    local_t2i = (cos_t2i * ww[:, :, None]).sum(1).T  # (n, m)

    local = u1 * local_i2t + (1 - u1) * local_t2i
    if img.Pglob is not None:
        abar = torch.einsum("hnkml,nk->mnhl", A, vw).reshape(m, n, H * L)
        Wg = torch.bmm(abar, txt.Pglob).transpose(0, 1)  # (n, m, D)
        bbar = torch.einsum("hmlnk,ml->nmhk", B, ww).reshape(n, m, H * K)
        Vg = torch.bmm(bbar, img.Pglob) + img.gx[:, None, :]  # (n, m, D)
        glob = cosine_from_squares(torch.linalg.vecdot(Vg, Wg), torch.linalg.vecdot(Vg, Vg),
                                   torch.linalg.vecdot(Wg, Wg), eps)
    elif emb_i is not None:
        glob = emb_i @ emb_t.T
    else:
        return local
    return u2 * local + (1 - u2) * glob


def _power_of_two_above(x: torch.Tensor) -> float:
    """The smallest power of two >= the scalar x (> 1), as a Python float; 1.0 for x <= 1."""
    x = float(x)
    if not x > 1.0:
        return 1.0
    m, e = math.frexp(x)  # x = m 2^e, m in [0.5, 1)
    return math.ldexp(1.0, e - 1 if m == 0.5 else e)


def magnitude_scales(V, v_mask, W, w_mask, G):
    """(c_v, c_w): powers of two >= the largest |entry| of V's valid rows (and G) and of
    W's valid rows, 1.0 where that is <= 1.

    Why: ‖x‖² and the Gram quadratic forms overflow float32 once entries pass ~1e18
    (V scaled to 1e20 gave NaN). S is unchanged when V and G are divided by c_v and W
    by c_w, the softmax scales multiplied by c_v c_w (the logits are bilinear in V and
    W) and the cosines' clamp divided by c_v c_w (every cosine pairs a V-side vector
    with a W-side one); the numerators and norms then stay near unit scale. Powers of
    two divide exactly, so inputs already within [-1, 1] are untouched bit for bit.
    """
    def top(x, mask):
        a = x.detach().abs().amax(-1)
        return (a if mask is None else a.masked_fill(~mask, 0)).max()

    c_v = top(V, v_mask)
    if G is not None:
        c_v = torch.maximum(c_v, G.detach().abs().max())
    return _power_of_two_above(c_v), _power_of_two_above(top(W, w_mask))


def torch_similarity(V, v_mask, W, w_mask, *, heads, scale, u1, u2, weights, G, global_emb):
    """Spec §3 through §8's algebra; same contract as ``eager_similarity`` (inputs validated).

    Args:
        V: (N, K, D) float16/bfloat16/float32/float64; v_mask: (N, K) bool or None.
        W: (M, L, D) same dtype; w_mask: (M, L) bool or None.
        heads, scale=(s_i2t, s_t2i), u1, u2: spec §3.
        weights: dict of z_x z_y z_o x_w x_v x_g (D, D), gate (D,); absent = identity / 0.
        G: (N, D) -> pairwise global score; global_emb: (Gi (N, E), Gt (M, E)) -> Gi·Gtᵀ.

    Returns:
        S (N, M): float32, or float64 for float64 inputs. Differentiable in every input
        and weight; chunks are checkpointed (see the module docstring).

    Threads: on CPU without gradients and with ``torch.get_num_threads() > 1``, text
    blocks are spread over that many Python threads, each running single-threaded
    ops (torch's intra-op threads are set to 1 for the call and restored after).
    The chunks' ops are small, and an OpenMP barrier per small op made two intra-op
    threads 3-4× SLOWER than one on a busy 2-core machine; whole blocks per thread
    need no barrier. Results agree to float32 rounding either way (the blocks
    differ, so BLAS may sum in another order).
    """
    return with_magnitude_scaling(_torch_similarity, V, v_mask, W, w_mask, heads=heads, scale=scale, u1=u1, u2=u2,
                                  weights=weights, G=G, global_emb=global_emb)


def with_magnitude_scaling(inner, V, v_mask, W, w_mask, *, scale, G, **kwargs):
    """``inner(V, v_mask, W, w_mask, scale=, G=, eps=, **kwargs)`` on unit-scale inputs.

    Large inputs are divided by :func:`magnitude_scales` (exact powers of two) with the
    softmax scales and the cosines' clamp adjusted, so the result is unchanged; a result
    that is not finite is an overflow, refused with a ValueError. Shared by the torch
    grid (:func:`torch_similarity`), its pair list (:mod:`acf_fast.pairs`) and the Triton
    tiles (``kernels/similarity.py``), so all of them score huge finite features the same way.
    """
    c_v, c_w = magnitude_scales(V, v_mask, W, w_mask, G)
    if c_v != 1.0 or c_w != 1.0:  # large inputs: the same S from unit-scale numbers (see magnitude_scales)
        cdt = compute_dtype(V.dtype)  # divided in the compute dtype: no fp16/bf16 subnormals
        V, W = V.to(cdt) / c_v, W.to(cdt) / c_w
        G = None if G is None else G.to(cdt) / c_v
        scale = (scale[0] * c_v * c_w, scale[1] * c_v * c_w)
    overflow = ValueError(
        f"the attention logits overflow: V (and G) reach |x| ~ {c_v:.3g} and W |x| ~ {c_w:.3g}, so the logits "
        f"(~ scale x {c_v * c_w:.3g}) exceed the float range of the computation; scale the features down (the "
        "model's l2-normalised features are at most 1)")
    if max(abs(scale[0]), abs(scale[1])) > torch.finfo(compute_dtype(V.dtype)).max:
        raise overflow
    S = inner(V, v_mask, W, w_mask, scale=scale, G=G, eps=EPS / (c_v * c_w), **kwargs)
    if not bool(torch.isfinite(S.detach()).all()):
        raise overflow
    return S


def run_setup(V, W, G, global_emb, weights):
    """What every torch-backend run (the grid here, ``pairs._torch_pairs``) derives first:
    (compute dtype, its bytes per element, Gi and Gt in it (or None), whether autograd
    needs a graph through any input or weight)."""
    cdt = compute_dtype(V.dtype)
    emb_i = emb_t = None
    if global_emb is not None:
        emb_i, emb_t = (g.to(cdt) for g in global_emb)
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (V, W, G, emb_i, emb_t, *(weights or {}).values())
    )
    return cdt, torch.finfo(cdt).bits // 8, emb_i, emb_t, need_grad


def _torch_similarity(V, v_mask, W, w_mask, *, heads, scale, u1, u2, weights, G, global_emb, eps):
    cdt, elem, emb_i, emb_t, need_grad = run_setup(V, W, G, global_emb, weights)
    N, K, D = V.shape
    M, L, _ = W.shape
    H = heads
    pairwise = G is not None
    n_c, m_c = _chunk_shape(N, M, K, L, D, H, elem, V.device.type)
    i_block = _image_block(N, K, D, H, elem, pairwise)
    t_block = max(_text_block(M, L, D, H, elem, pairwise), min(m_c, M))
    workers = torch.get_num_threads() if (V.device.type == "cpu" and not need_grad) else 1
    workers = max(1, min(workers, -(-M // max(1, min(m_c, M)))))
    if workers > 1:
        # at least one text block per worker, in whole pair chunks
        t_block = min(t_block, max(m_c, -(-M // workers) // m_c * m_c))

    def text_block(img_parts, j0, j1):
        """Scores of the image block (a list of (offset, ItemSide) parts) against texts j0:j1."""
        txts = precompute_items(W[j0:j1], None if w_mask is None else w_mask[j0:j1], weights, H,
                                role="text", pairwise_global=pairwise)
        cols = []
        for b0 in range(0, j1 - j0, m_c):
            b1 = min(j1 - j0, b0 + m_c)
            txt = txts.select(slice(b0, b1))
            et = None if emb_t is None else emb_t[j0 + b0:j0 + b1]
            parts = []
            for off, imgs in img_parts:
                for a0 in range(0, imgs.n, n_c):
                    a1 = min(imgs.n, a0 + n_c)
                    img = imgs.select(slice(a0, a1))
                    ei = None if emb_i is None else emb_i[off + a0:off + a1]
                    if need_grad:
                        parts.append(checkpoint(_pair_chunk, img, txt, scale[0], scale[1], u1, u2, ei, et, eps,
                                                use_reentrant=False))
                    else:
                        parts.append(_pair_chunk(img, txt, scale[0], scale[1], u1, u2, ei, et, eps))
            cols.append(torch.cat(parts, dim=0))
        return torch.cat(cols, dim=1)

    def image_part(i0, i1):
        return i0, precompute_items(V[i0:i1], None if v_mask is None else v_mask[i0:i1], weights, H,
                                    role="image", G=None if G is None else G[i0:i1])

    if workers == 1:
        rows = []
        for i0 in range(0, N, i_block):
            parts = [image_part(i0, min(N, i0 + i_block))]
            rows.append(torch.cat([text_block(parts, j0, min(M, j0 + t_block)) for j0 in range(0, M, t_block)], dim=1))
        return torch.cat(rows, dim=0)

    with single_threaded_pool(workers) as pool:
        rows = []
        for i0 in range(0, N, i_block):
            i1 = min(N, i0 + i_block)
            step = -(-(i1 - i0) // workers)
            parts = list(pool.map(without_grad(lambda a: image_part(a, min(i1, a + step))), range(i0, i1, step)))
            cols = list(pool.map(without_grad(lambda j0: text_block(parts, j0, min(M, j0 + t_block))),
                                 range(0, M, t_block)))
            rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)


def without_grad(fn):
    """``fn`` run under torch.no_grad() in whatever thread calls it. Grad mode is
    thread-local and pool threads start with it ON: without this, weights that require
    grad (a model's parameters) would build an autograd graph per pair chunk in the
    workers and hold every chunk's tensors alive."""
    def run(*args):
        with torch.no_grad():
            return fn(*args)
    return run


@contextmanager
def single_threaded_pool(workers: int):
    """A pool of ``workers`` Python threads, torch's intra-op threads set to 1 while it
    lives (whole blocks per thread, never an OpenMP barrier per small op: see
    :func:`torch_similarity`'s docstring); shared by the grid and ``pairs._torch_pairs``."""
    from concurrent.futures import ThreadPoolExecutor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)
