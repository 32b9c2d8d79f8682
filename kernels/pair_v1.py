"""Kernel v1: one program per (image, text) pair (the first Triton kernel of acf-fast).

Superseded by the tiles of ``kernels/tiles.py`` (kernel v2), which ``backend="triton"``
uses. v1 stays only so that ``bench/gpu_check.py`` and ``bench/kernel_report.py`` can
measure old and new side by side until v2 has been measured on a GPU (issue 10); it is
not reachable through ``acf_similarity``. Entry points: :func:`prepare_sides`,
:func:`launch_similarity`. Its list variant, :func:`launch_pairs` (kernel
``_acf_pair_list_kernel``: the same per-pair body, ``_pair_score``, with (i, j) read
from a pair list), is the triton backend of ``acf_fast.pairs.acf_similarity_pairs``.

What one program does
---------------------
One program scores one (image i, text j) pair and writes the single float S[i, j];
nothing else of the pair ever reaches memory. Programs are ordered in groups of
``GROUP_N`` images (the matmul "swizzle"): consecutive programs walk a few images
against every text, so those images stay in L2 while texts stream past.

For each direction (regions -> words with s_i2t, then words -> regions with s_t2i),
a loop over heads h:

    raw  = Q_h Kk'_hᵀ                           (Tq, Tk)   tl.dot, fp32 accumulate
    A    = softmax over valid keys of s·raw     fp32
    num += Σ_t' A ⊙ (O_h Kk'_hᵀ)                 (= Σ A ⊙ raw when ``O is Q``: acf-code)
    ‖x*‖²: block-diagonal Γ (z_o absent):  += Σ_t' (A Γ'_hh) ⊙ A        (Tq, Tk)·(Tk, Tk)
           full Γ (paper):                  c += A C'_h, ‖x*‖² = ‖c‖²    (Tq, Tk)·(Tk, R)
    ā_h  = mean over valid queries of A       (pairwise global only)

then cos_t = num / max(‖x_t‖ ‖x*_t‖, 1e-8) and the mean over valid query rows.
Query rows go through this loop in blocks (``KB``/``LB`` rows, sized so the (rows, R)
accumulator stays near ``_REG_TILE`` fp32 values); the softmax is per query row, so
blocks are independent.

The full Gram matrix Γ' (H·T × H·T) of the partner is used through a factor C' with
C' C'ᵀ = Γ' (a Cholesky factor computed once per item in float64, see
:func:`gram_factor`): then ‖x*_t‖² = a_t Γ' a_tᵀ = ‖Σ_h A_h[t] C'_h‖², which a head
loop can accumulate in one (Tq, R) register tile. Using Γ' itself would need all H
attention blocks of a row at once (a_t Γ' a_tᵀ mixes heads), i.e. H accumulators or
recomputing every head H times. The multiply-adds are the spec §8 count K·(HL)² +
L·(HK)² either way (R = H·T).

Pairwise global (paper eqs. 7–12, 14): after both directions, with ā (H, L) and
b̄ (H, K) held in registers, a loop over D-chunks forms W_g = āᵀ Pxw and
V_g = b̄ᵀ Pxv_σ + gx chunk by chunk and accumulates V_g·W_g, ‖V_g‖², ‖W_g‖²
((HK + HL)·D multiply-adds per pair, spec §8). Embedding global: Gi[i]·Gt[j] in the
same program.

Grids above 2^31 - 1 programs are launched in blocks of images (COCO 5K × 25K is
1.25e8 programs, one launch).

Ragged masks are read inside the kernel; K and L are padded to powers of two
(at least 16, the smallest tl.dot tile on a GPU) and masked. Limits: K <= 64,
L <= 128 (longer is refused with ValueError). Storage dtype = input dtype for
fp16 / bf16 (dots on tensor cores with fp32 accumulation; the attention weights
are cast to the storage dtype for the Γ products, as flash attention does for
P·V) and float32 otherwise (float64 input is scored in float32). fp32 dots use
``input_precision="ieee"`` so the 1e-4 contract holds on a GPU; ``allow_tf32=True``
switches to tf32 (its own, looser tolerance).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from acf_fast.precompute import ItemSide, precompute_items

from .interpreter import INTERPRET as _INTERPRET  # importing it also fixes triton 3.6's interpreter

__all__ = ["MAX_K", "MAX_L", "KernelSide", "gram_factor", "prepare_sides", "launch_similarity", "launch_pairs"]

MAX_K = 64  # regions per image the kernel accepts
MAX_L = 128  # tokens per text the kernel accepts
_MIN_TILE = 16  # tl.dot needs every tile side >= 16 on NVIDIA GPUs
# fp32 values a program's largest register tile may hold (accumulators, global-term
# tiles); 8192 = 64 per thread at 4 warps. Sets the query block and BLOCK_D.
_REG_TILE = 8192
# Bytes of the (keys, R-chunk) factor tile one tl.dot stages through shared memory
# (Hopper allows ~227 KB per block). At K = 36, L <= 32 everything is one pass.
_SMEM_TILE_BYTES = 128 * 1024
# Programs per launch (CUDA's limit on grid dimension x).
_MAX_GRID = 2**31 - 1


def _pow2(n: int) -> int:
    return max(_MIN_TILE, triton.next_power_of_2(int(n)))


# --------------------------------------------------------------------------- kernel


@triton.jit
def _masked_softmax(logits, key_valid):
    """Row softmax of logits (R, C) fp32 over the columns where key_valid (C,) is True."""
    x = tl.where(key_valid[None, :], logits, float("-inf"))
    mx = tl.max(x, axis=1)
    p = tl.exp(x - mx[:, None])
    p = tl.where(key_valid[None, :], p, 0.0)
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _direction(
    q_ptr, o_ptr, k_ptr, fac_ptr, qmask_ptr, qnorm_ptr, kmask_ptr,
    q_item, k_item, TQ, TK, scale,
    H: tl.constexpr, HP: tl.constexpr, DH: tl.constexpr,
    TQP: tl.constexpr, TKP: tl.constexpr, TQB: tl.constexpr,
    R: tl.constexpr, RP: tl.constexpr, RC: tl.constexpr,
    BLOCK_DIAG: tl.constexpr, O_IS_Q: tl.constexpr, PAIRWISE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One attention direction of one pair: queries from item ``q_item`` (TQ rows),
    keys from item ``k_item`` of the other side (TK rows); ``q_item``/``k_item`` int64.

    Query rows are processed TQB at a time (softmax is per query row, so blocks are
    independent; only the register tiles shrink). With the full-Γ factor, its R
    columns go RC at a time (‖c‖² = Σ over column chunks of ‖c_chunk‖²); when RC < RP
    the head loop, and so the attention, is recomputed per chunk: that only happens
    for long texts (H·L > ~512 in bf16), where one (TK, R) operand tile would not fit
    in shared memory. Returns (mean over valid query rows of cos(x_t, x*_t) fp32
    scalar, ā (HP, TKP) fp32: per head, the mean over valid queries of the attention
    weights; zeros unless PAIRWISE).
    """
    offs_k = tl.arange(0, TKP)
    offs_d = tl.arange(0, DH)
    offs_h = tl.arange(0, HP)
    k_in = offs_k < TK
    k_valid = tl.load(kmask_ptr + k_item * TK + offs_k, mask=k_in, other=0) != 0
    offs_all = tl.arange(0, TQP)
    q_all = tl.load(qmask_ptr + q_item * TQ + offs_all, mask=offs_all < TQ, other=0) != 0
    nq = tl.sum(q_all.to(tl.float32), axis=0)
    q_base = q_item * (H * TQ * DH)
    k_base = k_item * (H * TK * DH)
    if BLOCK_DIAG:
        fac_base = k_item * (H * TK * TK)
    else:
        fac_base = k_item * (H * TK * R)
    score = tl.zeros((TQB,), dtype=tl.float32)
    abar = tl.zeros((HP, TKP), dtype=tl.float32)
    for q0 in range(0, TQP, TQB):
        offs_q = q0 + tl.arange(0, TQB)
        q_in = offs_q < TQ
        q_valid = tl.load(qmask_ptr + q_item * TQ + offs_q, mask=q_in, other=0) != 0
        q_norm = tl.load(qnorm_ptr + q_item * TQ + offs_q, mask=q_in, other=0.0)
        num = tl.zeros((TQB,), dtype=tl.float32)
        nrm = tl.zeros((TQB,), dtype=tl.float32)
        for r0 in range(0, RP, RC):  # one pass unless the factor tile is too large
            if not BLOCK_DIAG:
                offs_r = r0 + tl.arange(0, RC)
                c = tl.zeros((TQB, RC), dtype=tl.float32)
            for h in range(H):
                q_off = q_base + h * TQ * DH + offs_q[:, None] * DH + offs_d[None, :]
                k_off = k_base + h * TK * DH + offs_k[:, None] * DH + offs_d[None, :]
                q = tl.load(q_ptr + q_off, mask=q_in[:, None], other=0.0)
                k = tl.load(k_ptr + k_off, mask=k_in[:, None], other=0.0)
                raw = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                A = _masked_softmax(raw * scale, k_valid)
                if r0 == 0:
                    if O_IS_Q:
                        num += tl.sum(A * raw, axis=1)
                    else:
                        o = tl.load(o_ptr + q_off, mask=q_in[:, None], other=0.0)
                        num += tl.sum(A * tl.dot(o, tl.trans(k), input_precision=DOT_PREC), axis=1)
                    if PAIRWISE:
                        col = tl.sum(tl.where(q_valid[:, None], A, 0.0), axis=0)
                        abar += tl.where(offs_h[:, None] == h, col[None, :], 0.0)
                if BLOCK_DIAG:
                    # Γ'_hh = Kk'_h Kk'_hᵀ, stored (H, TK, TK); RC == RP: one pass
                    g_off = fac_base + h * TK * TK + offs_k[:, None] * TK + offs_k[None, :]
                    g = tl.load(fac_ptr + g_off, mask=k_in[:, None] & k_in[None, :], other=0.0)
                    y = tl.dot(A.to(g.dtype), g, input_precision=DOT_PREC)
                    nrm += tl.sum(y * A, axis=1)
                else:
                    # rows h*TK + t, columns [r0, r0 + RC) of the factor C' (H*TK, R)
                    f_off = fac_base + (h * TK + offs_k)[:, None] * R + offs_r[None, :]
                    f = tl.load(fac_ptr + f_off, mask=k_in[:, None] & (offs_r < R)[None, :], other=0.0)
                    c += tl.dot(A.to(f.dtype), f, input_precision=DOT_PREC)
            if not BLOCK_DIAG:
                nrm += tl.sum(c * c, axis=1)
        cos = num / tl.maximum(q_norm * tl.sqrt(nrm), 1e-8)
        score += tl.where(q_valid, cos, 0.0)
    return tl.sum(score, axis=0) / nq, abar / nq


@triton.jit
def _pair_score(
    i, j,
    vq_ptr, vk_ptr, vo_ptr, vmask_ptr, vnorm_ptr, vfac_ptr, vpg_ptr, vgx_ptr,
    wq_ptr, wk_ptr, wo_ptr, wmask_ptr, wnorm_ptr, wfac_ptr, wpg_ptr,
    gi_ptr, gt_ptr,
    K, L,
    s_i2t, s_t2i, u1, u2,
    H: tl.constexpr, HP: tl.constexpr, DH: tl.constexpr, D: tl.constexpr,
    KP: tl.constexpr, LP: tl.constexpr, KB: tl.constexpr, LB: tl.constexpr,
    RV: tl.constexpr, RVP: tl.constexpr, RVC: tl.constexpr, RW: tl.constexpr, RWP: tl.constexpr, RWC: tl.constexpr,
    E: tl.constexpr,
    BLOCK_DIAG: tl.constexpr, O_IS_Q: tl.constexpr,
    PAIRWISE: tl.constexpr, EMBED: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """S[i, j] (fp32 scalar) of image i and text j (int64): the whole per-pair computation,
    shared by the grid kernel and the pair-list kernel (arguments as ``_acf_pair_kernel``)."""
    # regions -> words: queries = image rows, keys = text rows, Γ of the text
    i2t, abar = _direction(
        vq_ptr, vo_ptr, wk_ptr, wfac_ptr, vmask_ptr, vnorm_ptr, wmask_ptr,
        i, j, K, L, s_i2t,
        H, HP, DH, KP, LP, KB, RW, RWP, RWC, BLOCK_DIAG, O_IS_Q, PAIRWISE, DOT_PREC,
    )
    # words -> regions
    t2i, bbar = _direction(
        wq_ptr, wo_ptr, vk_ptr, vfac_ptr, wmask_ptr, wnorm_ptr, vmask_ptr,
        j, i, L, K, s_t2i,
        H, HP, DH, LP, KP, LB, RV, RVP, RVC, BLOCK_DIAG, O_IS_Q, PAIRWISE, DOT_PREC,
    )
    local = u1 * i2t + (1.0 - u1) * t2i

    glob = 0.0
    if PAIRWISE:
        # Flattened (h, t) rows: h*TP + t in registers, h*T + t in memory.
        af = tl.reshape(abar, (HP * LP,))
        bf = tl.reshape(bbar, (HP * KP,))
        rw = tl.arange(0, HP * LP)
        rv = tl.arange(0, HP * KP)
        w_row_in = ((rw // LP) < H) & ((rw % LP) < L)
        v_row_in = ((rv // KP) < H) & ((rv % KP) < K)
        w_row = (rw // LP) * L + (rw % LP)
        v_row = (rv // KP) * K + (rv % KP)
        pw_base = j * (H * L * D)
        pv_base = i * (H * K * D)
        dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
        nv2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        nw2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            c_in = cols < D
            pw = tl.load(wpg_ptr + pw_base + w_row[:, None] * D + cols[None, :],
                         mask=w_row_in[:, None] & c_in[None, :], other=0.0)
            pv = tl.load(vpg_ptr + pv_base + v_row[:, None] * D + cols[None, :],
                         mask=v_row_in[:, None] & c_in[None, :], other=0.0)
            gx = tl.load(vgx_ptr + i * D + cols, mask=c_in, other=0.0)
            wg = tl.sum(af[:, None] * pw.to(tl.float32), axis=0)
            vg = tl.sum(bf[:, None] * pv.to(tl.float32), axis=0) + gx.to(tl.float32)
            dot += vg * wg
            nv2 += vg * vg
            nw2 += wg * wg
        glob = tl.sum(dot, axis=0) / tl.maximum(tl.sqrt(tl.sum(nv2, axis=0)) * tl.sqrt(tl.sum(nw2, axis=0)), 1e-8)
    if EMBED:
        acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            ce = e0 + tl.arange(0, BLOCK_E)
            e_in = ce < E
            gi = tl.load(gi_ptr + i * E + ce, mask=e_in, other=0.0)
            gt = tl.load(gt_ptr + j * E + ce, mask=e_in, other=0.0)
            acc += gi * gt
        glob = tl.sum(acc, axis=0)
    return u2 * local + (1.0 - u2) * glob


@triton.jit
def _acf_pair_kernel(
    S_ptr, stride_sn, stride_sm,
    # image side (T = K): Q/Kk/O (N, H, K, DH); mask (N, K) int8; norm (N, K) fp32;
    # fac: (N, H, K, K) block-diagonal Γv or (N, H*K, RV) factor; Pglob (N, H*K, D); gx (N, D)
    vq_ptr, vk_ptr, vo_ptr, vmask_ptr, vnorm_ptr, vfac_ptr, vpg_ptr, vgx_ptr,
    # text side (T = L), same layout
    wq_ptr, wk_ptr, wo_ptr, wmask_ptr, wnorm_ptr, wfac_ptr, wpg_ptr,
    # embedding global: Gi (N, E), Gt (M, E) fp32
    gi_ptr, gt_ptr,
    N, M, K, L,
    s_i2t, s_t2i, u1, u2,
    H: tl.constexpr, HP: tl.constexpr, DH: tl.constexpr, D: tl.constexpr,
    KP: tl.constexpr, LP: tl.constexpr, KB: tl.constexpr, LB: tl.constexpr,
    RV: tl.constexpr, RVP: tl.constexpr, RVC: tl.constexpr, RW: tl.constexpr, RWP: tl.constexpr, RWC: tl.constexpr,
    E: tl.constexpr,
    BLOCK_DIAG: tl.constexpr, O_IS_Q: tl.constexpr,
    PAIRWISE: tl.constexpr, EMBED: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PREC: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """S[i, j] for one (image i, text j) pair; grid (N * M,), grouped by GROUP_N images."""
    # int64 before any multiply by a stride or size: N*M and N*H*K*DH pass 2^31 at COCO scale.
    pid = tl.program_id(0).to(tl.int64)
    per_group = GROUP_N * M
    first_n = (pid // per_group) * GROUP_N
    group = tl.minimum(N - first_n, GROUP_N)
    i = first_n + (pid % per_group) % group
    j = (pid % per_group) // group
    s = _pair_score(
        i, j, vq_ptr, vk_ptr, vo_ptr, vmask_ptr, vnorm_ptr, vfac_ptr, vpg_ptr, vgx_ptr,
        wq_ptr, wk_ptr, wo_ptr, wmask_ptr, wnorm_ptr, wfac_ptr, wpg_ptr, gi_ptr, gt_ptr, K, L,
        s_i2t, s_t2i, u1, u2, H, HP, DH, D, KP, LP, KB, LB, RV, RVP, RVC, RW, RWP, RWC, E,
        BLOCK_DIAG, O_IS_Q, PAIRWISE, EMBED, BLOCK_D, BLOCK_E, DOT_PREC,
    )
    tl.store(S_ptr + i * stride_sn + j * stride_sm, s)


@triton.jit
def _acf_pair_list_kernel(
    S_ptr, pairs_ptr,
    vq_ptr, vk_ptr, vo_ptr, vmask_ptr, vnorm_ptr, vfac_ptr, vpg_ptr, vgx_ptr,
    wq_ptr, wk_ptr, wo_ptr, wmask_ptr, wnorm_ptr, wfac_ptr, wpg_ptr,
    gi_ptr, gt_ptr,
    N, M, K, L,
    s_i2t, s_t2i, u1, u2,
    H: tl.constexpr, HP: tl.constexpr, DH: tl.constexpr, D: tl.constexpr,
    KP: tl.constexpr, LP: tl.constexpr, KB: tl.constexpr, LB: tl.constexpr,
    RV: tl.constexpr, RVP: tl.constexpr, RVC: tl.constexpr, RW: tl.constexpr, RWP: tl.constexpr, RWC: tl.constexpr,
    E: tl.constexpr,
    BLOCK_DIAG: tl.constexpr, O_IS_Q: tl.constexpr,
    PAIRWISE: tl.constexpr, EMBED: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """S_ptr[p] = S[pairs[p, 0], pairs[p, 1]] for one pair p of a (P, 2) int64 list; grid (P,).
    Arguments as ``_acf_pair_kernel`` (N, M unused: the list was checked on the host)."""
    p = tl.program_id(0).to(tl.int64)
    i = tl.load(pairs_ptr + 2 * p)
    j = tl.load(pairs_ptr + 2 * p + 1)
    s = _pair_score(
        i, j, vq_ptr, vk_ptr, vo_ptr, vmask_ptr, vnorm_ptr, vfac_ptr, vpg_ptr, vgx_ptr,
        wq_ptr, wk_ptr, wo_ptr, wmask_ptr, wnorm_ptr, wfac_ptr, wpg_ptr, gi_ptr, gt_ptr, K, L,
        s_i2t, s_t2i, u1, u2, H, HP, DH, D, KP, LP, KB, LB, RV, RVP, RVC, RW, RWP, RWC, E,
        BLOCK_DIAG, O_IS_Q, PAIRWISE, EMBED, BLOCK_D, BLOCK_E, DOT_PREC,
    )
    tl.store(S_ptr + p, s)


# One config under the interpreter (autotune with more than one config needs a GPU
# driver, PLATFORM_FACTS); on a GPU the configs v1 shipped with.
if _INTERPRET:
    _CONFIGS = [triton.Config({"GROUP_N": 4}, num_warps=4, num_stages=1)]
else:
    _CONFIGS = [
        triton.Config({"GROUP_N": g}, num_warps=w, num_stages=s)
        for g, w, s in ((8, 8, 1), (32, 8, 1), (64, 8, 1), (32, 4, 1), (32, 8, 2))
    ]

# N and M are not in the key: tune once on a slice, reuse on the full grid.
_acf_pair_kernel_tuned = triton.autotune(
    configs=_CONFIGS,
    key=["K", "L", "H", "DH", "D", "RV", "RW", "E", "BLOCK_DIAG", "O_IS_Q", "PAIRWISE", "EMBED", "DOT_PREC"],
)(_acf_pair_kernel)

# The pair list has no image groups to swizzle: only the warp count is tuned.
_acf_pair_list_kernel_tuned = triton.autotune(
    configs=[triton.Config({}, num_warps=c.num_warps, num_stages=c.num_stages) for c in _CONFIGS[:1]] if _INTERPRET
    else [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)],
    key=["K", "L", "H", "DH", "D", "RV", "RW", "E", "BLOCK_DIAG", "O_IS_Q", "PAIRWISE", "EMBED", "DOT_PREC"],
)(_acf_pair_list_kernel)


# --------------------------------------------------------------------------- per-item adapter


@dataclass
class KernelSide:
    """Per-item tensors in the kernel's layout (all contiguous, on one device).

    T = K (images) or L (texts), H heads, d = D / H, st = storage dtype.
    - ``Q``, ``Kk``, ``O``: (n, H, T, d) st (``O``/``Kk`` may be the same tensor as ``Q``).
    - ``mask``: (n, T) int8, 1 at valid rows.  ``norm``: (n, T) float32, ‖x_t‖.
    - ``fac``: block-diagonal Γ (n, H, T, T) st, or the Cholesky factor C (n, H*T, R) st
      with C Cᵀ = Γ (R = H*T).
    - ``Pglob``: (n, H*T, D) st or None; ``gx``: (n, D) float32 or None (images).
    """

    Q: torch.Tensor
    Kk: torch.Tensor
    O: torch.Tensor
    mask: torch.Tensor
    norm: torch.Tensor
    fac: torch.Tensor
    Pglob: Optional[torch.Tensor]
    gx: Optional[torch.Tensor]
    block_diagonal: bool
    o_is_q: bool
    R: int

    @property
    def n(self) -> int:
        return self.Q.shape[0]

    @property
    def T(self) -> int:
        return self.Q.shape[2]


def gram_factor(gram: torch.Tensor, mask: torch.Tensor, heads: int, *, chunk: int = 512) -> torch.Tensor:
    """C (n, HT, HT) float32, lower-triangular, with C Cᵀ = Γ on the valid rows.

    Args:
        gram: (n, HT, HT) Γ = P_blk P_blkᵀ (row h*T + t), any float dtype.
        mask: (n, T) bool, valid rows.
        heads: H.

    Γ is positive semi-definite and singular whenever H·T_valid > D or a row is
    masked. Masked rows and columns are replaced by the identity scaled to Γ's mean
    diagonal (the kernel's attention weight there is 0, so they never count), and a
    jitter of 1e-12·mean diagonal keeps the rest positive definite; the factorisation
    runs in float64, so C Cᵀ equals Γ to ~1e-12 relative and the only rounding left
    is the cast of C to the storage dtype. Items whose Γ is numerically indefinite
    (singular Γ plus the rounding of its float32 product) fall back to a float64
    eigendecomposition with negative eigenvalues clamped to 0. Done in chunks of
    ``chunk`` items.
    """
    n, HT, _ = gram.shape
    out = torch.empty(n, HT, HT, dtype=torch.float32, device=gram.device)
    for s in range(0, n, chunk):
        g = gram[s : s + chunk].detach().to(torch.float64)
        valid = mask[s : s + chunk].repeat(1, heads).to(torch.float64)  # (b, HT), row h*T + t
        keep = valid[:, :, None] * valid[:, None, :]
        diag = torch.diagonal(g, dim1=1, dim2=2)
        mean_diag = (diag * valid).sum(1) / valid.sum(1).clamp(min=1)
        mean_diag = torch.where(mean_diag > 0, mean_diag, torch.ones_like(mean_diag))
        eye = torch.eye(HT, dtype=torch.float64, device=g.device)
        fill = (1 - valid) * mean_diag[:, None] + 1e-12 * mean_diag[:, None]
        g = g * keep + eye * fill[:, :, None]
        C, info = torch.linalg.cholesky_ex(g)
        bad = (info != 0).nonzero().flatten()
        if bad.numel():
            # Γ numerically indefinite: rank-deficient (H·T > D) with rounding noise from the
            # input's own Gram product. Clamp the eigenvalues instead (float64 eigh, exact
            # up to that noise); C = U sqrt(λ⁺) is not triangular, which the kernel ignores.
            lam, U = torch.linalg.eigh(g[bad])
            C[bad] = U * lam.clamp(min=0).sqrt()[:, None, :]
        out[s : s + chunk] = C.to(torch.float32)
    return out


def _to_kernel_side(side: ItemSide, st: torch.dtype) -> KernelSide:
    """ItemSide (acf_fast.precompute) -> the kernel's contiguous layout in storage dtype ``st``."""
    Q = side.Q.detach().to(st).contiguous()
    Kk = Q if side.Kk is side.Q else side.Kk.detach().to(st).contiguous()
    O = Q if side.O is side.Q else side.O.detach().to(st).contiguous()
    n, H, T, d = Q.shape
    if side.block_diagonal:
        fac = side.gram.detach().to(st).contiguous()
        R = T
    else:
        fac = gram_factor(side.gram, side.mask, H).to(st).contiguous()
        R = H * T
    return KernelSide(
        Q=Q,
        Kk=Kk,
        O=O,
        mask=side.mask.to(torch.int8).contiguous(),
        norm=side.norm.detach().to(torch.float32).contiguous(),
        fac=fac,
        Pglob=None if side.Pglob is None else side.Pglob.detach().to(st).contiguous(),
        gx=None if side.gx is None else side.gx.detach().to(torch.float32).contiguous(),
        block_diagonal=side.block_diagonal,
        o_is_q=side.O is side.Q,
        R=R,
    )


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 / bf16 stay (tensor-core dots, fp32 accumulation); everything else is scored in float32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def check_kernel_limits(K: int, L: int, D: int, heads: int) -> None:
    """Refuse shapes the kernel does not tile (ValueError naming the argument)."""
    if K > MAX_K:
        raise ValueError(f"V has K = {K} regions per image; the triton backend takes at most {MAX_K} (use backend='torch')")
    if L > MAX_L:
        raise ValueError(f"W has L = {L} tokens per text; the triton backend takes at most {MAX_L} (use backend='torch')")
    d = D // heads
    if d < _MIN_TILE or d & (d - 1):
        raise ValueError(f"head width D / heads = {D}/{heads} = {d}; the triton backend needs a power of two >= {_MIN_TILE}")


# Items per precompute call: bounds the float32 temporaries of acf_fast.precompute
# (P_blk and Pglob are (n, H*T, D) each) to a chunk while the kernel layout fills up.
_PREP_CHUNK = 2048


def _prepare_side(X, mask, weights, heads, *, role, G, pairwise, st) -> KernelSide:
    n = X.shape[0]
    chunk = _PREP_CHUNK
    out = None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        side = precompute_items(X[s:e], None if mask is None else mask[s:e], weights, heads, role=role,
                                G=None if G is None else G[s:e], pairwise_global=pairwise)
        part = _to_kernel_side(side, st)
        if e - s == n:
            return part
        if out is None:
            alloc = lambda t: None if t is None else torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=t.device)  # noqa: E731
            Q = alloc(part.Q)
            out = KernelSide(
                Q=Q, Kk=Q if part.Kk is part.Q else alloc(part.Kk), O=Q if part.O is part.Q else alloc(part.O),
                mask=alloc(part.mask), norm=alloc(part.norm), fac=alloc(part.fac), Pglob=alloc(part.Pglob),
                gx=alloc(part.gx), block_diagonal=part.block_diagonal, o_is_q=part.o_is_q, R=part.R,
            )
        for name in ("Q", "Kk", "O", "mask", "norm", "fac", "Pglob", "gx"):
            dst, src = getattr(out, name), getattr(part, name)
            if dst is not None and not (name in ("Kk", "O") and dst is out.Q):
                dst[s:e] = src
    return out


def prepare_sides(V, v_mask, W, w_mask, *, heads, weights, G) -> Tuple[KernelSide, KernelSide]:
    """Run the per-item precompute (acf_fast.precompute, spec §8) for both sides and
    put it into the kernel's layout, ``_PREP_CHUNK`` items at a time.

    V (N, K, D), W (M, L, D); masks (.., T) bool or None; G (N, D) or None (pairwise
    global score on when given). Returns (images, texts) as :class:`KernelSide`.
    """
    pairwise = G is not None
    st = storage_dtype(V.dtype)
    with torch.no_grad():
        img = _prepare_side(V, v_mask, weights, heads, role="image", G=G, pairwise=pairwise, st=st)
        txt = _prepare_side(W, w_mask, weights, heads, role="text", G=None, pairwise=pairwise, st=st)
    return img, txt


# --------------------------------------------------------------------------- launch


def launch_similarity(
    img: KernelSide,
    txt: KernelSide,
    out: torch.Tensor,
    *,
    scale: Tuple[float, float],
    u1: float,
    u2: float,
    global_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """Launch the fused kernel: writes every element of ``out`` (N, M) float32 and returns it.

    ``out`` may be any (N, M) float32 tensor on the device (tests pass one filled with
    NaN to check that every element is written). ``global_emb`` = (Gi (N, E), Gt (M, E))
    for the embedding global score; the pairwise global score is on when ``img.Pglob``
    is set. ``allow_tf32`` switches fp32 dots from "ieee" to "tf32".
    """
    N, H, K, DH = img.Q.shape
    M, _, L, _ = txt.Q.shape
    D = H * DH
    if tuple(out.shape) != (N, M) or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 tensor of shape {(N, M)}, got {out.dtype} {tuple(out.shape)}")
    if img.block_diagonal != txt.block_diagonal or img.o_is_q != txt.o_is_q:
        raise ValueError("image and text sides were prepared with different weights")
    check_kernel_limits(K, L, D, H)
    pairwise = img.Pglob is not None
    if pairwise and (txt.Pglob is None or img.gx is None):
        raise ValueError("pairwise global score needs Pglob on both sides and gx on the image side")
    if global_emb is not None:
        Gi = global_emb[0].detach().to(torch.float32).contiguous()
        Gt = global_emb[1].detach().to(torch.float32).contiguous()
        E = Gi.shape[1]
    else:
        Gi = Gt = img.norm  # never read (EMBED is False)
        E = 1
    dummy = img.norm
    _launch(
        out, img, txt, Gi, Gt, N, M, K, L, float(scale[0]), float(scale[1]), float(u1), float(u2),
        H=H, DH=DH, D=D, E=E, pairwise=pairwise, embed=global_emb is not None,
        dot_prec="tf32" if (allow_tf32 or img.Q.dtype != torch.float32) else "ieee", dummy=dummy,
    )
    return out


def _query_block(TP: int, RP: int) -> int:
    """Query rows per block: keeps the (rows, R) accumulator near _REG_TILE fp32 values."""
    return max(_MIN_TILE, min(TP, _REG_TILE // RP))


def _r_chunk(TQP: int, TKP: int, RP: int, keys: "KernelSide") -> int:
    """Factor columns per pass: the (TKP, RC) operand tile within _SMEM_TILE_BYTES."""
    if keys.block_diagonal:
        return RP
    fit = _SMEM_TILE_BYTES // (TKP * keys.fac.element_size())
    return max(_MIN_TILE, min(RP, 1 << max(0, fit.bit_length() - 1)))


def _kernel_args(out, img, txt, Gi, Gt, N, M, K, L, s_i2t, s_t2i, u1, u2, *, H, DH, D, E, pairwise, embed, dot_prec, dummy):
    pw = lambda t: dummy if t is None else t  # noqa: E731  (unused pointers must still be tensors)
    HP = triton.next_power_of_2(H)
    KP, LP = _pow2(K), _pow2(L)
    RVP, RWP = _pow2(K if img.block_diagonal else img.R), _pow2(L if txt.block_diagonal else txt.R)
    RVC, RWC = _r_chunk(LP, KP, RVP, img), _r_chunk(KP, LP, RWP, txt)
    args = (
        out, out.stride(0), out.stride(1),
        img.Q, img.Kk, img.O, img.mask, img.norm, img.fac, pw(img.Pglob), pw(img.gx),
        txt.Q, txt.Kk, txt.O, txt.mask, txt.norm, txt.fac, pw(txt.Pglob),
        Gi, Gt,
        N, M, K, L, s_i2t, s_t2i, u1, u2,
    )
    meta = dict(
        H=H, HP=HP, DH=DH, D=D,
        KP=KP, LP=LP, KB=_query_block(KP, RWC), LB=_query_block(LP, RVC),
        RV=img.R, RVP=RVP, RVC=RVC, RW=txt.R, RWP=RWP, RWC=RWC,
        E=E, BLOCK_DIAG=img.block_diagonal, O_IS_Q=img.o_is_q,
        PAIRWISE=pairwise, EMBED=embed,
        BLOCK_D=max(16, min(64, triton.next_power_of_2(D), _REG_TILE // (HP * max(KP, LP)))),
        BLOCK_E=min(256, triton.next_power_of_2(E)),
        DOT_PREC=dot_prec,
    )
    return args, meta


def _slice_side(side: KernelSide, a: int, b: int) -> KernelSide:
    cut = lambda t: None if t is None else t[a:b]  # noqa: E731  (dim-0 slices stay contiguous)
    Q = side.Q[a:b]
    return KernelSide(Q, Q if side.Kk is side.Q else side.Kk[a:b], Q if side.O is side.Q else side.O[a:b],
                      side.mask[a:b], side.norm[a:b], side.fac[a:b], cut(side.Pglob), cut(side.gx),
                      side.block_diagonal, side.o_is_q, side.R)


def _launch(out, img, txt, Gi, Gt, N, M, K, L, s_i2t, s_t2i, u1, u2, *, wrap=None, **kw):
    kernel = _acf_pair_kernel_tuned if wrap is None else wrap(_acf_pair_kernel_tuned)
    # A 1-D grid holds at most 2^31 - 1 programs: larger grids go in blocks of images.
    block = max(1, _MAX_GRID // M)
    for a in range(0, N, block):
        b = min(N, a + block)
        part = (img, Gi) if (a, b) == (0, N) else (_slice_side(img, a, b), Gi[a:b] if kw.get("embed") else Gi)
        args, meta = _kernel_args(out[a:b], part[0], txt, part[1], Gt, b - a, M, K, L, s_i2t, s_t2i, u1, u2, **kw)
        kernel[((b - a) * M,)](*args, **meta)


def launch_pairs(
    img: KernelSide,
    txt: KernelSide,
    pairs: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: Tuple[float, float],
    u1: float,
    u2: float,
    global_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """Score a pair list with the list kernel: ``out[p] = S[pairs[p, 0], pairs[p, 1]]``.

    Args:
        img, txt: :func:`prepare_sides` of the items (N images, M texts).
        pairs: (P, 2) int64 contiguous on the device, indices already checked to lie
            in [0, N) × [0, M) (the kernel does not bound-check them).
        out: (P,) float32 on the device; every element is written.
        scale, u1, u2, global_emb, allow_tf32: as :func:`launch_similarity`.
    """
    N, H, K, DH = img.Q.shape
    M, _, L, _ = txt.Q.shape
    D = H * DH
    P = pairs.shape[0]
    if tuple(pairs.shape) != (P, 2) or pairs.dtype != torch.int64 or not pairs.is_contiguous():
        raise ValueError(f"pairs must be a contiguous (P, 2) int64 tensor, got {pairs.dtype} {tuple(pairs.shape)}")
    if tuple(out.shape) != (P,) or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 tensor of shape {(P,)}, got {out.dtype} {tuple(out.shape)}")
    if img.block_diagonal != txt.block_diagonal or img.o_is_q != txt.o_is_q:
        raise ValueError("image and text sides were prepared with different weights")
    check_kernel_limits(K, L, D, H)
    pairwise = img.Pglob is not None
    if global_emb is not None:
        Gi = global_emb[0].detach().to(torch.float32).contiguous()
        Gt = global_emb[1].detach().to(torch.float32).contiguous()
        E = Gi.shape[1]
    else:
        Gi = Gt = img.norm  # never read (EMBED is False)
        E = 1
    for a in range(0, P, _MAX_GRID):
        b = min(P, a + _MAX_GRID)
        args, meta = _kernel_args(out.view(-1, 1), img, txt, Gi, Gt, N, M, K, L, float(scale[0]), float(scale[1]), float(u1),
                                  float(u2), H=H, DH=DH, D=D, E=E, pairwise=pairwise, embed=global_emb is not None,
                                  dot_prec="tf32" if (allow_tf32 or img.Q.dtype != torch.float32) else "ieee",
                                  dummy=img.norm)
        # The grid kernel's arguments after (S_ptr, stride_sn, stride_sm) are the list kernel's after (S_ptr, pairs_ptr).
        _acf_pair_list_kernel_tuned[(b - a,)](out[a:b], pairs[a:b], *args[3:], **meta)
    return out
