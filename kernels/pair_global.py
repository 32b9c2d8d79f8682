"""The pairwise global score (spec §3, the paper's eqs. 7–12) of many pairs, fused.

For pair p = (image i, text j) the tile kernel (:mod:`kernels.tiles`) writes
κ_p = concat_h(ā_h Kw_h) and λ_p = concat_h(b̄_h Kv_h), (H·DH,) each. Here, per pair,

    W_g = κ_p Zw,   V_g = σ ⊙ (λ_p Zv) + gx_i,   S[i, col_j] += coef · cos(V_g, W_g)

with Zw, Zv (H·DH, D), the cosine's denominator ‖V_g‖·‖W_g‖ clamped at eps.

Why a kernel: done with two GEMMs and torch's elementwise ops, every pair's V_g and W_g
went to memory in fp32 (8 KiB per pair at D = 1024; 8 GiB per launch of 2^20 pairs) and
were read back by the scaling, the product, its sum and the two norms: ~60 KiB of memory
traffic per pair, ~1.6 s of the COCO 5K × 25K grid at the H200's 4.8 TB/s (an estimate,
not measured). Here a program holds BM pairs and walks D in chunks of BN columns; both
products of a chunk accumulate in registers (K-loop over H·DH) and each chunk is reduced at
once to three numbers per pair (V·W, ‖V‖², ‖W‖²). What leaves the chip is κ and λ, read
once, and one entry of S per pair; κ and λ are read again from L2 once per chunk of D and
Zw, Zv (2 × 2 MiB in bf16, L2-resident) once per program (bench/kernel_report.py counts it).

Precision: 16-bit κ, λ take Zw, Zv in their dtype with fp32 accumulation (the torch version
rounded V_g and W_g to bf16 on top). fp32 κ, λ (the tiles' fp32 path, which writes them
scaled by its power of two σ, within ±2^13) run the tiles' ``f16x3`` dots: κ is split into
an fp16 pair in registers, Zw and Zv are fp16 pairs split once on the host
(``tiles.split16_planes``), and the products are undone by the scales after the K-loop.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .tiles import _dot3, _lo_plane, _operand, lo_plane_offset, split16_planes, split16_scale


@triton.jit
def _chunk_product(a, z_ptr, lo_z, k, n, HD, D, acc, DOT_PREC: tl.constexpr):
    """acc + a (BM, BK) @ Z[k, n] (BK, BN): a in κ's dtype (fp32 under f16x3: split here into
    an fp16 pair), Z's block (and its lo plane under f16x3) loaded here."""
    F16X3: tl.constexpr = DOT_PREC == "f16x3"
    z_in = (k < HD)[:, None] & (n < D)[None, :]
    z_off = k[:, None] * D + n[None, :]
    z = tl.load(z_ptr + z_off, mask=z_in, other=0.0)
    z_lo = _lo_plane(z_ptr + lo_z + z_off, z_in, z, F16X3)
    a_hi, a_lo = _operand(a, z.dtype, F16X3)
    return _dot3(a_hi, a_lo, z, z_lo, acc, DOT_PREC)


@triton.jit
def _chunk_reduce(acc_w, acc_v, n, img, i_lo, i_hi, sigma_ptr, gx_ptr, stride_gx, D, unscale_w, unscale_v, vw, vv, ww):
    """Columns n of W_g = acc_w·unscale_w and V_g = σ ⊙ acc_v·unscale_v + gx of each pair's
    image, added to the running (BM,) V·W, ‖V‖², ‖W‖². The block's pairs belong to images
    i_lo..i_hi (two at most where a bucket holds BM texts or more): gx is added one image row
    at a time, where a gather per element held a 64-bit address per pair and column."""
    n_in = n < D
    sig = tl.load(sigma_ptr + n, mask=n_in, other=0.0)
    v = acc_v * (sig * unscale_v)[None, :]
    gx_lo = gx_ptr + i_lo.to(tl.int64) * stride_gx
    for r in range(0, i_hi - i_lo + 1):
        g = tl.load(gx_lo + r * stride_gx + n, mask=n_in, other=0.0)
        v += tl.where((img - i_lo == r)[:, None], g[None, :], 0.0)
    w = acc_w * unscale_w
    return vw + tl.sum(v * w, axis=1), vv + tl.sum(v * v, axis=1), ww + tl.sum(w * w, axis=1)


@triton.jit(do_not_specialize=["stride_sn", "stride_sm", "P", "Mb"])
def _pair_global_kernel(
    S_ptr, stride_sn, stride_sm, col_ptr,
    kap_ptr, lam_ptr, zw_ptr, zv_ptr, lo_z, sigma_ptr, gx_ptr, stride_gx,
    P, Mb, HD, D, unscale_w, unscale_v, coef, eps,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (cdiv(P, BM),). Pair p = i·Mb + j is row p of κ, λ (P, HD) contiguous, entry
    (i, col_ptr[j]) of S (int32 columns). Zw, Zv (HD, D) contiguous: fp16 hi planes with
    their lo planes lo_z elements further on under DOT_PREC "f16x3" (κ, λ fp32 then),
    else in κ's dtype. The products times unscale_w / unscale_v are κ Zw and λ Zv.
    sigma (D,) fp32; gx (P / Mb, D) fp32, row stride stride_gx; coef = 1 - u2."""
    pid = tl.program_id(0)
    p = pid * BM + tl.arange(0, BM)
    p_in = p < P
    img = p // Mb
    i_lo = (pid * BM) // Mb
    i_hi = (tl.minimum(pid * BM + BM, P) - 1) // Mb
    p64 = p.to(tl.int64)
    kk = tl.arange(0, BK)
    nn = tl.arange(0, BN)
    vw = tl.zeros((BM,), dtype=tl.float32)
    vv = tl.zeros((BM,), dtype=tl.float32)
    ww = tl.zeros((BM,), dtype=tl.float32)
    for n0 in range(0, D, BN):
        n = n0 + nn
        acc_w = tl.zeros((BM, BN), dtype=tl.float32)
        acc_v = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, HD, BK):
            k = k0 + kk
            a_in = p_in[:, None] & (k < HD)[None, :]
            a = tl.load(kap_ptr + p64[:, None] * HD + k[None, :], mask=a_in, other=0.0)
            acc_w = _chunk_product(a, zw_ptr, lo_z, k, n, HD, D, acc_w, DOT_PREC)
            b = tl.load(lam_ptr + p64[:, None] * HD + k[None, :], mask=a_in, other=0.0)
            acc_v = _chunk_product(b, zv_ptr, lo_z, k, n, HD, D, acc_v, DOT_PREC)
        vw, vv, ww = _chunk_reduce(acc_w, acc_v, n, img, i_lo, i_hi, sigma_ptr, gx_ptr, stride_gx, D, unscale_w,
                                   unscale_v, vw, vv, ww)
    cos = vw / tl.maximum(tl.sqrt(vv) * tl.sqrt(ww), eps)
    col = tl.load(col_ptr + (p - img * Mb), mask=p_in, other=0).to(tl.int64)
    at = S_ptr + img.to(tl.int64) * stride_sn + col * stride_sm
    tl.store(at, tl.load(at, mask=p_in, other=0.0) + coef * cos, mask=p_in)


# --------------------------------------------------------------------------- host side

import os  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PAIRS_PER_PROGRAM = 128


def pair_global_meta(dtype: torch.dtype, interpret: bool = _INTERPRET) -> dict:
    """Constexprs and launch options of :func:`_pair_global_kernel` for κ's dtype (also used by
    bench/kernel_report.py). Offline sm_90 build, triton 3.9 and 3.6, three stages, no spills:
    16-bit, 128 pairs × 128 columns of D, K steps of 64 (253–255 registers, 193 KiB of shared
    memory); fp32, whose Zw and Zv come as fp16 pairs, 128 × 64, K steps of 32 (208–214
    registers, 113 KiB): at 128 columns it spilled 56–68 B. Wider chunks read κ and λ from L2
    fewer times (once per chunk)."""
    split = dtype == torch.float32
    if interpret:  # small blocks: the interpreter's cost grows with them
        return dict(BM=16, BN=16, BK=16, DOT_PREC="f16x3" if split else "tf32", num_warps=4, num_stages=1)
    return dict(BM=PAIRS_PER_PROGRAM, BN=64 if split else 128, BK=32 if split else 64,
                DOT_PREC="f16x3" if split else "tf32", num_warps=8, num_stages=3)


def z_operands(Zw: torch.Tensor, Zv: torch.Tensor, dtype: torch.dtype) -> dict:
    """Zw, Zv (HD, D) fp32 as the kernel takes them for κ, λ of ``dtype``: in that dtype, or for
    fp32 as fp16 pairs scaled by a power of two each (``scale_w``, ``scale_v``; their lo planes
    ``lo_z`` elements on). Made once per set of weights (tiles.plan_tiles keeps them): the fp32
    split reads each matrix's largest magnitude back to the host, which would stall the
    queue of launches if done per launch."""
    if dtype == torch.float32:
        sw, sv = (split16_scale(float(z.abs().max())) for z in (Zw, Zv))
        zw = split16_planes(Zw, sw)
        return dict(dtype=dtype, zw=zw, zv=split16_planes(Zv, sv), lo_z=lo_plane_offset(zw[0]), scale_w=sw, scale_v=sv)
    return dict(dtype=dtype, zw=Zw.to(dtype).contiguous(), zv=Zv.to(dtype).contiguous(), lo_z=0, scale_w=1.0,
                scale_v=1.0)


def add_pair_global(S: torch.Tensor, col: torch.Tensor, kap: torch.Tensor, lam: torch.Tensor, Zw: torch.Tensor,
                    Zv: torch.Tensor, sigma: torch.Tensor, gx: torch.Tensor, coef: float, eps: float, *,
                    kap_scale: float = 1.0, lam_scale: float = 1.0, z: Optional[dict] = None) -> torch.Tensor:
    """S[i, col[j]] += coef · cos(σ ⊙ (λ_p Zv) + gx_i, κ_p Zw) for every pair p = i·Mb + j;
    S updated in place and returned.

    S (n, ≥ max(col) + 1) fp32, any strides; col (Mb,) int32 distinct columns; kap, lam
    (n·Mb, HD) bf16, fp16 or fp32 holding kap_scale·κ and lam_scale·λ (fp32: within ±2^13,
    as the tiles' fp32 path writes them: they are split into fp16 pairs); Zw, Zv (HD, D)
    fp32; sigma (D,) fp32; gx (n, D) fp32; z: :func:`z_operands` of Zw, Zv for κ's dtype,
    when the caller keeps them (else made here). Nothing outside the n × Mb entries named is
    written."""
    launch = global_launch(S, col, kap, lam, Zw, Zv, sigma, gx, coef, eps, kap_scale=kap_scale, lam_scale=lam_scale,
                           z=z)
    if launch is not None:
        grid, args, kwargs = launch
        _pair_global_kernel[grid](*args, **kwargs)
    return S


def global_launch(S, col, kap, lam, Zw, Zv, sigma, gx, coef, eps, *, kap_scale=1.0, lam_scale=1.0, z=None):
    """(grid, args, kwargs) of :func:`add_pair_global`'s launch (its arguments checked), or
    None when there is no pair; also what ``tiles.compile_ahead`` builds ahead."""
    n, Mb = S.shape[0], col.shape[0]
    P, HD = kap.shape
    D = Zw.shape[1]
    if P != n * Mb or lam.shape != kap.shape or Zw.shape != (HD, D) or Zv.shape != (HD, D):
        raise ValueError(f"add_pair_global: kap/lam {tuple(kap.shape)}/{tuple(lam.shape)} must be (n*Mb, HD) = "
                         f"({n}*{Mb}, HD), Zw/Zv {tuple(Zw.shape)}/{tuple(Zv.shape)} (HD, D)")
    if sigma.shape != (D,) or gx.shape != (n, D):
        raise ValueError(f"add_pair_global: sigma {tuple(sigma.shape)} must be ({D},), gx {tuple(gx.shape)} ({n}, {D})")
    if z is not None and z["dtype"] != kap.dtype:
        raise ValueError(f"add_pair_global: z was made for {z['dtype']}, kap is {kap.dtype}")
    if P == 0:
        return None
    meta = pair_global_meta(kap.dtype)
    z = z_operands(Zw, Zv, kap.dtype) if z is None else z
    gx = gx.float()
    args = (S, S.stride(0), S.stride(1), col, kap.contiguous(), lam.contiguous(), z["zw"], z["zv"], z["lo_z"],
            sigma.float().contiguous(), gx, gx.stride(0), P, Mb, HD, D, 1.0 / (kap_scale * z["scale_w"]),
            1.0 / (lam_scale * z["scale_v"]), float(coef), float(eps))
    return (triton.cdiv(P, meta["BM"]),), args, meta
