"""Kernel v2: tiles of (image, text) pairs (spec §3, §8; issue 10).

One program scores a tile of ``GI`` images × ``GT`` texts. Images are packed back to
back (``GI·K`` region rows, padded to ``BR``), texts come from one length bucket
(``GT·LB`` token rows, ``BC = GT·LB``). Per head, every product is ONE tile-sized
``tl.dot`` (BR × BC × d on a GPU: 128 × 128 × 128, wgmma on Hopper), and the
per-pair structure lives only in *segmented* reductions: a text's tokens are a
contiguous segment of LB columns (``tl.reshape`` to (.., GT, LB)), an image's regions
a segment of K rows (``GI`` masked passes; K = 36 is not a power of two, and the
layout pads it to 40 masked rows, :func:`image_rows`).

Block-diagonal Γ (z_o absent; the ``acf-code`` variant), ``FULL=False`` of :func:`_tile_kernel`.

    X   = Qv_h Kwᵀ_h                   (BR, BC)  i2t logits, all 24 pairs of the tile at once
    p   = exp(s·X − segment max)       per (region row, text) segment of LB columns
    num += Σ_seg p ⊙ (Ov_h Kwᵀ_h) / Σ_seg p
    Y   = p · Γw_blk                   (BR, BC)  Γw_blk = the texts' Kw_h Kwᵀ_h, zero between texts
                                                 (8 texts of 16: one (BR, LB) · (LB, LB) per text, batched_gw;
                                                 4 of 32: one product per column half, half_gw)
    nrm += Σ_seg p ⊙ Y / (Σ_seg p)²    = a Γw aᵀ with a = p / Σ p (spec §8)

and the mirror image for words -> regions (queries = text tokens, segments = images).
Γ is computed once per item, as spec §8 has it (``precompute_items``: Γw_h = Kw_h Kwᵀ_h
per text, Γv_h per image), and each tile gathers the blocks of its texts and images
(zero between items) instead of recomputing them from its key tiles: that was a third
of the tile's tensor-core work (BC²·d + BR²·d per head), for ~110 KB more read per tile
(bf16: 8 texts × 8 heads × 16² + 3 images × 8 heads × 40², against ~1 MB of features).
The unnormalised p goes into the Γ product (cast to the storage dtype like flash
attention's P·V) and the segment sums divide afterwards, so no normalised A is ever formed.

Softmax maxima are taken per segment (never over a whole tile row): a text whose
logits are all far below another text's in the same row would otherwise underflow.

fp32 inputs (``DOT_PREC="f16x3"``): the host holds every tile tensor as an fp16 pair,
x = hi + lo/2048 after a power-of-two scale per side (:func:`split16_planes`; the lo plane
follows the hi plane, ``lo_*`` elements on), and every product is three fp16 products
(:func:`_dot3`): tf32x3's ~22 bits at fp16's tensor-core rate, with no operand split in
registers but the softmax weights' (:func:`_operand`). The scales reach the tile through
its softmax scales, norms and cosine clamp (:func:`launch_tiles`).

Full Γ (the ``paper`` variant): see :func:`_full_tile_kernel`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .interpreter import INTERPRET as _INTERPRET  # importing it also fixes triton 3.6's interpreter

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
# The logit bias of an invalid key (mask mode "bias" of :func:`_tile_kernel`): -2^80, exact
# in bf16, so far below any logit that its softmax weight is exactly 0 for every softmax scale
# the launcher lets it serve (:func:`mask_bias_scale_ok`), and finite, so no inf - inf anywhere.
MASK_BIAS: tl.constexpr = tl.constexpr(-1.2089258196146292e24)
# The bias product in bf16 on a GPU; the interpreter multiplies bf16 operands as their raw bits
# (triton-lang/triton#11584, "not supported yet"), so there in fp32, exact for 0, 1 and -2^80 alike.
_BIAS_BF16: tl.constexpr = tl.constexpr(not _INTERPRET)


@triton.jit
def _seg_softmax_cols(x, valid3, c, BR: tl.constexpr, GT: tl.constexpr, LB: tl.constexpr, MODE: tl.constexpr):
    """x (BR, GT*LB) fp32 logits; valid3 (1, GT, LB) bool; c = s·log2(e); MODE how invalid
    columns are masked (:func:`mask_mode`): "select" (c > 0), "signed" (c of any sign: scaled
    first, one FMUL per logit more) or "bias" (c > 0; x already carries the keys' mask bias,
    :func:`_add_mask_bias`: no select, valid3 unused, and every segment's sum is at least 1,
    its largest weight being exp2(0), so no guard either).

    Returns (p (BR, GT, LB) fp32 unnormalised exp2 weights, 0 at invalid columns;
    inv (BR, GT) fp32 the reciprocals of the segment sums, 1 where a segment has no valid
    column). One reciprocal per segment: its users multiply, where a division per use was
    a range check, a reciprocal and a fix-up each."""
    x3 = tl.reshape(x, (BR, GT, LB))
    if MODE == "signed":
        x3 = tl.where(valid3, x3 * c, float("-inf"))
        m = tl.max(x3, axis=2)
        p = tl.exp2(x3 - tl.where(m == float("-inf"), 0.0, m)[:, :, None])
    else:
        if MODE == "select":
            x3 = tl.where(valid3, x3, float("-inf"))
            m = tl.max(x3, axis=2)
            m = tl.where(m == float("-inf"), 0.0, m * c)
        else:
            m = tl.max(x3, axis=2) * c
        p = tl.exp2(x3 * c - m[:, :, None])  # one FFMA; 0 at invalid columns (-inf, or x ~ MASK_BIAS)
    ssum = tl.sum(p, axis=2)
    if MODE == "bias":
        return p, 1.0 / ssum
    else:
        return p, 1.0 / tl.where(ssum > 0.0, ssum, 1.0)


@triton.jit
def _add_mask_bias(x, mask_ptr, idx, idx_in):
    """x (R, C) fp32 logits + MASK_BIAS at every invalid key column: the columns' int8 mask is
    read at mask_ptr + idx (C,) where idx_in, and a column outside (idx_in False) counts as
    invalid. One K = 16 tensor-core product (a ones column times the bias row) adds it to the
    accumulator: per element that replaces a select and the extraction of its predicate from
    the packed mask, which the offline sm_90 build issued one LOP3 each for (64 mask bits per
    thread do not fit the 7 predicate registers)."""
    k16 = tl.arange(0, 16)
    ones = tl.where(k16[None, :] == 0, 1.0, 0.0) + tl.zeros((x.shape[0], 16), dtype=tl.float32)
    valid = tl.load(mask_ptr + idx[None, :] + 0 * k16[:, None], mask=idx_in[None, :] & (k16 == 0)[:, None], other=0)
    bias = tl.where((valid == 0) & (k16 == 0)[:, None], MASK_BIAS, 0.0)
    if _BIAS_BF16:
        return tl.dot(ones.to(tl.bfloat16), bias.to(tl.bfloat16), x)
    else:
        return tl.dot(ones, bias, x, input_precision="ieee")


@triton.jit
def _operand(x, ST: tl.constexpr, F16X3: tl.constexpr):
    """x fp32 made in the kernel (softmax weights, their means) -> (hi, lo) dot operands.
    F16X3: the fp16 pair x = hi + lo / 2048 (~2^-22 relative, :func:`split16_planes`' split;
    x in [0, 1] needs no scaling); else (x in ST, the same)."""
    if F16X3:
        hi = x.to(tl.float16)
        return hi, ((x - hi.to(tl.float32)) * 2048.0).to(tl.float16)
    else:
        y = x.to(ST)
        return y, y


@triton.jit
def _lo_plane(ptr, mask, hi, F16X3: tl.constexpr):
    """F16X3: the lo plane of an fp16 pair, loaded at ``ptr`` (the hi plane's pointers plus its
    lo offset); else ``hi`` itself (:func:`_dot3` then ignores it)."""
    if F16X3:
        return tl.load(ptr, mask=mask, other=0.0)
    else:
        return hi


@triton.jit
def _lo_plane_all(ptr, hi, F16X3: tl.constexpr):
    """:func:`_lo_plane` of a load without mask."""
    if F16X3:
        return tl.load(ptr)
    else:
        return hi


@triton.jit
def _dot3(a_hi, a_lo, b_hi, b_lo, acc, DOT_PREC: tl.constexpr):
    """acc + a @ b (acc None: a @ b), fp32 accumulation. ``f16x3``: operands held as fp16
    pairs (a = a_hi + a_lo / 2048), three fp16 products (a_lo·b_lo, ~2^-22 relative,
    dropped), the two small ones into acc·2048 so that one accumulator is live (powers of
    two: exact); else one product of a_hi, b_hi at DOT_PREC (a_lo, b_lo unused)."""
    if DOT_PREC == "f16x3":
        if acc is None:
            acc = tl.dot(a_hi, b_lo)
        else:
            acc = tl.dot(a_hi, b_lo, acc * 2048.0)
        acc = tl.dot(a_lo, b_hi, acc)
        return tl.dot(a_hi, b_hi, acc * (1.0 / 2048.0))
    else:
        return tl.dot(a_hi, b_hi, acc, input_precision=DOT_PREC)


@triton.jit
def _form_operands(att, att_lo, rows, RS: tl.constexpr, SEG: tl.constexpr, NX: tl.constexpr, gam, gam_lo,
                   GS: tl.constexpr, item_in, TILE: tl.constexpr, F16X3: tl.constexpr, ck, cn):
    """Chunk k (columns ck) of the attention x, (R, QC), and block (k, n) of Γ, (QC, QC), each
    with its F16X3 lo plane (:func:`_gamma_form`)."""
    x_in = (ck < NX)[None, :]
    x = tl.load(att + (ck // SEG)[None, :] * (2 * TILE) + rows[:, None] * RS + (ck % SEG)[None, :], mask=x_in,
                other=0.0)
    x_lo = _lo_plane(att_lo + (ck // SEG)[None, :] * (2 * TILE) + rows[:, None] * RS + (ck % SEG)[None, :], x_in,
                     x, F16X3)
    g_in = ((ck < GS) & item_in)[:, None]
    g = tl.load(gam + ck[:, None] * GS + cn[None, :], mask=g_in, other=0.0)
    g_lo = _lo_plane(gam_lo + ck[:, None] * GS + cn[None, :], g_in, g, F16X3)
    return x, x_lo, g, g_lo


@triton.jit
def _form_column(att, att_lo, rows, RS: tl.constexpr, SEG: tl.constexpr, NX: tl.constexpr, gam, gam_lo,
                 GS: tl.constexpr, item_in, QC: tl.constexpr, TILE: tl.constexpr, F16X3: tl.constexpr,
                 DOT_PREC: tl.constexpr, nc, y):
    """Σ_columns (2 y + x_n Γ_nn) ⊙ x_n for chunk n = nc, y = Σ_{k<n} x_k Γ_kn: (R,) fp32
    (:func:`_gamma_form`)."""
    cn = nc * QC + tl.arange(0, QC)
    xn, xn_lo, gn, gn_lo = _form_operands(att, att_lo, rows, RS, SEG, NX, gam, gam_lo, GS, item_in, TILE, F16X3, cn, cn)
    y = _dot3(xn, xn_lo, gn, gn_lo, y * 2.0, DOT_PREC)
    xf = xn.to(tl.float32)
    if F16X3:
        xf += xn_lo.to(tl.float32) * (1.0 / 2048.0)
    return tl.sum(y * xf, axis=1)


@triton.jit
def _gamma_form(att, att_lo, rows, RS: tl.constexpr, SEG: tl.constexpr, NX: tl.constexpr, gam, gam_lo, GS: tl.constexpr,
                item_in, QC: tl.constexpr, TILE: tl.constexpr, F16X3: tl.constexpr, DOT_PREC: tl.constexpr):
    """x Γ xᵀ for each row of one item's attention x, the heads coupled (full Γ, phase B of
    :func:`_tile_kernel`): (R,) fp32 for the R = rows.shape[0] query rows.

    att (att_lo: its F16X3 lo plane): scalar pointer to the item's first column in this
    program's scratch slot, where x[i, h*SEG + l] sits at h·2·TILE + rows[i]·RS + l; NX = H·SEG
    columns exist. gam (gam_lo) the item's (GS, GS) Γ, zero-padded beyond NX; item_in (QC,)
    bool whether the item exists.

    Chunks of QC columns, and only Γ's upper triangle of chunks: Γ = P Pᵀ is symmetric
    (acf_fast.precompute), so with y_n = 2 Σ_{k<n} x_k Γ_kn + x_n Γ_nn, x Γ xᵀ = Σ_n Σ y_n ⊙ x_n,
    and x_n serves both the diagonal product and the last one: NC(NC+1)/2 chunk products and
    reads of x where the whole square took NC² products and NC² + NC reads (COCO's images,
    NC = 5: 15 of 25 and 15 of 30). Up to two chunks the loops are unrolled: a loop whose
    inner loop runs at most once is compiled to a branch, whose work the offline report
    (bench/kernel_report.py) cannot count. (Pointers are formed as pointer + each offset
    term: int32 offsets summed first cost the bf16 paper build 6 % more instructions per pair.)"""
    NC: tl.constexpr = GS // QC
    out = tl.zeros((rows.shape[0],), dtype=tl.float32)
    if NC <= 2:
        for nc in tl.static_range(NC):
            cn = nc * QC + tl.arange(0, QC)
            y = tl.zeros((rows.shape[0], QC), dtype=tl.float32)
            for kc in tl.static_range(nc):
                xk, xk_lo, gk, gk_lo = _form_operands(att, att_lo, rows, RS, SEG, NX, gam, gam_lo, GS, item_in, TILE,
                                                      F16X3, kc * QC + tl.arange(0, QC), cn)
                y = _dot3(xk, xk_lo, gk, gk_lo, y, DOT_PREC)
            out += _form_column(att, att_lo, rows, RS, SEG, NX, gam, gam_lo, GS, item_in, QC, TILE, F16X3, DOT_PREC, nc, y)
    else:
        for nc in range(NC):
            cn = nc * QC + tl.arange(0, QC)
            y = tl.zeros((rows.shape[0], QC), dtype=tl.float32)
            for kc in range(nc):
                xk, xk_lo, gk, gk_lo = _form_operands(att, att_lo, rows, RS, SEG, NX, gam, gam_lo, GS, item_in, TILE,
                                                      F16X3, kc * QC + tl.arange(0, QC), cn)
                y = _dot3(xk, xk_lo, gk, gk_lo, y, DOT_PREC)
            out += _form_column(att, att_lo, rows, RS, SEG, NX, gam, gam_lo, GS, item_in, QC, TILE, F16X3, DOT_PREC, nc, y)
    return out


@triton.jit
def _p_gamma_halves(p, gam, lo_gam, texts_left, ST: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                    LB: tl.constexpr, H: tl.constexpr, F16X3: tl.constexpr, DOT_PREC: tl.constexpr):
    """p Γw_blk, (BR, BC) fp32, for p (BR, GT, LB) fp32, as two products of its column halves,
    each against its half of the block-diagonal Γw_blk (:func:`_tile_kernel`), which is zero
    between the halves: half the tensor-core work of one (BR, BC) x (BC, BC) product. gam
    (lo_gam: its F16X3 lo plane's offset): the Γw_h block (LB, LB) of the tile's first text,
    the next texts' H·LB² elements apart; texts_left: the bucket's texts from the tile's
    first on (blocks beyond them read as zeros)."""
    HB: tl.constexpr = BC // 2
    TH: tl.constexpr = HB // LB  # texts per half
    ch = tl.arange(0, HB)
    t = ch // LB
    l = ch - t * LB
    off = (t * (H * LB * LB) + l * LB)[:, None] + l[None, :]
    same = t[:, None] == t[None, :]
    left = texts_left.to(tl.int32)
    a_in = same & (t < left)[:, None]
    b_in = same & ((t + TH) < left)[:, None]
    ga = tl.load(gam + off, mask=a_in, other=0.0)
    ga_lo = _lo_plane(gam + lo_gam + off, a_in, ga, F16X3)
    gb_at = gam + TH * (H * LB * LB)
    gb = tl.load(gb_at + off, mask=b_in, other=0.0)
    gb_lo = _lo_plane(gb_at + lo_gam + off, b_in, gb, F16X3)
    pa, pb = tl.split(tl.permute(tl.reshape(p, (BR, 2, HB)), (0, 2, 1)))
    pa_hi, pa_lo = _operand(pa, ST, F16X3)
    pb_hi, pb_lo = _operand(pb, ST, F16X3)
    ya = _dot3(pa_hi, pa_lo, ga, ga_lo, None, DOT_PREC)
    yb = _dot3(pb_hi, pb_lo, gb, gb_lo, None, DOT_PREC)
    return tl.reshape(tl.permute(tl.join(ya, yb), (0, 2, 1)), (BR, BC))


@triton.jit
def _quad_partials(x, BR: tl.constexpr, GT: tl.constexpr, LB: tl.constexpr):
    """x (BR, GT, LB) fp32 -> (BR, GT, 4): each text's sum over its LB columns, kept in four
    partial sums by (column % 8) // 2, the lane of its quad that holds the column in the
    tensor-core accumulator layout. The sum is then within each thread, with no shuffle:
    accumulated over the heads, the partials are added once per tile."""
    return tl.sum(tl.sum(tl.reshape(x, (BR, GT, LB // 8, 4, 2)), axis=4), axis=2)


@triton.jit
def _i2t_norms(nrm, BATCHED_GW: tl.constexpr):
    """The regions -> words accumulator of the squared norms -> (BR, GT): (GT, BR) batched, else
    (BR, GT, 4) quad partials."""
    if BATCHED_GW:
        return tl.trans(nrm)
    else:
        return tl.sum(nrm, axis=2)


@triton.jit
def _image_counts(vmask_ptr, i0, N, slot_i, GI: tl.constexpr, K: tl.constexpr):
    """(GIP,) fp32: valid regions of each image slot of the tile (at least 1), the regions ->
    words means' denominators. Derived where they are used: computed at the tile's start, they
    were live through the loop over the heads and spilled (offline sm_90 build)."""
    kk = tl.arange(0, triton.next_power_of_2(K))
    g_in = (slot_i < GI) & (slot_i < (N - i0).to(tl.int32))
    m2 = tl.load((vmask_ptr + i0 * K) + slot_i[:, None] * K + kk[None, :], mask=g_in[:, None] & (kk < K)[None, :],
                 other=0)
    return tl.maximum(tl.sum((m2 != 0).to(tl.float32), axis=1), 1.0)


@triton.jit
def _seg_softmax_rowsegs(x, seg, valid, c, GI: tl.constexpr, GIP: tl.constexpr, MODE: tl.constexpr):
    """x (BC, BR) fp32 logits; seg (BR,) int32 image slot of each column; valid (BR,) bool;
    c = s·log2(e); MODE as :func:`_seg_softmax_cols` ("bias": valid unused). Segments are the
    GI images of the tile (K columns each, not a power of two, hence masked passes).

    Returns (p (BC, BR) unnormalised, 0 at invalid columns, and with the bias also at the
    tile's padded rows beyond its GI images, in no segment (m = 0 there), which Γv's zero
    rows then meet in the B·Γv product; inv (BC, GIP) the reciprocals of the segment sums,
    1 where a segment has no valid column, as in the slots beyond GI)."""
    if MODE == "signed":
        xm = tl.where(valid[None, :], x * c, float("-inf"))
    elif MODE == "select":
        xm = tl.where(valid[None, :], x, float("-inf"))
    else:
        xm = x
    m_el = tl.zeros_like(x)
    for g in tl.static_range(GI):
        in_g = (seg == g)[None, :]
        mg = tl.max(tl.where(in_g, xm, float("-inf")), axis=1)
        if MODE == "signed":
            mg = tl.where(mg == float("-inf"), 0.0, mg)
        elif MODE == "select":
            mg = tl.where(mg == float("-inf"), 0.0, mg * c)
        else:
            mg = mg * c
        m_el = tl.where(in_g, mg[:, None], m_el)
    if MODE == "signed":
        p = tl.exp2(xm - m_el)
    else:
        p = tl.exp2(xm * c - m_el)  # exp2(-inf) = 0 at invalid columns
    ssum = _seg_sum_cols(p, seg, GI, GIP)
    return p, 1.0 / tl.where(ssum > 0.0, ssum, 1.0)


@triton.jit
def _seg_sum_cols(x, seg, GI: tl.constexpr, GIP: tl.constexpr):
    """x (R, BR) -> (R, GIP): sums over the columns of each image slot g < GI (0 beyond)."""
    slot = tl.arange(0, GIP)
    out = tl.zeros((x.shape[0], GIP), dtype=tl.float32)
    for g in tl.static_range(GI):
        sg = tl.sum(tl.where((seg == g)[None, :], x, 0.0), axis=1)
        out = tl.where(slot[None, :] == g, sg[:, None], out)
    return out


@triton.jit
def _i2t_means(num, nrm, vn, v_valid, img_r, cnt, eps, GI: tl.constexpr, GIP: tl.constexpr):
    """num, nrm (BR, GT) regions -> words numerators and squared norms; vn (BR,) region
    norms; cnt (GIP,) valid regions per image slot. Returns (GIP, GT): the mean over each
    image's valid regions of their cosines."""
    cos = num / tl.maximum(vn[:, None] * tl.sqrt(nrm), eps)
    cos = tl.where(v_valid[:, None], cos, 0.0)
    slot = tl.arange(0, GIP)
    out = tl.zeros((GIP, num.shape[1]), dtype=tl.float32)
    for g in tl.static_range(GI):
        sg = tl.sum(tl.where((img_r == g)[:, None], cos, 0.0), axis=0)
        out = tl.where(slot[:, None] == g, sg[None, :], out)
    return out / cnt[:, None]


@triton.jit
def _tile_masks(vmask_ptr, wmask_ptr, i0, t0, N, Mb, r, img_r, c, txt_c, GI: tl.constexpr, K: tl.constexpr,
                LB: tl.constexpr):
    """The tile's region rows and token columns that exist (row_in, col_in) and are valid
    (v_valid, w_valid), all (BR,) / (BC,) bool. Per-row quantities in int32 against scalar
    bounds: int64 row vectors (one per layout they are used in) were the largest loop
    invariants of the sm_90 build."""
    row_in = (r < GI * K) & (img_r < (N - i0).to(tl.int32))
    v_valid = row_in & (tl.load((vmask_ptr + i0 * K) + r, mask=row_in, other=0) != 0)
    col_in = txt_c < (Mb - t0).to(tl.int32)
    w_valid = col_in & (tl.load((wmask_ptr + t0 * LB) + c, mask=col_in, other=0) != 0)
    return row_in, v_valid, col_in, w_valid


@triton.jit
def _s_block(S_ptr, stride_sn, stride_sm, wcol_ptr, i0, t0, N, Mb, GI: tl.constexpr, GIP: tl.constexpr,
             GT: tl.constexpr):
    """Pointers (GIP, GT) to the tile's entries of S (text columns in the caller's order) and
    the mask of those that exist."""
    slot_i = tl.arange(0, GIP)
    img = i0 + slot_i
    txt = t0 + tl.arange(0, GT)
    txt_in = txt < Mb
    col = tl.load(wcol_ptr + txt, mask=txt_in, other=0).to(tl.int64)
    return (S_ptr + img[:, None] * stride_sn + col[None, :] * stride_sm,
            ((slot_i < GI) & (img < N))[:, None] & txt_in[None, :])


@triton.jit
def _tile_coords(tile, n_it, n_tt, GI: tl.constexpr, GT: tl.constexpr, GROUP_I: tl.constexpr):
    """Tile index -> (first image, first text of the bucket). Tiles come in groups of
    GROUP_I image tiles swept against every text tile, so a group's images stay in L2
    while the texts stream past (the matmul "swizzle")."""
    per_group = GROUP_I * n_tt
    first = (tile // per_group) * GROUP_I
    rows = tl.minimum(n_it - first, GROUP_I)
    it = first + (tile % per_group) % rows
    tt = (tile % per_group) // rows
    return it.to(tl.int64) * GI, tt.to(tl.int64) * GT


@triton.jit
def _image_means_per_pair(a, v_valid, img_r, txt_c, cnt_i, ST: tl.constexpr, PP: tl.constexpr, GI: tl.constexpr,
                          GIP: tl.constexpr, GT: tl.constexpr, DOT_PREC: tl.constexpr):
    """a (BR, BC) fp32 -> (PP, BC) fp32: row (g, j) holds the mean of a over image g's valid
    rows on text j's columns, 0 elsewhere. bf16/fp16 storage (ST), tf32 and ieee: one dot
    with the pairs' 0/1 image rows (a rounded to ST, as its scratch copy is); f16x3 (fp32
    features): masked column sums, exact in fp32 (the dot would need a split a; with
    tf32x3 it doubled the spill instructions of the offline sm_90 build)."""
    pg, pj, p_in = _pair_rows_mask(PP, GIP, GT)
    if DOT_PREC == "f16x3":
        slot = tl.arange(0, GIP)
        out = tl.zeros((PP, a.shape[1]), dtype=tl.float32)
        for g in tl.static_range(GI):
            colsum = tl.sum(tl.where((v_valid & (img_r == g))[:, None], a, 0.0), axis=0)
            cg = tl.sum(tl.where(slot == g, cnt_i, 0.0), axis=0)
            out = tl.where((pg == g)[:, None] & (txt_c[None, :] == pj[:, None]), (colsum / cg)[None, :], out)
    else:
        out = _pair_means_dot(a, pg, img_r, v_valid, pj, txt_c, p_in, cnt_i, GI, GIP, ST, DOT_PREC)
    return out


@triton.jit
def _pair_means_dot(x, own, own_seg, valid, other, other_seg, p_in, cnt, G: tl.constexpr, GP: tl.constexpr,
                    ST: tl.constexpr, DOT_PREC: tl.constexpr):
    """The dot form of :func:`_image_means_per_pair`: x (R, C)
    fp32 whose rows belong to segments own_seg (R,) with valid (R,), columns to segments
    other_seg (C,); pair row pr (own[pr], other[pr]), p_in (PP,) whether it exists; cnt (GP,)
    the valid rows per own segment (G used). Returns (PP, C): row pr holds the mean of x over
    own segment own[pr]'s valid rows on other segment other[pr]'s columns, 0 elsewhere.

    Formed transposed, xᵀ (C, R) times the 0/1 pair columns (R, PP): as (PP, R) x (R, C) the
    dot had PP = 64 rows (PAIR_ROWS then), one warp group's, and Triton has every warp group
    compute a dot that feeds another (κ, λ) in full, so it ran twice. Offline sm_90 build,
    paper bf16: 10 % fewer tensor-core multiply-adds per pair; triton 3.6 12.2 K -> 11.7 K
    warp-instructions per pair at bucket 16 (26.5 K -> 25.4 K at 32), 472 -> 356 B of
    spills; triton 3.9 12.3 K -> 12.1 K (26.8 K -> 26.0 K), 420 -> 600 B.
    """
    ind_t = ((own_seg[:, None] == own[None, :]) & valid[:, None] & p_in[None, :]).to(ST)  # (R, PP)
    sums = tl.trans(tl.dot(tl.trans(x.to(ST)), ind_t, input_precision=DOT_PREC))
    return tl.where(other_seg[None, :] == other[:, None], sums * _slot_values(1.0 / cnt, own, G, GP)[:, None], 0.0)


@triton.jit
def _slot_values(vals, idx, G: tl.constexpr, GP: tl.constexpr):
    """vals (GP,) fp32 per slot, idx (R,) int32 slot of each row -> (R,): vals[idx] (0 for
    idx >= G)."""
    slot = tl.arange(0, GP)
    out = tl.zeros(idx.shape, dtype=tl.float32)
    for g in tl.static_range(G):
        out = tl.where(idx == g, tl.sum(tl.where(slot == g, vals, 0.0), axis=0), out)
    return out


@triton.jit
def _pair_rows_mask(PP: tl.constexpr, GIP: tl.constexpr, GT: tl.constexpr):
    """Row pr of the (PP, ·) pair block is pair (image slot pr // GT, text slot pr % GT)."""
    pr = tl.arange(0, PP)
    return pr // GT, pr % GT, pr < GIP * GT


@triton.jit
def _store_pair_rows(ptr, vals, i0, t0, h, N, Mb, PP: tl.constexpr, GIP: tl.constexpr, GI: tl.constexpr,
                     GT: tl.constexpr, H: tl.constexpr, DH: tl.constexpr):
    """vals (PP, DH), row pr = pair (image slot pr // GT, text slot pr % GT), into head h's
    columns of the (pairs, H*DH) buffer at ``ptr`` (row = image * Mb + bucket text)."""
    pg, pj, p_in = _pair_rows_mask(PP, GIP, GT)
    prow = (i0 + pg) * Mb + t0 + pj
    ok = p_in & (pg < GI) & (i0 + pg < N) & (t0 + pj < Mb)
    d = tl.arange(0, DH)
    tl.store(ptr + prow[:, None] * (H * DH) + h * DH + d[None, :], vals.to(ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _store_text_means(ptr, vals, i0, t0, h, N, Mb, r, img_r, GI: tl.constexpr, GT: tl.constexpr, H: tl.constexpr,
                      K: tl.constexpr):
    """vals (GT, BR): row j text slot j's values on every region row r (image slot img_r),
    into head h's K columns of the (pairs, H*K) buffer at ``ptr`` (row = image * Mb + bucket
    text): pair (image slot img_r[r], text slot j) takes column h*K + its region."""
    j = tl.arange(0, GT)
    img = i0 + img_r  # (BR,) int64
    prow = img[None, :] * Mb + (t0 + j)[:, None]
    ok = ((t0 + j) < Mb)[:, None] & ((r < GI * K) & (img < N))[None, :]
    tl.store(ptr + prow * (H * K) + h * K + (r - img_r * K)[None, :], vals.to(ptr.dtype.element_ty), mask=ok)


# Sizes are not specialised (no recompile between a slice and the full grid, nor between
# buckets of different sizes); strides of the head-major layouts and the lo-plane offsets
# (always multiples of 16: lo_plane_offset) stay specialised so that the compiler can prove
# 16-byte row alignment and vectorise the tile loads. (Lo offsets of unknown alignment made
# every lo-plane element a 16-bit load: offline sm_90 build, acf-code fp32 bucket 16, 13.8 K
# warp-instructions per pair against 11.6 K.)
@triton.jit(do_not_specialize=["stride_sn", "stride_sm", "N", "Mb", "n_it", "n_tt"])
def _tile_kernel(
    S_ptr, stride_sn, stride_sm,
    # images (this launch's chunk): Q/Kk/O (H, ·, DH) views, head stride stride_vh; mask (n*K,) int8;
    # norm (n*K,) fp32; gam: FULL (n, HKP, HKP) Γv with rows h*K + k, else (n, H, K, K) the Γv_h blocks
    vq_ptr, vk_ptr, vo_ptr, stride_vh, vmask_ptr, vnorm_ptr, vgam_ptr,
    # texts of ONE length bucket: Q/Kk/O (H, Mb*LB, DH), head stride stride_wh (read under
    # I64_HEADS, else Mb*LB*DH); mask (Mb*LB,) int8; norm (Mb*LB,) fp32; col (Mb,) int32 S column
    # of each bucket text; gam: FULL (Mb, HL, HL) Γw with rows h*LB + l, else (Mb, H, LB, LB)
    # the Γw_h blocks
    wq_ptr, wk_ptr, wo_ptr, stride_wh, wmask_ptr, wnorm_ptr, wcol_ptr, wgam_ptr,
    # FULL: per-program scratch (programs, H, 2, BR*BC) storage dtype;
    # PAIRWISE: kap (n*Mb, H*DH) κ and bbar (n*Mb, H*K) b̄, storage dtype (fp32 under f16x3),
    # row = image*Mb + bucket text
    scratch_ptr, kap_ptr, bbar_ptr,
    # DOT_PREC "f16x3": element offsets from each fp16 hi plane to its lo plane (features of the
    # images, of the texts, their Γ); unused otherwise. FULL's scratch: its lo plane follows
    # the hi planes of all programs
    lo_v, lo_w, lo_gv, lo_gw,
    N, Mb, n_it, n_tt,  # images of this launch, bucket texts; their tile counts cdiv(N, GI), cdiv(Mb, GT)
    s_i2t, s_t2i, u1, u2, eps,
    H: tl.constexpr, DH: tl.constexpr, K: tl.constexpr, LB: tl.constexpr,
    GI: tl.constexpr, GIP: tl.constexpr, GT: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
    PP: tl.constexpr, HKP: tl.constexpr, QCV: tl.constexpr, QCW: tl.constexpr,
    FULL: tl.constexpr, SHARED_QK: tl.constexpr, O_IS_Q: tl.constexpr,
    PAIRWISE: tl.constexpr, EMBED: tl.constexpr, I64_HEADS: tl.constexpr,
    MASK_I2T: tl.constexpr, MASK_T2I: tl.constexpr,
    DOT_PREC: tl.constexpr, BATCHED_GW: tl.constexpr, HALF_GW: tl.constexpr, GROUP_I: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """S for tiles of GI images × GT texts; see the module docstring. Grid (programs,),
    each program walks tiles pid, pid + programs, ... (one tile each when the grid covers
    them all; FULL needs the per-program scratch, so its grid is capped).

    EMBED: S already holds (1 - u2) times the embedding global score (:func:`launch_tiles`
    writes it with one GEMM) and the tile adds u2 times the local score to it.

    MASK_I2T / MASK_T2I: how the direction keeps its invalid keys (tokens / regions) out of
    its softmax (:func:`mask_mode`): "bias", the logit MASK_BIAS from a K = 16 product
    (:func:`_add_mask_bias`); "select", a select per logit (softmax scale > 0); "signed",
    the same for a scale of any sign.

    The features are read without masks: the tile's rows beyond its images (rows past GI·K,
    images past N) and columns beyond its texts read what follows them, the next items or
    the zero slack the plan keeps after every feature tensor (:func:`read_slack`), never
    memory outside the plan. Those rows and columns are masked out of every result (features
    only meet in per-row and per-column products; the Γ tiles stay masked), and the loads lose
    the zeroing of their registers and their predicates: 5 % of the instructions per pair
    (offline sm_90 build, acf-code bf16, bucket 32)."""
    F16X3: tl.constexpr = DOT_PREC == "f16x3"
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    if FULL:
        # cdiv(N, GI) again: the argument n_it, read where it is used, made ptxas's allocation of
        # full Γ's tile spill 0-15 % more (offline sm_90 build); the block-diagonal one spills
        # less with it (acf-code bf16, bucket 16: 16 -> 8 B per thread)
        n_it = tl.cdiv(N, GI)
    n_tiles = n_it * n_tt
    HL: tl.constexpr = H * LB
    TILE: tl.constexpr = BR * BC
    slot = scratch_ptr + pid.to(tl.int64) * (H * 2 * TILE)
    slot_lo = slot + n_prog.to(tl.int64) * (H * 2 * TILE)  # F16X3: the lo plane of this program's slot

    r = tl.arange(0, BR)
    img_r = r // K  # image slot of each region row (K constexpr: a multiply-shift)
    c = tl.arange(0, BC)
    txt_c = c // LB
    d = tl.arange(0, DH)
    slot_i = tl.arange(0, GIP)
    tt = tl.arange(0, GT)
    c_i2t = s_i2t * LOG2E
    c_t2i = s_t2i * LOG2E
    v_off = r[:, None] * DH + d[None, :]  # int32, within a tile
    w_off = c[:, None] * DH + d[None, :]
    # block-diagonal Γ tiles: offsets of the text / image Gram blocks (int32, within a tile)
    l_c = c - txt_c * LB
    if BATCHED_GW:  # (GT, LB, LB): text j's Γw_h block
        lb = tl.arange(0, LB)
        gw_off = tt[:, None, None] * (H * LB * LB) + lb[None, :, None] * LB + lb[None, None, :]
    else:  # (BC, BC): the texts' blocks on the diagonal
        gw_off = (txt_c * (H * LB * LB) + l_c * LB)[:, None] + l_c[None, :]
    same_txt = txt_c[:, None] == txt_c[None, :]
    k_r = r - img_r * K
    same_img = img_r[:, None] == img_r[None, :]

    for tile in range(pid, n_tiles, n_prog):
        i0, t0 = _tile_coords(tile, n_it, n_tt, GI, GT, GROUP_I)
        row_in, v_valid, col_in, w_valid = _tile_masks(vmask_ptr, wmask_ptr, i0, t0, N, Mb, r, img_r, c, txt_c,
                                                       GI, K, LB)
        w_valid3 = tl.reshape(w_valid, (1, GT, LB))
        if BATCHED_GW:
            gw_in = ((t0 + tt) < Mb)[:, None, None]
        else:
            gw_in = same_txt & col_in[:, None]
        gv_in = same_img & row_in[:, None]
        v_first = i0 * (K * DH)  # int64 element offset of the tile's first region row
        w_first = t0 * (LB * DH)
        if PAIRWISE:  # the image means per pair need them in the loop over the heads
            cnt_i = _image_counts(vmask_ptr, i0, N, slot_i, GI, K)

        num_i = tl.zeros((BR, GT), dtype=tl.float32)
        if BATCHED_GW:  # (GT, BR): the batched dot's layout, texts first
            nrm_i = tl.zeros((GT, BR), dtype=tl.float32)
        else:
            # quad partials (_quad_partials): offline sm_90 build, bf16: -2 % instructions per
            # pair (the numerators kept the same way saved 1 % more, but made both head loops spill)
            nrm_i = tl.zeros((BR, GT, 4), dtype=tl.float32)
        num_t = tl.zeros((BC, GIP), dtype=tl.float32)
        nrm_t = tl.zeros((BC, GIP), dtype=tl.float32)
        # SPLIT: regions -> words in a first pass over the heads and words -> regions in a
        # second, instead of both in one. Each loop then holds one direction's accumulators
        # and masks: in the offline sm_90 build (acf-code, bucket 16) the split alone took the
        # spills from 936 to 720 B per thread in bf16 (4.6 -> 2.5 KB in fp32) and ~4 % of the
        # instructions per pair, at the price of reading the tile's features from L2 twice
        # (0.5 MB more per tile). Which costs more only a GPU can say: the autotuner tries both.
        for ps in tl.static_range(1 + SPLIT):
            if ps == 1:
                # the second pass derives its masks afresh (the loads follow the store of the
                # first pass's means, so they are not merged with the first ones): kept from the
                # tile's start, they were live through the first pass and spilled (offline sm_90
                # build, bf16 bucket 16: 112 -> 64 B per thread, 0 B at bucket 32)
                row_in, v_valid, col_in, w_valid = _tile_masks(vmask_ptr, wmask_ptr, i0, t0, N, Mb, r, img_r, c, txt_c,
                                                               GI, K, LB)
                gv_in = same_img & row_in[:, None]
            if ps == 1 or not SPLIT:  # valid tokens per text slot: the words -> regions means' denominators
                cnt_t = tl.maximum(tl.sum(tl.reshape(w_valid.to(tl.float32), (GT, LB)), axis=1), 1.0)
            for h in range(H):
                # a scalar int64 base + int32 in-tile offsets: the offsets are loop invariants,
                # live through the whole kernel, and int64 ones spill (offline sm_90 report).
                # I64_HEADS (tile_meta): h·stride in int64, where int32 would overflow. Elsewhere
                # int32 products, and the bucket's contiguous head stride Mb·LB·DH: int64 ones
                # everywhere cost the offline sm_90 build 60 % more spills (paper bf16, bucket
                # 16: 480 -> 768 B per thread)
                if I64_HEADS:
                    hv = h * stride_vh.to(tl.int64) + v_first
                    hw = h * stride_wh.to(tl.int64) + w_first
                else:
                    hv = h * stride_vh + v_first
                    hw = h * (Mb * (LB * DH)) + w_first
                if ps == 0:
                    vq = tl.load((vq_ptr + hv) + v_off)
                    wk = tl.load((wk_ptr + hw) + w_off)
                    vq_lo = _lo_plane_all((vq_ptr + hv + lo_v) + v_off, vq, F16X3)
                    wk_lo = _lo_plane_all((wk_ptr + hw + lo_w) + w_off, wk, F16X3)
                if ps == 1 or not SPLIT:
                    if SHARED_QK and not SPLIT:
                        vk, vk_lo = vq, vq_lo
                        wq, wq_lo = wk, wk_lo
                    else:
                        vk = tl.load((vk_ptr + hv) + v_off)
                        wq = tl.load((wq_ptr + hw) + w_off)
                        vk_lo = _lo_plane_all((vk_ptr + hv + lo_v) + v_off, vk, F16X3)
                        wq_lo = _lo_plane_all((wq_ptr + hw + lo_w) + w_off, wq, F16X3)
                if ps == 0:
                    # ---- regions -> words: rows = regions, segments = texts (LB columns each)
                    if not FULL and not HALF_GW:
                        # Γw_blk: the bucket texts' Gram blocks (computed once per text), zero
                        # between texts. Loaded first: it goes to shared memory as a later
                        # dot's operand, so its registers are free before the logits are live.
                        gw = tl.load((wgam_ptr + (t0 * H + h) * (LB * LB)) + gw_off, mask=gw_in, other=0.0)
                        gw_lo = _lo_plane((wgam_ptr + lo_gw + (t0 * H + h) * (LB * LB)) + gw_off, gw_in, gw, F16X3)
                    x = _dot3(vq, vq_lo, tl.trans(wk), tl.trans(wk_lo), None, DOT_PREC)
                    if MASK_I2T == "bias":
                        x = _add_mask_bias(x, wmask_ptr + t0 * LB, c, col_in)
                    p, inv = _seg_softmax_cols(x, w_valid3, c_i2t, BR, GT, LB, MASK_I2T)
                    if O_IS_Q:
                        xn = x
                    else:
                        vo = tl.load((vo_ptr + hv) + v_off)
                        vo_lo = _lo_plane_all((vo_ptr + hv + lo_v) + v_off, vo, F16X3)
                        xn = _dot3(vo, vo_lo, tl.trans(wk), tl.trans(wk_lo), None, DOT_PREC)
                    if FULL or PAIRWISE:
                        a3 = p * inv[:, :, None]
                        num_i += tl.sum(a3 * tl.reshape(xn, (BR, GT, LB)), axis=2)
                        a = tl.reshape(a3, (BR, BC))  # normalised attention A_h
                    else:
                        num_i += tl.sum(p * tl.reshape(xn, (BR, GT, LB)), axis=2) * inv
                    if FULL:
                        a_hi, a_lo = _operand(a, wk.dtype, F16X3)
                        tl.store(slot + h * (2 * TILE) + r[:, None] * BC + c[None, :], a_hi)
                        if F16X3:
                            tl.store(slot_lo + h * (2 * TILE) + r[:, None] * BC + c[None, :], a_lo)
                    else:
                        # ‖Σ_l p_l k_l‖² = p Γw pᵀ: the dot takes p in the storage dtype, the product
                        # the fp32 p (no conversion back, one factor rounded instead of two: -7%
                        # instructions per pair in the offline report)
                        if BATCHED_GW:
                            pt = tl.permute(p, (1, 0, 2))  # (GT, BR, LB)
                            pt2, pt2_lo = _operand(pt, wk.dtype, F16X3)
                            y = _dot3(pt2, pt2_lo, gw, gw_lo, None, DOT_PREC)  # one (BR, LB) x (LB, LB) per text
                            nrm_i += tl.sum(pt * y, axis=2) * tl.trans(inv * inv)
                        elif HALF_GW:
                            y = _p_gamma_halves(p, wgam_ptr + (t0 * H + h) * (LB * LB), lo_gw, Mb - t0, wk.dtype, BR,
                                                BC, LB, H, F16X3, DOT_PREC)
                            nrm_i += _quad_partials(p * tl.reshape(y, (BR, GT, LB)), BR, GT, LB) * (inv * inv)[:, :, None]
                        else:
                            p2, p2_lo = _operand(tl.reshape(p, (BR, BC)), wk.dtype, F16X3)
                            y = _dot3(p2, p2_lo, gw, gw_lo, None, DOT_PREC)
                            nrm_i += _quad_partials(p * tl.reshape(y, (BR, GT, LB)), BR, GT, LB) * (inv * inv)[:, :, None]
                    if PAIRWISE:
                        # κ_h[(g, j)] = Σ_l ā_h[g, j, l] Kw_h[j, l]: ā = mean over image g's valid regions
                        ablk = _image_means_per_pair(a, v_valid, img_r, txt_c, cnt_i, wk.dtype, PP, GI, GIP, GT,
                                                     DOT_PREC)
                        ab_hi, ab_lo = _operand(ablk, wk.dtype, F16X3)
                        kap = _dot3(ab_hi, ab_lo, wk, wk_lo, None, DOT_PREC)  # (PP, DH)
                        _store_pair_rows(kap_ptr, kap, i0, t0, h, N, Mb, PP, GIP, GI, GT, H, DH)
                if ps == 1 or not SPLIT:
                    # ---- words -> regions: rows = tokens, segments = images (K columns each)
                    if not FULL:
                        gv_off = (img_r * (H * K * K) + k_r * K)[:, None] + k_r[None, :]
                        # the tile's block offset in int32 like gv_off, not an int64 base: ptxas then
                        # kept a 64-bit pointer to Γv + gv_off live from the start, and spilled it
                        # (offline sm_90 build, bf16 bucket 16: 8 -> 0 B per thread)
                        if I64_HEADS:
                            gv_at = (vgam_ptr + (i0 * H + h) * (K * K)) + gv_off
                        else:
                            gv_at = vgam_ptr + (gv_off + ((i0.to(tl.int32) * H + h) * (K * K)))
                        gv = tl.load(gv_at, mask=gv_in, other=0.0)
                        gv_lo = _lo_plane(gv_at + lo_gv, gv_in, gv, F16X3)
                    xt = _dot3(wq, wq_lo, tl.trans(vk), tl.trans(vk_lo), None, DOT_PREC)
                    if MASK_T2I == "bias":
                        xt = _add_mask_bias(xt, vmask_ptr + i0 * K, r, row_in)
                    q, qinv = _seg_softmax_rowsegs(xt, img_r, v_valid, c_t2i, GI, GIP, MASK_T2I)
                    if O_IS_Q:
                        xtn = xt
                    else:
                        wo = tl.load((wo_ptr + hw) + w_off)
                        wo_lo = _lo_plane_all((wo_ptr + hw + lo_w) + w_off, wo, F16X3)
                        xtn = _dot3(wo, wo_lo, tl.trans(vk), tl.trans(vk_lo), None, DOT_PREC)
                    num_t += _seg_sum_cols(q * xtn, img_r, GI, GIP) * qinv
                    if FULL or PAIRWISE:
                        qs = tl.zeros_like(q)
                        for g in tl.static_range(GI):
                            qg = tl.sum(tl.where(slot_i == g, qinv, 0.0), axis=1)
                            qs = tl.where((img_r == g)[None, :], qg[:, None], qs)
                        b = q * qs  # normalised attention B_h (BC, BR)
                    if FULL:
                        b_hi, b_lo = _operand(b, vk.dtype, F16X3)
                        tl.store(slot + h * (2 * TILE) + TILE + c[:, None] * BR + r[None, :], b_hi)
                        if F16X3:
                            tl.store(slot_lo + h * (2 * TILE) + TILE + c[:, None] * BR + r[None, :], b_lo)
                    else:
                        q2, q2_lo = _operand(q, vk.dtype, F16X3)
                        z = _dot3(q2, q2_lo, gv, gv_lo, None, DOT_PREC)
                        nrm_t += _seg_sum_cols(z * q, img_r, GI, GIP) * (qinv * qinv)
                    if PAIRWISE:
                        # b̄_h[(g, j)]: B_h's mean over text j's valid tokens, on image g's regions (a sum
                        # over each text's LB rows, (GT, BR)). The global score's kernel multiplies it by
                        # image g's Pv (pair_global.py), where λ_h = b̄_h Kv_h (a dot here) then took an
                        # (H·DH) x D product per pair. As a dot with the pairs' 0/1 rows and a (PP, BR)
                        # store, the offline sm_90 build of the bf16 tile had 4-7 % fewer instructions but
                        # more spills (triton 3.9, buckets 16 / 32: 788 / 388 B against 504 / 360), fp32
                        # (which expanded the sums to (PP, BR)) 9-23 % more instructions
                        bbar = tl.sum(tl.reshape(tl.where(w_valid[:, None], b, 0.0), (GT, LB, BR)), axis=1)
                        _store_text_means(bbar_ptr, bbar / cnt_t[:, None], i0, t0, h, N, Mb, r, img_r, GI, GT, H, K)
            if ps == 0 and SPLIT and not FULL:
                # regions -> words is complete: reduce it to its (GIP, GT) means now, so that its
                # (BR, GT) accumulators (replicated across each quad of threads) are not live
                # through the second pass. The means wait in S itself, which only this program
                # writes: kept in registers they were replicated too, and spilled. Offline sm_90
                # build, bf16 bucket 16: 176 -> 112 B per thread, and the loops over the heads
                # from 23 spill instructions per head to none (3 since, bench/kernel_report.py).
                vn = tl.load((vnorm_ptr + i0 * K) + r, mask=row_in, other=0.0)
                if not PAIRWISE:
                    cnt_i = _image_counts(vmask_ptr, i0, N, slot_i, GI, K)
                part = (u2 * u1) * _i2t_means(num_i, _i2t_norms(nrm_i, BATCHED_GW), vn, v_valid, img_r, cnt_i,
                                              eps, GI, GIP)
                s_at, s_in = _s_block(S_ptr, stride_sn, stride_sm, wcol_ptr, i0, t0, N, Mb, GI, GIP, GT)
                if EMBED:
                    part += tl.load(s_at, mask=s_in, other=0.0)
                tl.store(s_at, part, mask=s_in)

        if FULL:
            # Phase B: ‖x*‖² = a Γ aᵀ with the heads coupled (full Γ), from the attention
            # this program just wrote to its scratch slot (same CTA: a barrier orders it).
            tl.debug_barrier()
            nrm_f = tl.zeros((BR, GT), dtype=tl.float32)
            for j in tl.static_range(GT):
                j_in = (tl.zeros((QCW,), dtype=tl.int64) + t0 + j) < Mb  # (a vector: the interpreter refuses scalar masks)
                gam = wgam_ptr + (t0 + j) * (HL * HL)
                nj = _gamma_form(slot + j * LB, slot_lo + j * LB, r, BC, LB, HL, gam, gam + lo_gw, HL, j_in, QCW, TILE,
                                 F16X3, DOT_PREC)
                nrm_f = tl.where((tt == j)[None, :], nj[:, None], nrm_f)
            for g in tl.static_range(GI):
                g_in = (tl.zeros((QCV,), dtype=tl.int64) + i0 + g) < N
                gam = vgam_ptr + (i0 + g) * (HKP * HKP)
                ng = _gamma_form(slot + TILE + g * K, slot_lo + TILE + g * K, c, BR, K, H * K, gam, gam + lo_gv, HKP, g_in,
                                 QCV, TILE, F16X3, DOT_PREC)
                nrm_t = tl.where((slot_i == g)[None, :], ng[:, None], nrm_t)
            tl.debug_barrier()  # the next tile overwrites the scratch slot

        # ---- cosines, then the mean over each pair's valid query rows
        if FULL or not SPLIT:
            vn = tl.load((vnorm_ptr + i0 * K) + r, mask=row_in, other=0.0)
            nrm_q = nrm_f if FULL else _i2t_norms(nrm_i, BATCHED_GW)
            if not PAIRWISE:
                cnt_i = _image_counts(vmask_ptr, i0, N, slot_i, GI, K)
            i2t = _i2t_means(num_i, nrm_q, vn, v_valid, img_r, cnt_i, eps, GI, GIP)
        wn = tl.load((wnorm_ptr + t0 * LB) + c, mask=col_in, other=0.0)
        cos_t = num_t / tl.maximum(wn[:, None] * tl.sqrt(nrm_t), eps)  # (BC, GIP)
        cos_t = tl.where(w_valid[:, None], cos_t, 0.0)
        t2i = tl.sum(tl.reshape(cos_t, (GT, LB, GIP)), axis=1) / cnt_t[:, None]  # (GT, GIP)
        s_at, s_in = _s_block(S_ptr, stride_sn, stride_sm, wcol_ptr, i0, t0, N, Mb, GI, GIP, GT)
        if SPLIT and not FULL:
            tl.debug_barrier()  # S as the first pass left it, written by other threads of this program
            s = tl.load(s_at, mask=s_in, other=0.0) + (u2 * (1.0 - u1)) * tl.trans(t2i)
        else:
            s = u2 * (u1 * i2t + (1.0 - u1) * tl.trans(t2i))  # (GIP, GT)
            if EMBED:
                s += tl.load(s_at, mask=s_in, other=0.0)
        # PAIRWISE: (1 - u2) * S_global is added from κ and b̄ afterwards (pair_global.py)
        tl.store(s_at, s, mask=s_in)


# --------------------------------------------------------------------------- host side

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import List, Optional, Tuple  # noqa: E402

import torch  # noqa: E402


_MIN_DOT = 16  # every tl.dot side must be >= 16 on NVIDIA GPUs
TILE_ROWS = 128  # region rows per tile (GI images of K rows, padded)
TILE_COLS = 128  # token rows per tile (GT texts of LB tokens)
MAX_IMAGES_PER_TILE = 4  # image segments are masked passes: their cost grows with GI
BUCKETS = (16, 32, 64, 128)  # text lengths are padded to the smallest bucket that holds them
# Columns per step of the full-Γ quadratic forms (phase B), both sides. Texts took 128 until
# 2026-12-07: 64 does a quarter (bucket 16) / a sixth (32) less of their tensor-core work (only
# Γw's upper triangle of chunks: 3 of 4 chunk products, 10 of 16), paper bf16 5.00 -> 4.83 M MACs
# per pair at bucket 16; offline sm_90 spills, triton 3.6: bf16 352/400 -> 348/248 B, fp32
# 936/1624 -> 576/436 B; triton 3.9: bf16 572/648 -> 788/388 B, fp32 1292/1688 -> 988/948 B.
QUAD_CHUNK = 64
# Rows of the pairwise κ dot, columns of the pair-mean dots: the GIP·GT pairs of a tile,
# at least 16 (a dot's least side). 64, one warp group's wgmma, made the paper bf16 tile multiply
# 2x (bucket 16) and 4x (bucket 32) the pairs it has; at 32 / 16 the offline sm_90 build has 5 %
# (bucket 16) and 7 % (32) fewer tensor-core multiply-adds per pair, triton 3.6 -2 % / -1 %
# warp-instructions and fewer spills (340 / 488 B, from 356 / 592), triton 3.9 -3 % / -6 %
# warp-instructions, 632 / 540 B of spills (from 600 / 460). Under f16x3, whose three
# chained products replicate a 64-row dot over the warp groups, 64 also cost +4 % instructions.
PAIR_ROWS = _MIN_DOT
# Items per precompute call: bounds the float32 temporaries of acf_fast.precompute
# (full Γ is (n, H*T, H*T) fp32: 2 MiB per text at L = 32) while the tile layout fills.
PREP_CHUNK = 1024
# Pairs per launch when the pairwise global score is on: κ and b̄ are (pairs, H·DH) and (pairs, H·K)
# (2.6 KiB per pair in bf16 at COCO's shape, 5.3 in fp32), read by kernels/pair_global.py after the tiles.
GLOBAL_PAIRS = 2**20


def _pow2(n: int, lo: int = _MIN_DOT) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def head_width(D: int, heads: int) -> int:
    """Head width as stored for the tiles: D/H padded with zero columns to a power of two >= 16
    (zero columns change no logit, so D = 64, H = 8 works)."""
    return _pow2(D // heads)


def image_tile_shape(K: int, rows: int = TILE_ROWS) -> Tuple[int, int]:
    """(GI images per tile, BR padded rows) for images of K regions."""
    gi = max(1, min(MAX_IMAGES_PER_TILE, rows // K))
    return gi, _pow2(gi * K)


def image_rows(K: int, rows: int = TILE_ROWS, *, full_heads: Optional[int] = None) -> int:
    """Rows per image in the tile layout: K padded with masked rows to a multiple of 8 when
    the tile keeps its shape, else K. An image's segment of the tile and its Γv block then
    start on 16-byte boundaries, so that the tile gathers the Γv blocks with vector loads
    (36 -> 40 regions took the offline sm_90 build of the bf16 block-diagonal tile from 512
    to 176 B of spills per thread and 8.4 K to 8.0 K warp-instructions per pair; the tile
    holds 3 images in 128 rows either way).

    Full Γ (``full_heads`` = H): only where the padded H·K keeps the same whole QUAD_CHUNK
    columns of Γv (:func:`hkp_of`), so that its quadratic forms do the same work; there the
    phase-B loads of an image's attention become vector loads too (36 -> 40, H = 8: paper
    bf16, bucket 16, 13.7 K -> 12.3 K warp-instructions per pair, 488 -> 420 B of spills)."""
    kr = -(-K // 8) * 8
    if image_tile_shape(kr, rows) != image_tile_shape(K, rows):
        return K
    if full_heads is not None and hkp_of(full_heads, kr) != hkp_of(full_heads, K):
        return K
    return kr


def bucket_of(length: int, buckets=None) -> int:
    """The padded length (bucket) of a text with ``length`` valid tokens."""
    for b in buckets or BUCKETS:
        if length <= b:
            return b
    raise ValueError(f"a text has {length} valid tokens; the triton backend takes at most {(buckets or BUCKETS)[-1]}")


def check_tile_limits(K: int, L: int) -> None:
    """Refuse shapes the tiles do not take (ValueError naming the argument)."""
    if K > TILE_ROWS:
        raise ValueError(f"V has K = {K} regions per image; the triton backend takes at most {TILE_ROWS} (use backend='torch')")
    if L > BUCKETS[-1]:
        raise ValueError(f"W has L = {L} tokens per text; the triton backend takes at most {BUCKETS[-1]} (use backend='torch')")


@dataclass
class TileImages:
    """Image side in the tile layout (n images of K regions, H heads, head width DH).

    Q/Kk/O: (H, n*K, DH) storage dtype, head-major (Kk/O may be the same tensor as Q);
    mask (n*K,) int8; norm (n*K,) fp32; gam storage dtype: the full Γv (n, HKP, HKP) with
    row h*K + k, zero-padded to HKP, or for block-diagonal Γ the blocks (n, H, K, K); gx
    (n, D) fp32 or None; pglob: with the pairwise global score, the images' Pv rows (row
    h*K + k) as ``pair_global.image_operands``, else None. K here is the layout's rows per
    image (:func:`image_rows`)."""

    Q: torch.Tensor
    Kk: torch.Tensor
    O: torch.Tensor
    mask: torch.Tensor
    norm: torch.Tensor
    gam: torch.Tensor
    gx: Optional[torch.Tensor]
    K: int
    split: Optional["Split16"] = None  # fp32 tiles held as fp16 pairs (f16x3): their scales and lo planes
    pglob: Optional[dict] = None

    @property
    def n(self) -> int:
        return self.mask.shape[0] // self.K


@dataclass
class TextBucket:
    """Texts of one length bucket: each text's valid tokens first, padded to LB rows.

    Q/Kk/O: (H, Mb*LB, DH); mask (Mb*LB,) int8; norm (Mb*LB,) fp32; col (Mb,) int32 = the
    S column of each text; gam: the full Γw (Mb, H*LB, H*LB) with row h*LB + l, or for
    block-diagonal Γ the blocks (Mb, H, LB, LB); zero at padded tokens."""

    Q: torch.Tensor
    Kk: torch.Tensor
    O: torch.Tensor
    mask: torch.Tensor
    norm: torch.Tensor
    col: torch.Tensor
    gam: torch.Tensor
    LB: int
    split: Optional["Split16"] = None  # as TileImages.split

    @property
    def Mb(self) -> int:
        return self.col.shape[0]


@dataclass
class GlobalWeights:
    """Pairwise global score (spec §3) as W_g = κ Zw, V_g = b̄ Pv + gx, with κ = concat_h(ā_h Kw_h)
    and b̄ = concat_h(b̄_h) from the kernel, Pv each image's rows of the precompute's Pglob
    (TileImages.pglob). ``operands``: Zw = z_o x_w ((H*DH, D), zero rows at padded head
    columns) as pair_global's kernel takes it (pair_global.weight_operands)."""

    operands: dict


@dataclass
class Split16:
    """How one side's fp32 tile tensors are held for the ``f16x3`` dots (:func:`split16_planes`):
    Q/Kk/O and gam are the fp16 hi planes of (2, ...) tensors, scaled by ``sigma`` (features)
    and ``sigma_gam`` (Γ blocks; a power of four); each lo plane follows its hi plane,
    :func:`lo_plane_offset` elements further on."""

    sigma: float
    sigma_gam: float


@dataclass
class TilePlan:
    images: TileImages
    buckets: List[TextBucket]
    full: bool  # full Γ (z_o present): phase B quadratic forms from scratch
    glob: Optional[GlobalWeights] = None
    M: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def split16(self) -> bool:
        return self.images.split is not None


def read_slack(dh: int) -> int:
    """Zero elements kept after every tile feature tensor (after its lo plane, split into fp16
    pairs): the tiles read the features without masks (:func:`_tile_kernel`), up to
    TILE_ROWS - 1 rows past a side's last image and TILE_COLS - 1 past its last text."""
    return max(TILE_ROWS, TILE_COLS) * dh


def _empty_planes(shape, dtype: torch.dtype, device, *, planes: int = 1, slack: int = 0) -> torch.Tensor:
    """Uninitialised contiguous ``shape`` tensors in one buffer: ``planes=1`` the tensor,
    ``planes=2`` (2, *shape), the planes of :func:`split16_planes` (the second
    :func:`lo_plane_offset` elements after the first); ``slack`` zero elements (at least)
    after the last (:func:`read_slack`)."""
    n = math.prod(shape)
    off = _plane_offset(n)
    end = off * (planes - 1) + n
    buf = torch.empty(off * planes + slack, dtype=dtype, device=device)
    buf[end:].zero_()
    if planes == 1:
        return buf[:n].view(shape)
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    return buf.as_strided((planes, *shape), (off, *strides))


def slack_after(t: torch.Tensor, lo_plane: int = 0) -> int:
    """Elements of t's storage after its end (a contiguous t; after its lo plane, ``lo_plane``
    elements on, where it has one)."""
    return t.untyped_storage().nbytes() // t.element_size() - (t.storage_offset() + lo_plane + t.numel())


def _heads_major(x: torch.Tensor, dh: int, st: torch.dtype) -> torch.Tensor:
    """(n, H, T, d) -> (H, n*T, dh) contiguous in ``st``, with the read slack after it; d padded
    with zeros to dh."""
    n, H, T, d = x.shape
    out = _empty_planes((H, n * T, dh), st, x.device, slack=read_slack(dh))
    out4 = out.view(H, n, T, dh)
    out4[..., :d].copy_(x.transpose(0, 1))
    out4[..., d:].zero_()
    return out


def _tile_qko(Q, Kk, O, dh: int, st: torch.dtype):
    """Q/Kk/O (n, H, T, d) -> (H, n*T, dh) each, keeping the identities Kk is Q / O is Q."""
    Qt = _heads_major(Q, dh, st)
    return Qt, Qt if Kk is Q else _heads_major(Kk, dh, st), Qt if O is Q else _heads_major(O, dh, st)


def _cat_sides(parts, dim_items):
    """Concatenate per-chunk tile pieces along the item rows (keeping Kk is Q / O is Q)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    out = {}
    for name in ("Q", "Kk", "O"):
        if name != "Q" and getattr(first, name) is first.Q:
            continue
        ts = [getattr(p, name) for p in parts]
        H, _, dh = ts[0].shape
        out[name] = torch.cat(ts, dim=1, out=_empty_planes((H, sum(t.shape[1] for t in ts), dh), ts[0].dtype,
                                                           ts[0].device, slack=read_slack(dh)))
    out["Kk"] = out.get("Kk", out["Q"])
    out["O"] = out.get("O", out["Q"])
    for name in dim_items:
        vals = [getattr(p, name) for p in parts]
        out[name] = None if vals[0] is None else torch.cat(vals, dim=0)
    return out


def tile_images(side, st: torch.dtype, global_dtype: Optional[torch.dtype] = None) -> TileImages:
    """acf_fast.precompute.ItemSide of n images -> :class:`TileImages` (each image's rows
    padded with masked zero rows to :func:`image_rows`); its Pglob, where it has one, as the
    global score's kernel takes it for κ of ``global_dtype``."""
    n, H, K, d = side.Q.shape
    KR = image_rows(K, full_heads=None if side.block_diagonal else H)
    pad = torch.nn.functional.pad

    def rows(x):  # (n, H, K, d) -> (n, H, KR, d)
        return pad(x, (0, 0, 0, KR - K)) if KR != K else x

    Qp = rows(side.Q)
    Q, Kk, O = _tile_qko(Qp, Qp if side.Kk is side.Q else rows(side.Kk), Qp if side.O is side.Q else rows(side.O),
                         head_width(H * d, H), st)
    if side.block_diagonal:  # (n, H, KR, KR): each image's Gram blocks
        gam = pad(side.gram.to(st), (0, KR - K, 0, KR - K)).contiguous()
    else:  # (n, HKP, HKP): row h*KR + k, each head's block padded to KR, then to HKP
        g = pad(side.gram.to(st).view(n, H, K, H, K), (0, KR - K, 0, 0, 0, KR - K)).view(n, H * KR, H * KR)
        HK, hkp = H * KR, hkp_of(H, KR)
        gam = pad(g, (0, hkp - HK, 0, hkp - HK)).contiguous()
    mask = pad(side.mask.to(torch.int8), (0, KR - K))
    norm = pad(side.norm.to(torch.float32), (0, KR - K))
    pglob = None
    if side.Pglob is not None:
        from .pair_global import image_operands

        pglob = image_operands(rows(side.Pglob.view(n, H, K, -1)).reshape(n, H * KR, -1), global_dtype or st)
    return TileImages(Q, Kk, O, mask.reshape(-1).contiguous(), norm.reshape(-1).contiguous(), gam,
                      None if side.gx is None else side.gx.to(torch.float32).contiguous(), KR, pglob=pglob)


def tile_texts(side, st: torch.dtype, first: int = 0) -> List[TextBucket]:
    """ItemSide of m texts -> one :class:`TextBucket` per length bucket in use.

    Each text's valid tokens are moved to the front (stable) and counted: ACF has no
    positional term after the encoder, so the order of a text's tokens changes no score,
    and a text with holes in its mask is padded only to its count. ``first`` offsets the
    S column index (texts prepared in chunks)."""
    m, H, L, d = side.Q.shape
    dh = head_width(H * d, H)
    count = side.mask.sum(1)
    order = torch.argsort((~side.mask).to(torch.int8), dim=1, stable=True)  # valid tokens first
    buckets = []
    lo = 0
    for LB in BUCKETS:
        sel = ((count > lo) & (count <= LB)).nonzero().flatten()
        lo = LB
        if sel.numel() == 0:
            continue
        T = min(LB, L)
        tok = order[sel, :T]  # (Mb, T)
        pad = LB - T

        def gather(x):  # (m, H, L, d) -> (Mb, H, LB, d)
            g = torch.gather(x[sel], 2, tok[:, None, :, None].expand(-1, H, -1, x.shape[-1]))
            return torch.nn.functional.pad(g, (0, 0, 0, pad)) if pad else g

        Qb = gather(side.Q)
        Kb = Qb if side.Kk is side.Q else gather(side.Kk)
        Ob = Qb if side.O is side.Q else gather(side.O)
        Q, Kk, O = _tile_qko(Qb, Kb, Ob, dh, st)
        valid = torch.arange(LB, device=count.device)[None, :] < count[sel, None]
        norm = torch.gather(side.norm[sel], 1, tok)
        norm = torch.nn.functional.pad(norm, (0, pad)) if pad else norm
        if side.block_diagonal:
            # rows/cols tok[l] of each head's Γ -> l, zero at padded tokens: (Mb, H, LB, LB)
            ix = tok[:, None, :].expand(-1, H, -1)
            g = torch.gather(side.gram[sel], 2, ix[..., None].expand(-1, -1, -1, L))
            g = torch.gather(g, 3, ix[:, :, None, :].expand(-1, -1, T, -1))
            kv = valid[:, :T]
            g = g * (kv[:, None, :, None] & kv[:, None, None, :])
            gam = (torch.nn.functional.pad(g, (0, pad, 0, pad)) if pad else g).to(st).contiguous()
        else:
            # rows/cols h*L + tok[l] of Γ -> h*LB + l, zero at padded tokens
            tokp = torch.nn.functional.pad(tok, (0, pad)) if pad else tok
            ix = (torch.arange(H, device=tok.device)[None, :, None] * L + tokp[:, None, :]).reshape(len(sel), H * LB)
            g = side.gram[sel]
            g = torch.gather(g, 1, ix[:, :, None].expand(-1, -1, g.shape[2]))
            g = torch.gather(g, 2, ix[:, None, :].expand(-1, ix.shape[1], -1))
            keep = valid.repeat(1, H)
            gam = (g * (keep[:, :, None] & keep[:, None, :])).to(st).contiguous()
        buckets.append(TextBucket(Q, Kk, O, valid.reshape(-1).to(torch.int8).contiguous(),
                                  (norm * valid).reshape(-1).to(torch.float32).contiguous(),
                                  (sel + first).to(torch.int32).contiguous(), gam, LB))
    return buckets


def _merge_buckets(chunks: List[List[TextBucket]]) -> List[TextBucket]:
    by_lb = {}
    for part in chunks:
        for b in part:
            by_lb.setdefault(b.LB, []).append(b)
    out = []
    for LB in sorted(by_lb):
        parts = by_lb[LB]
        if len(parts) == 1:
            out.append(parts[0])
            continue
        cat = _cat_sides(parts, ("mask", "norm", "col", "gam"))
        out.append(TextBucket(cat["Q"], cat["Kk"], cat["O"], cat["mask"], cat["norm"], cat["col"], cat["gam"], LB))
    return out


def _global_weights(weights, D: int, H: int, dh: int, device, dtype: torch.dtype) -> GlobalWeights:
    """Zw = z_o x_w (missing = identity), made in fp32 with its rows padded per head to dh, as
    operands for κ of ``dtype``."""
    from .pair_global import weight_operands

    f = lambda k: None if weights.get(k) is None else weights[k].detach().to(device, torch.float32)  # noqa: E731
    z_o, x_w = f("z_o"), f("x_w")
    Zw = torch.eye(D, device=device) if z_o is None else z_o
    Zw = Zw if x_w is None else Zw @ x_w
    d = D // H
    if dh != d:
        Zw = torch.nn.functional.pad(Zw.view(H, d, D), (0, 0, 0, dh - d)).reshape(H * dh, D)
    return GlobalWeights(weight_operands(Zw.contiguous(), dtype))


def plan_tiles(V, v_mask, W, w_mask, *, heads: int, weights, G, st: torch.dtype, chunk: Optional[int] = None,
               split16: Optional[bool] = None) -> TilePlan:
    """Per-item precompute (acf_fast.precompute, spec §8) of both sides, in the tile layout.

    V (N, K, D), W (M, L, D) any float dtype; masks (.., T) bool or None; G (N, D) or None
    (pairwise global score on when given); ``st`` the storage dtype of the tiles.
    ``split16`` (default: when ``st`` is float32): hold the fp32 tiles as fp16 pairs for the
    ``f16x3`` dots (:func:`split16_planes`); :func:`launch_tiles` then runs f16x3 whatever
    ``dot_prec`` it is given. ``chunk``: items per precompute call (default PREP_CHUNK, read
    at the call).

    With the pairwise global score the plan also holds each image's Pv rows (H·K × D, the
    precompute's Pglob) for kernels/pair_global.py: 655 KB per image in bf16 at COCO's shape
    (3.3 GB for 5,000 images; fp32, split into fp16 pairs, twice that)."""
    from acf_fast.precompute import precompute_items

    N, K, D = V.shape
    M, L, _ = W.shape
    check_tile_limits(K, L)
    chunk = chunk or PREP_CHUNK
    pairwise = G is not None
    weights = weights or {}
    split = st == torch.float32 if split16 is None else split16
    global_dtype = torch.float32 if split else st  # κ's, b̄'s (launch_tiles)
    with torch.no_grad():
        parts = []
        for s in range(0, N, chunk):
            # images' Pglob only: texts' would be one (H·L, D) per text, and the global score's kernel
            # holds one image against many texts, so their W_g come from κ (pair_global.py)
            side = precompute_items(V[s:s + chunk], None if v_mask is None else v_mask[s:s + chunk], weights, heads,
                                    role="image", G=G[s:s + chunk] if pairwise else None, pairwise_global=pairwise)
            parts.append(tile_images(side, st, global_dtype))
        cat = _cat_sides(parts, ("mask", "norm", "gam", "gx"))
        if len(parts) == 1:
            images = parts[0]
        else:
            from .pair_global import cat_image_operands

            images = TileImages(cat["Q"], cat["Kk"], cat["O"], cat["mask"], cat["norm"], cat["gam"], cat["gx"],
                                parts[0].K, pglob=cat_image_operands([p.pglob for p in parts]) if pairwise else None)
        text_parts = []
        for s in range(0, M, chunk):
            side = precompute_items(W[s:s + chunk], None if w_mask is None else w_mask[s:s + chunk], weights, heads,
                                    role="text", pairwise_global=False)
            text_parts.append(tile_texts(side, st, first=s))
        buckets = _merge_buckets(text_parts)
        full = not side.block_diagonal
        # once per plan, not per launch
        glob = _global_weights(weights, D, heads, images.Q.shape[2], V.device, global_dtype) if pairwise else None
        if split:
            images = _split_side(images)
            buckets = [_split_side(b) for b in buckets]
    return TilePlan(images, buckets, full, glob, M)


F16X3_MAX = 2.0**13  # max |x| of a side's scaled values: fp16 holds up to 65504
# |log2 sigma| at most: the kernel's fp32 scalars (softmax scales / A, clamp · A, A = the
# product of two sides' sigmas) then stay normal. Inputs are never that large here
# (with_magnitude_scaling divides huge ones), and features below ~2^-37 have norms that the
# cosines' clamp (1e-8) already decides.
F16X3_MAX_EXP = 50


def split16_scale(amax: float, *, power_of_four: bool = False) -> float:
    """The power of two (of four with ``power_of_four``: its square root is exact) that brings
    a largest magnitude ``amax`` into (F16X3_MAX/2, F16X3_MAX] (F16X3_MAX/4 with power_of_four),
    within 2^±F16X3_MAX_EXP."""
    if not amax > 0:
        return 1.0
    e = max(-F16X3_MAX_EXP, min(F16X3_MAX_EXP, math.floor(math.log2(F16X3_MAX / amax))))
    return math.ldexp(1.0, e - e % 2 if power_of_four else e)


def lo_plane_offset(hi: torch.Tensor) -> int:
    """Elements from the start of a hi plane of :func:`split16_planes` to its lo plane: its
    size rounded up to a multiple of 16, so that the lo plane keeps the hi plane's 32-byte
    alignment and the kernel's lo loads are vector loads (the offsets are specialised as
    16-divisible)."""
    return _plane_offset(hi.numel())


def _plane_offset(n: int) -> int:
    """:func:`lo_plane_offset` of a plane of n elements."""
    return -(-n // 16) * 16


def split16_planes(x: torch.Tensor, sigma: float, *, slack: int = 0) -> torch.Tensor:
    """x float32 -> (2, *x.shape) fp16, each plane contiguous: hi = fp16(sigma·x), lo =
    fp16((sigma·x - hi)·2048), so that hi + lo/2048 = sigma·x to ~2^-22 relative, as tf32x3's
    split (whose tf32 keeps fp32's exponent range; fp16 needs the scaling). The lo plane
    starts :func:`lo_plane_offset` elements after the hi plane, and ``slack`` zeros follow
    it (tile features: :func:`read_slack`). With sigma from :func:`split16_scale`
    nothing overflows, and values down to ~2^-37 of the largest keep their precision (the lo
    part's 2048 reaches below fp16's normals)."""
    xs = (x.float() * sigma).contiguous()
    planes = _empty_planes(tuple(x.shape), torch.float16, x.device, planes=2, slack=slack)
    split16_into(planes[0], planes[1], xs)
    return planes


def split16_into(hi: torch.Tensor, lo: torch.Tensor, xs: torch.Tensor) -> None:
    """:func:`split16_planes`' split of xs (float32, already scaled; consumed) into the fp16
    tensors hi and lo of its shape, wherever they lie."""
    hi.copy_(xs)
    lo.copy_(xs.sub_(hi.float()).mul_(2048.0))  # in place (fp32 temporaries are GBs at COCO size)


def _amax(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def _split_side(side):
    """A :class:`TileImages` or :class:`TextBucket` with fp32 tiles -> the same with Q/Kk/O and
    gam as fp16 hi planes (:func:`split16_planes`; Kk is Q / O is Q kept) and ``split`` set.
    Q, Kk and O share one sigma, so that every product of features (logits, numerators)
    carries the same factor."""
    feats = {id(t): t for t in (side.Q, side.Kk, side.O)}.values()  # Kk / O are often Q itself: read it once
    amax, amax_gam = max(_amax(t) for t in feats), _amax(side.gam)
    sigma, sigma_gam = split16_scale(amax), split16_scale(amax_gam, power_of_four=True)
    if max(amax * sigma, amax_gam * sigma_gam) > F16X3_MAX:
        raise ValueError(f"features up to |x| = {amax:.3g} (Γ {amax_gam:.3g}) are too large for the fp32 tiles' fp16 "
                         "pairs: divide them down first (acf_similarity does, see with_magnitude_scaling)")
    slack = read_slack(side.Q.shape[-1])
    Q = split16_planes(side.Q, sigma, slack=slack)[0]  # views of the hi planes; the lo planes follow them
    Kk = Q if side.Kk is side.Q else split16_planes(side.Kk, sigma, slack=slack)[0]
    O = Q if side.O is side.Q else split16_planes(side.O, sigma, slack=slack)[0]
    gam = split16_planes(side.gam, sigma_gam)[0]
    return dataclasses.replace(side, Q=Q, Kk=Kk, O=O, gam=gam, split=Split16(sigma, sigma_gam))


def _configs(interpret: bool):
    """8 warps (two warpgroups, one per 64 tile rows): at 4 warps the offline sm_90 build
    spills ~2 KB per thread. Two shared-memory stages only where they fit in 227 KB; the
    directions in two passes over the heads (SPLIT) or in one (see the kernel)."""
    if interpret:
        return [triton.Config({"GROUP_I": 4, "SPLIT": True}, num_warps=4, num_stages=1)]
    return [triton.Config({"GROUP_I": 16, "SPLIT": sp}, num_warps=8, num_stages=s) for sp in (True, False)
            for s in (1, 2)]


def _prune(configs, named_args, **meta):
    """Full Γ and fp32 operands need one stage (two overflow shared memory); the
    block-diagonal bf16 tile tries both with two passes over the heads, one pass with one
    stage (one pass double-buffers both directions' operands and Γ tiles: 256 KiB at two
    stages). One pass is tried only for the block-diagonal bf16 tile, the configuration a
    GPU run times first (each extra config is one more compile per autotuning key);
    elsewhere the split spills far less."""
    if meta.get("FULL") or meta.get("DOT_PREC") != "tf32" or meta.get("DH", 0) > 128:
        return [c for c in configs if c.num_stages == 1 and c.kwargs.get("SPLIT", True)] or configs[:1]
    return [c for c in configs if c.num_stages == 1 or c.kwargs.get("SPLIT", True)]


_TUNE_KEY = ["H", "DH", "K", "LB", "GI", "GT", "BR", "BC", "HKP", "FULL", "SHARED_QK", "O_IS_Q", "PAIRWISE", "EMBED",
             "DOT_PREC", "BATCHED_GW", "I64_HEADS", "MASK_I2T", "MASK_T2I"]
# S is restored after each timed config: with EMBED the tile adds to what S holds
_tile_tuned = triton.autotune(configs=_configs(_INTERPRET), key=_TUNE_KEY, restore_value=["S_ptr"],
                              prune_configs_by={"early_config_prune": _prune})(_tile_kernel)


def autotuned_configs() -> List[dict]:
    """What the tile kernel's autotuner has chosen so far in this process, one entry per
    autotuning key (bucket, dtype path, variant flags): for the GPU check's JSON."""
    cache = getattr(_tile_tuned, "cache", {}) or {}
    return [dict(key=[str(k) for k in key], num_warps=c.num_warps, num_stages=c.num_stages, **c.kwargs)
            for key, c in cache.items()]


def tile_constexprs(H: int, DH: int, K: int, LB: int, *, full: bool, shared_qk: bool, o_is_q: bool, pairwise: bool,
                    embed: bool, HKP: int, dot_prec: str, cols: int = TILE_COLS, rows: int = TILE_ROWS,
                    i64_heads: bool = False, scale=(1.0, 1.0), mask_bias: Optional[bool] = None,
                    storage_bits: int = 16) -> dict:
    """Compile-time parameters of :func:`_tile_kernel` (also used by bench/kernel_report.py).

    H heads of width DH (padded), K regions per image, LB tokens per text (the bucket),
    HKP the padded H*K of the full Γv (ignored unless ``full``); ``i64_heads``: the heads'
    element offsets need int64 (:func:`tile_meta`); ``scale`` the softmax scales (s_i2t,
    s_t2i) as the tile gets them, which pick each direction's :func:`mask_mode`, with the
    bias where :func:`mask_bias_pays` (``mask_bias`` given: wherever the scale allows, or
    nowhere); ``storage_bits`` the features' element size (16: bf16, fp16 and the fp16 pairs
    of f16x3; 32: fp32 tiles with tf32 or ieee dots)."""
    GI, BR = image_tile_shape(K, rows)
    BC = max(cols, LB)
    GT = BC // LB
    GIP = triton.next_power_of_2(GI)
    PP = max(PAIR_ROWS, GIP * GT)
    batched = batched_gw(full, GT, LB)
    return dict(H=H, DH=DH, K=K, LB=LB, GI=GI, GIP=GIP, GT=GT, BR=BR, BC=BC,
                PP=PP, HKP=HKP if full else QUAD_CHUNK, QCV=QUAD_CHUNK, QCW=min(H * LB, QUAD_CHUNK),
                FULL=full, SHARED_QK=shared_qk, O_IS_Q=o_is_q, PAIRWISE=pairwise, EMBED=embed, DOT_PREC=dot_prec,
                BATCHED_GW=batched, HALF_GW=half_gw(full, batched, GT, LB), I64_HEADS=i64_heads,
                **{f"MASK_{d}": mask_mode(s, mask_bias_pays(batched, dot_prec, storage_bits) if mask_bias is None
                                              else mask_bias)
                   for d, s in (("I2T", scale[0]), ("T2I", scale[1]))})


def mask_mode(s: float, bias_pays: bool) -> str:
    """How a direction with softmax scale ``s`` (as the tile gets it) masks its invalid keys:
    "bias" where the scale lets the bias mask them (:func:`mask_bias_scale_ok`) and it pays,
    else "select" for s > 0, "signed" (one multiply per logit more) for s <= 0."""
    if s <= 0.0:
        return "signed"
    return "bias" if bias_pays and mask_bias_scale_ok(s) else "select"


def mask_bias_scale_ok(s: float) -> bool:
    """Whether a softmax scale ``s``, as the tile gets it, lets MASK_BIAS (-2^80) mask a key:
    2^-40 <= s <= 2^40. Then an invalid key's logit times s·log2(e) is below -2^40 (its
    weight exp2 of that is exactly 0) and above -2^121 (finite: a text or image slot beyond
    the last one, all of whose keys carry the bias, still has finite weights). Logits
    themselves stay far below 2^79: with_magnitude_scaling and the fp16 pairs' sigmas bring
    the features to unit scale and put their size into s. A zero, negative or extreme scale
    takes a select per logit."""
    return 2.0**-40 <= s <= 2.0**40


def mask_bias_pays(batched: bool, dot_prec: str, storage_bits: int) -> bool:
    """Whether a tile masks its invalid keys by the logit bias (both directions, where the
    scales let it). The bias takes a select and a predicate per logit off the issue slots but
    adds a K = 16 product per head (1/16 more tensor-core work per direction): it pays only
    where a tile is issue-bound, which in the offline sm_90 build (triton 3.9,
    bench/kernel_report.py's grid floors, bias / select) is the bf16 block-diagonal tile with
    batched p·Γw (acf-code, bucket 16): 0.584 / 0.674 s (5.8 K / 6.8 K warp-instructions per
    pair, 68 / 0 B of spills). Elsewhere tensor cores bound the floor and the bias made it
    worse: acf-code bf16, bucket 32, 0.362 / 0.338 s (9.9 K / 11.5 K warp-instructions per
    pair); acf-code fp32 2.70 / 2.63 s; paper bf16 2.32 / 2.27 s; paper fp32 6.67 / 6.60 s.
    So: ``batched`` (:func:`batched_gw`, block-diagonal Γ) with single 16-bit dots, not the
    fp16 pairs of f16x3 nor fp32 storage (tf32 dots at half bf16's rate, never measured)."""
    return batched and dot_prec != "f16x3" and storage_bits == 16


def batched_gw(full: bool, GT: int, LB: int) -> bool:
    """Whether the block-diagonal tile forms p Γw as one small dot per text, (BR, LB) x (LB, LB)
    batched over the GT texts (mma.sync: wgmma has no batch), instead of one (BR, BC) x (BC, BC)
    wgmma whose Γw is zero between texts (7/8 of it at 8 texts of 16 tokens, COCO's bucket 16):
    22 % fewer tensor-core multiply-adds per pair there, in the offline sm_90 build
    (bench/kernel_report.py, acf-code, bucket 16):

    - fp32 (f16x3, three products per dot: tensor-core bound): 11.6 K warp-instructions per
      pair either way, 1060 -> 716 B of spills (triton 3.9; 3.6: 11.3 K -> 11.2 K, 1128 ->
      688 B); its COCO-grid floor 3.23 -> 2.78 s;
    - bf16, as much issue- as tensor-bound: with triton 3.6 (the GPU machine's) its leanest
      configuration 6.64 K -> 6.68 K warp-instructions per pair, spills 260 -> 148 B (one
      stage: 440 -> 216 B, 6.97 K -> 6.93 K), its floor 0.69 -> 0.68 s at bucket 16; with
      triton 3.9 6.76 K -> 7.03 K (+4 %), spills 144 -> 24 B, floor 0.69 -> 0.71 s.

    Only with a text per warp (GT >= 8): with fewer, triton 3.6 computes the batched dot twice
    over (bucket 32: GT = 4, 8 warps), and triton 3.9 issued 13 % more instructions (fp32,
    bucket 32); and only where its sides are dot-sized (LB >= 16)."""
    return not full and GT >= 8 and LB >= _MIN_DOT


def half_gw(full: bool, batched: bool, GT: int, LB: int) -> bool:
    """Whether the block-diagonal tile forms p Γw as two products of its column halves
    (:func:`_p_gamma_halves`), half the tensor-core work of the tile-wide one: where the texts
    are not ``batched`` (:func:`batched_gw`) and none straddles the halves, each at least a dot wide
    (COCO's bucket 32: 4 texts of 32). Offline sm_90 build, bucket 32, triton 3.9: the tile's
    tensor-core work -12.5 %, its warp-instructions per pair 11.4 K -> 11.5 K in bf16 (spills
    0 -> 56 B, 25 spill instructions per pair, outside the loops over the heads) and 19.9 K ->
    19.6 K in fp32 (600 -> 504 B); triton 3.6: bf16 11.9 K -> 11.6 K (336 -> 312 B), fp32
    19.5 K -> 19.4 K (816 -> 780 B)."""
    return not full and not batched and GT % 2 == 0 and GT * LB // 2 >= _MIN_DOT


def hkp_of(H: int, K: int) -> int:
    """H*K padded to whole QUAD_CHUNK columns (the full Γv's side in the tiles)."""
    return triton.cdiv(H * K, QUAD_CHUNK) * QUAD_CHUNK


def tile_meta(plan: TilePlan, bucket: TextBucket, *, dot_prec: str, embed: bool,
              cols: int = TILE_COLS, rows: int = TILE_ROWS, scale=(1.0, 1.0), mask_bias: Optional[bool] = None) -> dict:
    """:func:`tile_constexprs` for one (images, bucket) launch of ``plan``. I64_HEADS where
    the last head's offset (H - 1)·stride outgrows int32 (D = 1024: from ~67 K images of 36
    regions, ~75 K captions in bucket 32 or ~150 K in bucket 16 on), where the images' Γv
    blocks do (n·H·K² elements: the block-diagonal tile offsets them in int32 otherwise; from
    ~16 K images of 128 regions, whose heads' offsets still fit), or where the bucket's heads
    are not contiguous (only the I64_HEADS path reads its stride)."""
    img = plan.images
    H, _, DH = img.Q.shape
    i64_heads = ((H - 1) * max(img.Q.stride(0), bucket.Q.stride(0)) >= 2**31
                 or (not plan.full and img.gam.numel() >= 2**31)
                 or bucket.Q.stride(0) != bucket.Q.shape[1] * DH)
    return tile_constexprs(H, DH, img.K, bucket.LB, full=plan.full, shared_qk=img.Kk is img.Q, o_is_q=img.O is img.Q,
                           pairwise=plan.glob is not None, embed=embed,
                           HKP=img.gam.shape[1] if plan.full else QUAD_CHUNK, dot_prec=dot_prec, cols=cols, rows=rows,
                           i64_heads=i64_heads, scale=scale, mask_bias=mask_bias,
                           storage_bits=8 * img.Q.element_size())


def _num_sms(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs, so the persistent loop is exercised


def _embed_global(out: torch.Tensor, gi: torch.Tensor, gt: torch.Tensor, u2: float, rows: int = 256) -> None:
    """out (N, M) = (1 - u2) · Gi Gtᵀ, the embedding global score (spec §3) that the tiles
    add their local scores to: one GEMM on tensor cores instead of an E-long dot on CUDA
    cores in every tile (~10 % of the acf-code tile's instructions). ``rows`` images at a
    time bound the temporaries of the fp32 product."""
    for lo in range(0, out.shape[0], rows):
        out[lo:lo + rows] = _mm_fp32(gi[lo:lo + rows], gt.t()).mul_(1.0 - u2)


def _add_global(out, plan: TilePlan, bucket: TextBucket, kap, bbar, lo: int, hi: int, u2: float, eps: float) -> None:
    """out[i, col] += (1 - u2) * cos(V_g, W_g) for images [lo, hi) and the bucket's texts,
    fused per pair (kernels/pair_global.py)."""
    from .pair_global import add_pair_global  # it imports this module's dots

    args, kw = _global_arguments(out, plan, bucket, kap, bbar, lo, hi, u2, eps)
    add_pair_global(*args, **kw)


def _global_arguments(out, plan: TilePlan, bucket: TextBucket, kap, bbar, lo: int, hi: int, u2: float, eps: float):
    """pair_global.add_pair_global's arguments for images [lo, hi) and the bucket's texts (the
    plan's Zw and Pv operands), and its keywords: where the plan is split into fp16 pairs, the
    feature scale κ = ā Kw carries."""
    from .pair_global import image_slice

    img = plan.images
    kw = dict(kap_scale=bucket.split.sigma) if plan.split16 else {}
    return (out[lo:hi], bucket.col, kap, bbar, plan.glob.operands, image_slice(img.pglob, lo, hi), img.gx[lo:hi],
            1.0 - u2, eps), kw


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 product to ~1e-6 relative on tensor cores: three bf16 products of the split
    a = a_hi + a_lo, b = b_hi + b_lo (a_lo·b_lo dropped). On CPU: plain fp32."""
    if not a.is_cuda:
        return a @ b
    ah = a.to(torch.bfloat16)
    al = (a - ah.float()).to(torch.bfloat16)
    bh = b.to(torch.bfloat16)
    bl = (b - bh.float()).to(torch.bfloat16)
    return torch.mm(ah, bh).float() + torch.mm(ah, bl).float() + torch.mm(al, bh).float()


class CompileAhead:
    """What a :func:`compile_ahead` block collected: ``requests``, one (grid, args, kwargs)
    per tile-kernel build that the launches inside it need (every configuration the
    autotuner may try), and ``global_requests``, the same for the pairwise global score's
    kernel (kernels/pair_global.py) after each; after the block, ``builds`` compiled in
    ``seconds`` on ``workers`` threads (none under the interpreter)."""

    def __init__(self):
        self.requests: List[tuple] = []
        self.global_requests: List[tuple] = []  # the same for kernels/pair_global.py (paper)
        self.builds = 0
        self.seconds = 0.0
        self.workers = 0

    def compile(self, workers: Optional[int] = None, kernel=None, global_kernel=None) -> None:
        """Build every request through the JIT's own path (``warmup``: same keys as the
        launches), the builds on a thread pool. ``kernel``, ``global_kernel``: the tile kernel
        and pair_global's (tests pass stand-ins)."""
        from .pair_global import _pair_global_kernel

        kernel = _tile_kernel if kernel is None else kernel
        global_kernel = _pair_global_kernel if global_kernel is None else global_kernel
        if _INTERPRET and kernel is _tile_kernel:
            return  # nothing to compile
        from concurrent.futures import ThreadPoolExecutor

        # private in triton 3.6-3.9 (all the versions this project takes): under it, warmup
        # hands the build to the pool and returns
        from triton.runtime._async_compile import AsyncCompileMode

        self.workers = workers or os.cpu_count() or 1
        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.workers) as pool, AsyncCompileMode(pool):
            for grid, args, kwargs in self.requests:
                kernel.warmup(*args, grid=grid, **kwargs)
            for grid, args, kwargs in self.global_requests:
                global_kernel.warmup(*args, grid=grid, **kwargs)
        self.builds = len({_request_key(r) for r in self.requests}) + len({_request_key(r) for r in self.global_requests})
        self.seconds = time.perf_counter() - t0


def _request_key(request) -> tuple:
    """The compile-relevant part of a compile-ahead request: its constexprs and options
    (its tensors' sizes are not in the kernel's key)."""
    return tuple(sorted((k, str(v)) for k, v in request[2].items()))


_AHEAD: Optional[CompileAhead] = None


@contextlib.contextmanager
def compile_ahead(workers: Optional[int] = None):
    """Compile the tile kernels (and paper's global-score kernel) that the similarity calls
    inside the block need, all at once on ``workers`` threads (default: every CPU), instead of
    one after another at their
    first launch. Inside the block nothing is launched: S comes back all zeros, scores of
    nothing, to be discarded (NaN would trip the callers' overflow checks). On leaving it
    every configuration the autotuner may try for those launches is built, so that later
    calls only load and time them (Triton's compiler releases the GIL: two sm_90 tile builds
    took 4.7 s on two threads here, 10.8 s one after the other). Sizes are not in the
    kernels' keys, so a few images and texts per bucket, dtype and variant compile what a
    full grid runs (up to 2^31 elements per side). Yields the :class:`CompileAhead`.

        with tiles.compile_ahead():
            acf_similarity(V[:8], v_mask[:8], W[:256], w_mask[:256], backend="triton", ...)
    """
    global _AHEAD
    if _AHEAD is not None:
        raise RuntimeError("compile_ahead blocks do not nest")
    ahead = _AHEAD = CompileAhead()
    try:
        yield ahead
    finally:
        _AHEAD = None
    ahead.compile(workers)


def _untuned_kwargs(split: Optional[bool]) -> dict:
    """Constexprs and options of the first config (``tuned=False``), SPLIT set when given."""
    kw = _configs(_INTERPRET)[0].all_kwargs()
    return kw if split is None else {**kw, "SPLIT": bool(split)}


def _aligned_chunk_step(GI: int, out: torch.Tensor, img: TileImages) -> int:
    """Images per step of a launch's chunks: whole image tiles (GI images) whose slices of
    S, of the features, masks, norms and Γ all start on 16-byte boundaries like the first
    chunk's, so that every chunk runs the one compiled kernel (the JIT specialises pointers
    on 16-byte alignment: a misaligned chunk was a second compile, with unvectorised loads)."""
    step = GI
    for per_image, size in ((out.stride(0), out.element_size()), (img.K * img.Q.shape[2], img.Q.element_size()),
                            (img.K, img.mask.element_size()), (img.K, 4), (img.gam.stride(0), img.gam.element_size())):
        step = math.lcm(step, 16 // math.gcd(16, per_image * size))
    return step


def launch_tiles(plan: TilePlan, out: torch.Tensor, *, scale, u1: float, u2: float,
                 gi: Optional[torch.Tensor] = None, gt: Optional[torch.Tensor] = None, dot_prec: str = "ieee",
                 cols: int = TILE_COLS, rows: int = TILE_ROWS, tuned: bool = True,
                 global_pairs: int = GLOBAL_PAIRS, eps: float = 1e-8, split: Optional[bool] = None,
                 mask_bias: Optional[bool] = None, timings: Optional[list] = None) -> torch.Tensor:
    """Write S (N, M) float32 into ``out``: one launch per text bucket (and, with the
    pairwise global score, per chunk of images of at most ``global_pairs`` pairs).

    ``gi`` (N, E), ``gt`` (M, E) fp32: the embedding global score (original text order);
    ``eps``: the cosines' clamp (1e-8, spec notation; divided by the scale factors when
    the caller has rescaled huge inputs, see kernels/similarity.py);
    ``cols``/``rows`` shrink the tile (tests); ``tuned=False`` launches the first config
    without autotuning (offline report, tests), with ``split`` (when given) in place of its
    SPLIT (one or two passes over the heads); ``mask_bias`` (when given) masks invalid keys
    by the logit bias wherever the scales allow (True) or nowhere (False), in place of
    :func:`mask_bias_pays`' choice. A plan split into fp16 pairs
    (``plan.split16``) runs the ``f16x3`` dots whatever ``dot_prec`` says. ``timings`` (a
    list): one dict per launch appended (bucket ``LB``, ``texts``, ``images``, ``pairs``,
    ``kernel_s`` and ``global_s``, the pairwise global score's kernel (pair_global.py) after
    it), from CUDA events (the wall clock on CPU), so that a GPU run can set each bucket's
    time beside its offline instruction count."""
    img = plan.images
    if plan.split16:
        dot_prec = "f16x3"
    N = img.n
    embed = gi is not None
    dev = out.device
    H, _, DH = img.Q.shape
    pending = []  # (record, marks) per launch, for ``timings``
    ahead = _AHEAD
    if rows > TILE_ROWS or cols > TILE_COLS:  # the features' read slack covers TILE_ROWS / TILE_COLS
        raise ValueError(f"rows = {rows}, cols = {cols}: the tiles take at most {TILE_ROWS} x {TILE_COLS}")
    _check_read_slack(plan)
    if ahead is not None:  # compile_ahead: nothing is scored
        out.zero_()
    elif embed:
        _embed_global(out, gi, gt, u2)
    for b in plan.buckets:
        s_i2t, s_t2i, b_eps, vnorm, wnorm, lo_offsets = float(scale[0]), float(scale[1]), float(eps), img.norm, b.norm, (0,) * 4
        if plan.split16:
            # the tiles' logits carry A = sigma_v·sigma_w and their Γ products sigma_gam: the
            # softmax scales divide by A; the norms take A/sqrt(sigma_gam) of the other side,
            # so that norm·sqrt(Γ form) carries A like the numerators; the clamp scales by A
            sv, sw = img.split, b.split
            A = sv.sigma * sw.sigma
            s_i2t, s_t2i, b_eps = s_i2t / A, s_t2i / A, b_eps * A
            vnorm = img.norm * (A / math.sqrt(sw.sigma_gam))
            wnorm = b.norm * (A / math.sqrt(sv.sigma_gam))
            lo_offsets = tuple(lo_plane_offset(t) for t in (img.Q, b.Q, img.gam, b.gam))  # see Split16
        meta = tile_meta(plan, b, dot_prec=dot_prec, embed=embed, cols=cols, rows=rows, scale=(s_i2t, s_t2i),
                         mask_bias=mask_bias)
        GI, GT = meta["GI"], meta["GT"]
        n_tt = triton.cdiv(b.Mb, GT)
        step = _aligned_chunk_step(GI, out, img)
        chunk = N if plan.glob is None else max(step, (global_pairs // max(b.Mb, 1)) // step * step)
        for lo in range(0, N, chunk):
            hi = min(N, lo + chunk)
            n_it = triton.cdiv(hi - lo, GI)
            n_tiles = n_it * n_tt
            programs = min(n_tiles, _num_sms(dev)) if plan.full else n_tiles
            n_planes = 2 if plan.split16 else 1  # f16x3: the scratch's lo plane after its hi plane
            scratch = (torch.empty(n_planes * programs * H * 2 * meta["BR"] * meta["BC"], dtype=img.Q.dtype, device=dev)
                       if plan.full else img.norm)
            if plan.glob is not None:
                gdt = torch.float32 if plan.split16 else img.Q.dtype
                kap = torch.empty((hi - lo) * b.Mb, H * DH, device=dev, dtype=gdt)
                bbar = torch.empty((hi - lo) * b.Mb, H * img.K, device=dev, dtype=gdt)
            else:
                kap = bbar = img.norm
            rs = slice(lo * img.K, hi * img.K)
            args = (out[lo:hi], out.stride(0), out.stride(1),
                    img.Q[:, rs], img.Kk[:, rs], img.O[:, rs], img.Q.stride(0), img.mask[rs], vnorm[rs],
                    img.gam[lo:hi],
                    b.Q, b.Kk, b.O, b.Q.stride(0), b.mask, wnorm, b.col, b.gam,
                    scratch, kap, bbar, *lo_offsets,
                    hi - lo, b.Mb, n_it, n_tt, s_i2t, s_t2i, float(u1), float(u2), b_eps)
            grid = (programs,)
            if ahead is not None:  # what the autotuner would try, with the kwargs it passes
                kws = ([c.all_kwargs() for c in _prune(_configs(_INTERPRET), {}, **meta)] if tuned
                       else [_untuned_kwargs(split)])
                ahead.requests += [(grid, args, {**meta, **kw}) for kw in kws]
                if plan.glob is not None:  # and the pairwise global score's kernel after it
                    from .pair_global import global_launch

                    gargs, gkw = _global_arguments(out, plan, b, kap, bbar, lo, hi, u2, eps)
                    launch = global_launch(*gargs, **gkw)
                    if launch is not None:
                        ahead.global_requests.append(launch)
                break  # every chunk compiles to the first one's kernel (_aligned_chunk_step)
            marks = [_mark(dev)] if timings is not None else None
            if tuned:
                _tile_tuned[grid](*args, **meta)
            else:
                _tile_kernel[grid](*args, **meta, **_untuned_kwargs(split))
            if marks is not None:
                marks.append(_mark(dev))
            if plan.glob is not None:
                _add_global(out, plan, b, kap, bbar, lo, hi, u2, eps)
            if marks is not None:
                marks.append(_mark(dev))
                pending.append((dict(LB=b.LB, texts=b.Mb, images=hi - lo, pairs=(hi - lo) * b.Mb), marks))
    for rec, (t0, t1, t2) in pending:  # read once every launch is queued: no synchronisation between them
        timings.append(dict(rec, kernel_s=_seconds(t0, t1), global_s=_seconds(t1, t2)))
    return out


def _check_read_slack(plan: TilePlan) -> None:
    """The tiles read past the end of each feature tensor (:func:`read_slack`): refuse a plan
    whose tensors lack the slack (made elsewhere than in :func:`plan_tiles`) before any launch."""
    for side in (plan.images, *plan.buckets):
        for name in ("Q", "Kk", "O"):
            t = getattr(side, name)
            have = slack_after(t, lo_plane_offset(t) if side.split is not None else 0)
            if have < read_slack(t.shape[-1]):
                raise RuntimeError(f"tile plan: {type(side).__name__}.{name} has {have} elements after it, the tiles "
                                   f"read up to {read_slack(t.shape[-1])}: make plans with plan_tiles")


def _mark(dev: torch.device):
    """A point in time on ``dev``: a recorded CUDA event (the current stream), or the wall clock."""
    if dev.type != "cuda":
        return time.perf_counter()
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def _seconds(a, b) -> float:
    """Seconds between two :func:`_mark` s."""
    if isinstance(a, float):
        return b - a
    b.synchronize()
    return a.elapsed_time(b) / 1e3
