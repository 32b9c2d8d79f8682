"""The pairwise global score (spec §3, the paper's eqs. 7–12) of many pairs, fused.

For pair p = (image i, text j) the tile kernel (:mod:`kernels.tiles`) writes
κ_p = concat_h(ā_h Kw_h), (H·DH,), and b̄_p = concat_h(b̄_h), (H·K,): text j's attention on
image i's regions, averaged over its valid words. Here, per pair,

    W_g = κ_p Zw,   V_g = b̄_p Pv_i + gx_i,   S[i, col_j] += coef · cos(V_g, W_g)

with Zw (H·DH, D) and Pv_i = σ ⊙ (Kv_blk,i z_o x_v) (H·K, D), image i's rows of the
precompute's ``Pglob`` (acf_fast.precompute, spec §8), the cosine's denominator
‖V_g‖·‖W_g‖ clamped at eps.

Why V_g from b̄ and Pv: b̄_p Pv_i is λ_p Zv (λ_p = b̄_p Kv_blk,i) regrouped. A program holds one
image against BM texts, so Pv_i is every row's right-hand side, and the product is
H·K × D (320 × 1024 at COCO's shape) per pair instead of H·DH × D (1024²): 1.38 M
tensor-core multiply-adds per pair in place of 2.10 M (bench/kernel_report.py). W_g cannot be
regrouped the same way: its right-hand side would be each row's own text.

Why a kernel: done with GEMMs and torch's elementwise ops, every pair's V_g and W_g went to
memory in fp32 (8 KiB per pair at D = 1024) and were read back by the product, its sum and
the two norms. Here the program walks D in chunks of BN columns; both products of a chunk
accumulate in registers (K-loops over H·DH and H·K) and each chunk is reduced at once to
three numbers per pair (V·W, ‖V‖², ‖W‖²). What leaves the chip is κ and b̄, read once per
chunk of D from L2, Zw and Pv_i once per program, and one entry of S per pair.

Precision: 16-bit κ, b̄ take Zw, Pv in their dtype with fp32 accumulation. fp32 κ, b̄ (the
tiles' fp32 path; κ carries its side's power of two, within ±2^13) run the tiles' ``f16x3``
dots: κ and b̄ are split into fp16 pairs in registers, Zw and Pv are fp16 pairs split on the
host (``tiles.split16_planes``; Pv with one power of two per chunk of images), and the
products are undone by the scales after the K-loops.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tiles import _dot3, _lo_plane, _operand, lo_plane_offset, split16_into, split16_planes, split16_scale


@triton.jit
def _chunk_product(a_ptr, a_in, z_ptr, lo_z, k, n, KD, D, acc, DOT_PREC: tl.constexpr):
    """acc + A (BM, BK) @ Z[k, n] (BK, BN): A loaded at a_ptr (κ or b̄; fp32 under f16x3, split
    here into an fp16 pair), Z's block (and its lo plane under f16x3) of a (KD, D) matrix."""
    F16X3: tl.constexpr = DOT_PREC == "f16x3"
    a = tl.load(a_ptr, mask=a_in, other=0.0)
    z_in = (k < KD)[:, None] & (n < D)[None, :]
    z_off = k[:, None] * D + n[None, :]
    z = tl.load(z_ptr + z_off, mask=z_in, other=0.0)
    z_lo = _lo_plane(z_ptr + lo_z + z_off, z_in, z, F16X3)
    a_hi, a_lo = _operand(a, z.dtype, F16X3)
    return _dot3(a_hi, a_lo, z, z_lo, acc, DOT_PREC)


@triton.jit(do_not_specialize=["stride_sn", "stride_sm", "Mb"])
def _pair_global_kernel(
    S_ptr, stride_sn, stride_sm, col_ptr,
    kap_ptr, bbar_ptr, zw_ptr, lo_zw, pv_ptr, stride_pv, lo_pv, pv_unscale_ptr, gx_ptr, stride_gx,
    Mb, HD, HK, D, unscale_w, coef, eps,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (images, cdiv(Mb, BM)): program (i, c) scores image i against texts c·BM ...
    Pair p = i·Mb + j is row p of κ (P, HD) and b̄ (P, HK), both contiguous, and entry
    (i, col_ptr[j]) of S (int32 columns). Zw (HD, D) contiguous; Pv (images, HK, D), image
    stride stride_pv, rows contiguous; under DOT_PREC "f16x3" (κ, b̄ fp32 then) both are fp16
    hi planes with their lo planes lo_zw / lo_pv elements further on, else in κ's dtype.
    κ Zw·unscale_w is W_g, b̄ Pv_i·pv_unscale[i] the first term of V_g. gx (images, D) fp32,
    row stride stride_gx; coef = 1 - u2."""
    i = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BM + tl.arange(0, BM)
    t_in = t < Mb
    p64 = i * Mb + t
    pv_i = pv_ptr + i * stride_pv
    gx_i = gx_ptr + i * stride_gx
    unscale_v = tl.load(pv_unscale_ptr + i)
    kk = tl.arange(0, BK)
    nn = tl.arange(0, BN)
    vw = tl.zeros((BM,), dtype=tl.float32)
    vv = tl.zeros((BM,), dtype=tl.float32)
    ww = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, D, BN):
        n = n0 + nn
        acc_w = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, HD, BK):
            k = k0 + kk
            acc_w = _chunk_product(kap_ptr + p64[:, None] * HD + k[None, :], t_in[:, None] & (k < HD)[None, :],
                                   zw_ptr, lo_zw, k, n, HD, D, acc_w, DOT_PREC)
        acc_v = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, HK, BK):
            k = k0 + kk
            acc_v = _chunk_product(bbar_ptr + p64[:, None] * HK + k[None, :], t_in[:, None] & (k < HK)[None, :],
                                   pv_i, lo_pv, k, n, HK, D, acc_v, DOT_PREC)
        g = tl.load(gx_i + n, mask=n < D, other=0.0)
        v = acc_v * unscale_v + g[None, :]
        w = acc_w * unscale_w
        vw += tl.sum(v * w, axis=1)
        vv += tl.sum(v * v, axis=1)
        ww += tl.sum(w * w, axis=1)
    cos = vw / tl.maximum(tl.sqrt(vv) * tl.sqrt(ww), eps)
    col = tl.load(col_ptr + t, mask=t_in, other=0).to(tl.int64)
    at = S_ptr + i * stride_sn + col * stride_sm
    tl.store(at, tl.load(at, mask=t_in, other=0.0) + coef * cos, mask=t_in)


# --------------------------------------------------------------------------- host side

import torch  # noqa: E402

from .interpreter import INTERPRET as _INTERPRET  # noqa: E402  (importing it also fixes triton 3.6's interpreter)

PAIRS_PER_PROGRAM = 128


def pair_global_meta(dtype: torch.dtype, interpret: bool = _INTERPRET) -> dict:
    """Constexprs and launch options of :func:`_pair_global_kernel` for κ's dtype (also used by
    bench/kernel_report.py): 128 pairs × 128 columns of D, three stages; K steps of 64 (16-bit)
    or 32 (fp32, whose Zw and Pv come as fp16 pairs). Offline sm_90 build, triton 3.9 / 3.6:
    248 / 250 registers (fp32 249 / 254), no spills, 97 KiB (81 KiB) of shared memory. Wider
    chunks read κ and b̄ from L2 fewer times (once per chunk): 256 columns spilled 2 KB in
    bf16; fp32 at 64 columns took 11.1 K warp-instructions per pair, at 128 7.5 K (its fp16
    split of κ and b̄ is made once per chunk)."""
    split = dtype == torch.float32
    if interpret:  # small blocks: the interpreter's cost grows with them
        return dict(BM=16, BN=16, BK=16, DOT_PREC="f16x3" if split else "tf32", num_warps=4, num_stages=1)
    return dict(BM=PAIRS_PER_PROGRAM, BN=128, BK=32 if split else 64,
                DOT_PREC="f16x3" if split else "tf32", num_warps=8, num_stages=3)


def weight_operands(Zw: torch.Tensor, dtype: torch.dtype) -> dict:
    """Zw (HD, D) fp32 as the kernel takes it for κ of ``dtype``: in that dtype, or for fp32 as an
    fp16 pair scaled by a power of two (``scale``; its lo plane ``lo`` elements on). Made once
    per set of weights (tiles.plan_tiles keeps it): the fp32 split reads the matrix's largest
    magnitude back to the host, which would stall the queue of launches if done per launch."""
    if dtype == torch.float32:
        s = split16_scale(float(Zw.abs().max()))
        zw = split16_planes(Zw, s)
        return dict(dtype=dtype, zw=zw[0], lo=lo_plane_offset(zw[0]), scale=s)
    return dict(dtype=dtype, zw=Zw.to(dtype).contiguous(), lo=0, scale=1.0)


def image_operands(Pv: torch.Tensor, dtype: torch.dtype) -> dict:
    """Pv (n, HK, D) float, n images' ``Pglob`` rows (acf_fast.precompute: σ ⊙ (Kv_blk z_o x_v),
    row h·K + k), as the kernel takes them for b̄ of ``dtype``: ``pv`` (n, planes, HK, D), one
    plane in that dtype, or for fp32 two fp16 planes (hi, lo) of Pv times a power of two;
    ``unscale`` (n,) fp32 what undoes it. Each image's lo plane follows its hi plane, so a slice
    of images (:func:`image_slice`) keeps them together. For fp32 the scale is one per call:
    tiles.plan_tiles calls it per chunk of images (a scale over all would need them all in
    fp32 at once: 6.5 GB for COCO's 5,000)."""
    n = Pv.shape[0]
    if dtype == torch.float32:
        s = split16_scale(float(Pv.abs().max())) if Pv.numel() else 1.0
        pv = torch.empty(n, 2, *Pv.shape[1:], dtype=torch.float16, device=Pv.device)
        split16_into(pv[:, 0], pv[:, 1], Pv.float() * s)  # as split16_planes, with each image's planes together
        return dict(dtype=dtype, pv=pv, unscale=torch.full((n,), 1.0 / s, device=Pv.device))
    return dict(dtype=dtype, pv=Pv.to(dtype).unsqueeze(1).contiguous(), unscale=torch.ones(n, device=Pv.device))


def image_slice(pv: dict, lo: int, hi: int) -> dict:
    """:func:`image_operands` of images [lo, hi) (views)."""
    return dict(pv, pv=pv["pv"][lo:hi], unscale=pv["unscale"][lo:hi])


def cat_image_operands(parts) -> dict:
    """:func:`image_operands` of consecutive chunks of images, as one."""
    if len(parts) == 1:
        return parts[0]
    return dict(parts[0], pv=torch.cat([p["pv"] for p in parts]), unscale=torch.cat([p["unscale"] for p in parts]))


def add_pair_global(S: torch.Tensor, col: torch.Tensor, kap: torch.Tensor, bbar: torch.Tensor, zw: dict, pv: dict,
                    gx: torch.Tensor, coef: float, eps: float, *, kap_scale: float = 1.0) -> torch.Tensor:
    """S[i, col[j]] += coef · cos(b̄_p Pv_i + gx_i, κ_p Zw) for every pair p = i·Mb + j;
    S updated in place and returned.

    S (n, ≥ max(col) + 1) fp32, any strides; col (Mb,) int32 distinct columns; kap (n·Mb, HD)
    bf16, fp16 or fp32 holding kap_scale·κ (fp32: within ±2^13, as the tiles' fp32 path
    writes it: it is split into fp16 pairs); bbar (n·Mb, HK) b̄ in kap's dtype; zw:
    :func:`weight_operands` of Zw, pv: :func:`image_operands` of the n images' Pv, both for
    kap's dtype; gx (n, D) fp32. Nothing outside the n × Mb entries named is written."""
    launch = global_launch(S, col, kap, bbar, zw, pv, gx, coef, eps, kap_scale=kap_scale)
    if launch is not None:
        grid, args, kwargs = launch
        _pair_global_kernel[grid](*args, **kwargs)
    return S


def global_launch(S, col, kap, bbar, zw, pv, gx, coef, eps, *, kap_scale=1.0):
    """(grid, args, kwargs) of :func:`add_pair_global`'s launch (its arguments checked), or
    None when there is no pair; also what ``tiles.compile_ahead`` builds ahead."""
    n, Mb = S.shape[0], col.shape[0]
    P, HD = kap.shape
    z, rows = zw["zw"], pv["pv"]
    D = z.shape[1]
    HK = rows.shape[2]
    if P != n * Mb or bbar.shape != (P, HK) or z.shape[0] != HD or rows.shape[0] != n or rows.shape[3] != D:
        raise ValueError(f"add_pair_global: kap {tuple(kap.shape)} must be (n*Mb, HD) = ({n}*{Mb}, HD), bbar "
                         f"{tuple(bbar.shape)} (n*Mb, HK), Zw {tuple(z.shape)} (HD, D), Pv {tuple(rows.shape)} "
                         "(n, planes, HK, D)")
    if gx.shape != (n, D):
        raise ValueError(f"add_pair_global: gx {tuple(gx.shape)} must be ({n}, {D})")
    if not zw["dtype"] == pv["dtype"] == kap.dtype == bbar.dtype:
        raise ValueError(f"add_pair_global: kap {kap.dtype}, bbar {bbar.dtype}, Zw's operands made for {zw['dtype']}, "
                         f"Pv's for {pv['dtype']}: all must be kap's")
    if P == 0:
        return None
    meta = pair_global_meta(kap.dtype)
    hi = rows[:, 0]
    gx = gx.float()
    args = (S, S.stride(0), S.stride(1), col, kap.contiguous(), bbar.contiguous(), z, zw["lo"], hi, hi.stride(0),
            HK * D if rows.shape[1] == 2 else 0, pv["unscale"], gx, gx.stride(0), Mb, HD, HK, D,
            1.0 / (kap_scale * zw["scale"]), float(coef), float(eps))
    return (n, triton.cdiv(Mb, meta["BM"])), args, meta
