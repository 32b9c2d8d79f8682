"""Offline kernel report: every shipped Triton configuration built for sm_90 on this CPU (issue 10).

    python bench/kernel_report.py --json r.json [--kernels v2,v1] [--variants ...] [--dtypes ...]

No GPU needed: each configuration of the similarity kernels is compiled for Hopper with
``bench/offline_compile.py`` (``triton.compile`` with ``GPUTarget("cuda", 90, 32)``) at the
COCO shape (K = 36 regions, text buckets of 16 and 32 tokens, D = 1024, H = 8), for both
variants and both storage paths (bf16; fp32, held as fp16 pairs whose dots are f16x3 in v2, IEEE on CUDA
cores in v1), and one record per configuration says what the GPU would run:

- ``registers``, ``spill_bytes`` (STL bytes in SASS: spills never show in PTX),
  ``stack_bytes``, ``shared_bytes``;
- ``spill_instructions_per_pair``: the spill loads and stores a program issues (loop bodies ×
  trip counts, like the instructions below) per pair: a few once per tile cost little, a few
  in a loop over the heads cost eight times per tile and per warp;
- ``wgmma``: every main dot is a warp-group MMA (the κ dot of the pairwise global
  score and their row sums, one row or column per pair, the batched p·Γw per text
  (tiles.batched_gw), and v1's per-pair dots are not main dots of a tile);
- ``warp_instructions_per_pair``: SASS instructions one warp issues per program
  (loop bodies × trip counts) × warps per program / pairs per program;
- ``useful_macs_per_pair``: spec §8 count at COCO's mean valid sizes (K = 36, L = 14);
  ``padded_macs_per_pair``: the same count at the sizes the kernel pads to (v2: BR/GI
  rows per image, the bucket's LB tokens; v1: powers of two); their ratio is the
  padding efficiency;
- ``tensor_core_macs_per_pair``: what the tensor cores actually multiply per pair
  (HGMMA/HMMA in SASS × trip counts), Γ products and masked blocks included;
- ``global_bytes_per_pair``: bytes the program's global loads and stores ask for per pair
  (access width × 32 lanes × warps × trip counts; masked-off lanes counted, so an upper
  estimate): what the tiles read from L2 (features once per pass over the heads, Γ blocks,
  paper's scratch) and write.

Beside the records, ``coco_grid_estimates``: per kernel, variant and dtype, floors on the time
of the full COCO 5K x 25K grid on an H200 (:func:`grid_estimates`: warp-instructions at one
per scheduler and cycle, tensor-core work at the issue's 790 TFLOP/s), set against the
issue's GPU targets, so that a commit that makes the GPU target unreachable shows offline;
beside each floor the time its global traffic takes at the issue's assumed L2 bandwidth.
paper's records include its pairwise global score's kernel (kernels/pair_global.py, ``part``
"global score", one row per pair), whose floor over all pairs adds to the tiles'.

Trip counts come from the kernel's structure (heads, tiles, Γ chunks); each mapping is
checked against the tensor-core multiply-adds the design says a program does, so a
wrong mapping fails loudly instead of printing a wrong figure. The records of the old
(v1, one program per pair) and new (v2, tiles) kernels sit side by side.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.flops import pair_macs  # noqa: E402
from bench.offline_compile import compile_offline_many, report_record  # noqa: E402

H, D, K = 8, 1024, 36
DH = D // H
L_MEAN = 14  # mean valid wordpieces of COCO-like captions (bench/gpu_check.py's draw: 14.0)


E_EMBED = 1024  # width of the acf-code global embeddings
BUCKETS = (16, 32)
TARGETS = {  # issue 10: warp-instructions per pair (bf16), padding efficiency
    ("v2", "acf-code", "bf16"): 10_000,
    ("v2", "paper", "bf16"): 60_000,
}
MIN_PADDING_EFFICIENCY = 0.7
GRID = (5000, 25000)  # the COCO 5K test: images x captions
GPU_TARGETS_S = {("acf-code", "bf16"): 2.0, ("paper", "bf16"): 6.0}  # issue 10, H200, bf16 full grid
# The issue's H200: 132 SMs at a sustained 1.83 GHz, each with 4 warp schedulers that issue at
# most one warp-instruction per cycle; dense 16-bit tensor-core products at 790 TFLOP/s (what
# large GEMMs reach; the data sheet's 989 they do not). fp16 (the f16x3 path) runs at bf16's rate.
# L2: the middle of the issue's 7-9 TB/s (an assumption until a GPU run measures it).
H200 = dict(sms=132, clock_hz=1.83e9, schedulers=4, tensor_flops=790e12, l2_bytes_per_s=8e12)
SM90_SHARED_LIMIT = 232_448  # bytes of dynamic shared memory one block may launch with on sm_90


def _tiles():
    from acf_fast.kernels import tiles

    return tiles


def _v1():
    from acf_fast.kernels import pair_v1

    return pair_v1


# --------------------------------------------------------------------------- v2: tiles


def v2_requests(variants, dtypes, buckets=BUCKETS):
    """One build request per shipped v2 configuration (as the launcher would specialise it)."""
    tiles = _tiles()
    out = []
    for variant in variants:
        full = variant == "paper"
        for dname in dtypes:
            # fp32 tiles are held as fp16 pairs (f16x3 dots, tiles.plan_tiles); κ / b̄ come back in fp32
            st = "*bf16" if dname == "bf16" else "*fp16"
            prec = "tf32" if dname == "bf16" else "f16x3"
            # κ / b̄ and the scratch exist for full Γ only: elsewhere launch_tiles passes the fp32 norms
            kl = "*fp32" if dname == "fp32" or not full else st
            scratch = st if full else "*fp32"
            for LB in buckets:
                rows = tiles.image_rows(K, full_heads=H if full else None)  # the layout's rows per image
                ce = tiles.tile_constexprs(H, DH, rows, LB, full=full, shared_qk=not full, o_is_q=not full,
                                           pairwise=full, embed=not full, HKP=tiles.hkp_of(H, rows),
                                           dot_prec=prec)
                # integer types as the COCO launch passes them (Triton types an int below 2^31 i32)
                sig = dict(S_ptr="*fp32", stride_sn="i32", stride_sm="i32", vq_ptr=st, vk_ptr=st, vo_ptr=st,
                           stride_vh="i32:16", vmask_ptr="*i8", vnorm_ptr="*fp32", vgam_ptr=st,
                           wq_ptr=st, wk_ptr=st, wo_ptr=st, stride_wh="i32:16", wmask_ptr="*i8", wnorm_ptr="*fp32",
                           wcol_ptr="*i32", wgam_ptr=st, scratch_ptr=scratch, kap_ptr=kl, bbar_ptr=kl,
                           lo_v="i32:16", lo_w="i32:16", lo_gv="i32:16", lo_gw="i32:16",
                           N="i32", Mb="i32", n_it="i32", n_tt="i32", s_i2t="fp32", s_t2i="fp32", u1="fp32", u2="fp32",
                           eps="fp32")
                for cfg in tiles._prune(tiles._configs(False), {}, **ce):  # what the autotuner may launch
                    meta = {**ce, **cfg.kwargs}
                    out.append(dict(request=dict(fn=tiles._tile_kernel, signature=sig, constexprs=meta,
                                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages),
                                    kernel="v2", variant=variant, dtype=dname, LB=LB, meta=meta))
    return out


def v2_expected_macs(m: dict) -> int:
    """Tensor-core multiply-adds of one v2 program (one tile), from the kernel's structure
    (f16x3, the fp32 path, runs every product three times). The pairwise global score's
    row sums are formed transposed, 128 rows by PP pair columns (tiles._pair_means_dot),
    so no warp group repeats them."""
    BR, BC, DHp, Hh = m["BR"], m["BC"], m["DH"], m["H"]
    k = 3 if m["DOT_PREC"] == "f16x3" else 1
    per_head = 2 * BR * BC * DHp  # the two logits products
    if not m["O_IS_Q"]:
        per_head += 2 * BR * BC * DHp
    if not m["FULL"]:
        # A·Γw (batched: one (BR, LB) x (LB, LB) per text), B·Γv (the Γ blocks are read, computed once per item)
        # (tiles.half_gw: two products of the column halves, each (BR, BC/2) x (BC/2, BC/2))
        if m["BATCHED_GW"]:
            p_gw = m["GT"] * BR * m["LB"] ** 2
        else:
            p_gw = BR * BC * BC // (2 if m["HALF_GW"] else 1)
        per_head += p_gw + BC * BR * BR
    total = Hh * per_head * k
    # the keys' mask bias (tiles._add_mask_bias): one bf16 K = 16 product per biased direction and head
    total += Hh * ((m["MASK_I2T"] == "bias") + (m["MASK_T2I"] == "bias")) * BR * BC * 16
    if m["FULL"]:
        # the quadratic forms take Γ's upper triangle of QC x QC chunks (tiles._gamma_form)
        def form(side, QC):
            nc = side // QC
            return nc * (nc + 1) // 2 * QC * QC

        total += (m["GT"] * BR * form(Hh * m["LB"], m["QCW"]) + m["GI"] * BC * form(m["HKP"], m["QCV"])) * k
    if m["PAIRWISE"]:
        PP = m["PP"]
        kappa = PP * BC * DHp  # b̄ leaves as it is (pair_global.py multiplies it by Pv)
        # A's rows summed per image: a dot except under f16x3 (masked sums); B's per text are
        # sums over each text's LB rows (a reshape), no dot
        row_sums = 0 if k == 3 else PP * BR * BC
        total += Hh * (k * kappa + row_sums)
    return total


def _mma_in(instrs, lp) -> int:
    """Tensor-core instructions (HGMMA, HMMA) in SASS loop ``lp`` (inner loops included)."""
    return sum(1 for ins in instrs if lp.start <= ins.address <= lp.end and ins.opcode.startswith(("HGMMA", "HMMA")))


def v2_trips(build, m: dict):
    """Trip count of each SASS loop of a v2 build: the tile loop runs once per tile (we
    count per tile), each head loop (two with SPLIT) H times; each full-Γ quadratic form of
    more than two chunks (tiles._gamma_form unrolls up to two) its loop over its NC chunks NC
    times, and within it the loop over the chunks before the current one (NC - 1) / 2 times
    on average."""
    instrs = build.instructions()
    loops = list(build.loops)
    # the head loops (SPLIT: regions -> words, then words -> regions) hold the most wgmma
    head_loops = sorted((lp for lp in loops if lp.depth == 1),
                        key=lambda lp: _mma_in(instrs, lp))[-(2 if m["SPLIT"] else 1):]
    HL = m["H"] * m["LB"]
    ncw, ncv = HL // m["QCW"], m["HKP"] // m["QCV"]
    quad = []  # phase B chunk loops in SASS order: i2t (per text) then t2i (per image), outer then inner
    if m["FULL"]:
        quad = [ncw, (ncw - 1) / 2] * (m["GT"] if ncw > 2 else 0) + [ncv, (ncv - 1) / 2] * (m["GI"] if ncv > 2 else 0)
    trips, q = [], iter(quad)
    for lp in loops:
        if lp.depth == 0:
            trips.append(1)
        elif lp in head_loops:
            trips.append(m["H"])
        elif _mma_in(instrs, lp):
            trips.append(next(q))
        else:
            raise RuntimeError(f"v2 build: a loop without tensor-core work at depth {lp.depth} "
                               f"({lp.body_instructions} instructions) that the trip-count mapping does not know")
    return trips


def v2_records(variants, dtypes, log, buckets=BUCKETS):
    reqs = v2_requests(variants, dtypes, buckets)
    t0 = time.perf_counter()
    builds = compile_offline_many([r["request"] for r in reqs])
    log(f"v2: {len(builds)} builds in {time.perf_counter() - t0:.0f} s")
    recs = []
    for r, b in zip(reqs, builds):
        m = r["meta"]
        pairs = m["GI"] * m["GT"]
        rows_per_image = m["BR"] / m["GI"]
        rec = _record(b, v2_trips(b, m), v2_expected_macs(m), pairs, r,
                      padded_K=rows_per_image, padded_L=m["LB"], L_useful=coco_buckets()[m["LB"]][1])
        rec["tile"] = f"{m['GI']} images x {m['GT']} texts ({m['BR']} x {m['BC']} rows)"
        rec["head_passes"] = 2 if m["SPLIT"] else 1
        rec["dots"] = "bf16" if r["dtype"] == "bf16" else m["DOT_PREC"]
        rec["batched_gw"] = m["BATCHED_GW"]  # p·Γw one small dot per text (tiles.batched_gw)
        rec["half_gw"] = m["HALF_GW"]  # p·Γw two dots of the column halves (tiles.half_gw)
        rec["mask_modes"] = [m["MASK_I2T"], m["MASK_T2I"]]  # how each direction masks its keys (tiles.mask_mode)
        recs.append(rec)
    return recs


# --------------------------------------------------------------------------- v2: the pairwise global score


def global_requests(dtypes):
    """One build request per dtype path of kernels/pair_global.py (paper's pairwise global
    score after the tiles) at the COCO shape: κ of H·DH = 1024 columns, b̄ of H·K = 320 (the
    tiles' 40 rows per image), D = 1024."""
    import torch

    from acf_fast.kernels import pair_global

    out = []
    HK = H * _tiles().image_rows(K, full_heads=H)
    for dname in dtypes:
        meta = pair_global.pair_global_meta(torch.bfloat16 if dname == "bf16" else torch.float32, interpret=False)
        f16x3 = meta["DOT_PREC"] == "f16x3"
        st = "*bf16" if dname == "bf16" else "*fp32"
        zt = "*fp16" if f16x3 else st  # fp32: Zw, Pv as fp16 pairs
        sig = dict(S_ptr="*fp32", stride_sn="i32", stride_sm="i32", col_ptr="*i32", kap_ptr=st, bbar_ptr=st,
                   zw_ptr=zt, lo_zw="i32:16", pv_ptr=zt, stride_pv="i32:16", lo_pv="i32:16",
                   pv_unscale_ptr="*fp32", gx_ptr="*fp32", stride_gx="i32:16", Mb="i32", HD="i32:16", HK="i32:16",
                   D="i32:16", unscale_w="fp32", coef="fp32", eps="fp32")
        ce = {k: meta[k] for k in ("BM", "BN", "BK", "DOT_PREC")}
        out.append(dict(request=dict(fn=pair_global._pair_global_kernel, signature=sig, constexprs=ce,
                                     num_warps=meta["num_warps"], num_stages=meta["num_stages"]),
                        kernel="v2", variant="paper", dtype=dname, LB=None, meta=dict(ce, HD=H * DH, HK=HK, D=D)))
    return out


def global_trips(build, m: dict):
    """Its loops: over D in chunks of BN (once per program); within it the K-loop of W_g over
    H·DH and then that of V_g over H·K, in steps of BK (in the source's order; their bodies
    are the same product, so the MAC check cannot tell them apart, nor need to)."""
    depths = [lp.depth for lp in build.loops]
    if depths != [0, 1, 1]:
        raise RuntimeError(f"pair-global build: loops at depths {depths}, expected [0, 1, 1]")
    return [m["D"] // m["BN"], m["HD"] // m["BK"], m["HK"] // m["BK"]]


def global_records(dtypes, log):
    """Records of the pairwise global score's kernel (``part`` "global score"), per pair:
    its builds' counts like the tiles' (per program: one image against BM texts;
    grid_estimates counts each image's partly empty last block)."""
    reqs = global_requests(dtypes)
    builds = compile_offline_many([r["request"] for r in reqs])
    log(f"pair-global: {len(builds)} builds")
    recs = []
    for r, b in zip(reqs, builds):
        m = r["meta"]
        trips = global_trips(b, m)
        expected = m["BM"] * (m["HD"] + m["HK"]) * m["D"] * (3 if m["DOT_PREC"] == "f16x3" else 1)  # κ Zw, b̄ Pv
        pairs = m["BM"]
        rec = _per_pair_record(b, trips, expected, pairs, exact=True, what=f"pair-global {r['dtype']}",
                               variant="paper", dtype=r["dtype"], bucket="all", version="v2", pairs_per_program=pairs)
        rec.update(part="global score", spill_bytes=b.spill_store_bytes, main_dots=b.dots_total, wgmma=b.wgmma,
                   head_passes=None, dots="bf16" if r["dtype"] == "bf16" else m["DOT_PREC"], columns_per_chunk=m["BN"],
                   useful_macs_per_pair=None, padded_macs_per_pair=None, padding_efficiency=None,
                   tile=f"{pairs} pairs x {m['BN']} columns of D")
        recs.append(rec)
    return recs


# --------------------------------------------------------------------------- v1: one pair per program


def v1_requests(variants, dtypes):
    v1 = _v1()
    import torch

    out = []
    for variant in variants:
        full = variant == "paper"
        for dname in dtypes:
            st_t = torch.bfloat16 if dname == "bf16" else torch.float32
            st = "*bf16" if dname == "bf16" else "*fp32"
            L = 32
            KP, LP = v1._pow2(K), v1._pow2(L)
            fac_bytes = 2 if dname == "bf16" else 4

            class _S:  # the attributes _r_chunk reads
                block_diagonal = not full
                fac = torch.empty(0, dtype=st_t)

            RV, RW = (K, L) if not full else (H * K, H * L)
            RVP, RWP = v1._pow2(RV), v1._pow2(RW)
            RVC, RWC = v1._r_chunk(LP, KP, RVP, _S), v1._r_chunk(KP, LP, RWP, _S)
            del fac_bytes
            meta = dict(H=H, HP=H, DH=DH, D=D, KP=KP, LP=LP, KB=v1._query_block(KP, RWC), LB=v1._query_block(LP, RVC),
                        RV=RV, RVP=RVP, RVC=RVC, RW=RW, RWP=RWP, RWC=RWC, E=E_EMBED if not full else 1,
                        BLOCK_DIAG=not full, O_IS_Q=not full, PAIRWISE=full, EMBED=not full,
                        BLOCK_D=max(16, min(64, D, v1._REG_TILE // (H * max(KP, LP)))),
                        BLOCK_E=min(256, E_EMBED) if not full else 1, DOT_PREC="tf32" if dname == "bf16" else "ieee",
                        GROUP_N=32)
            sig = dict(S_ptr="*fp32", stride_sn="i64", stride_sm="i64",
                       vq_ptr=st, vk_ptr=st, vo_ptr=st, vmask_ptr="*i8", vnorm_ptr="*fp32", vfac_ptr=st, vpg_ptr=st,
                       vgx_ptr="*fp32", wq_ptr=st, wk_ptr=st, wo_ptr=st, wmask_ptr="*i8", wnorm_ptr="*fp32",
                       wfac_ptr=st, wpg_ptr=st, gi_ptr="*fp32", gt_ptr="*fp32",
                       N="i32", M="i32", K="i32", L="i32", s_i2t="fp32", s_t2i="fp32", u1="fp32", u2="fp32")
            out.append(dict(request=dict(fn=v1._acf_pair_kernel, signature=sig, constexprs=meta, num_warps=8,
                                         num_stages=1),
                            kernel="v1", variant=variant, dtype=dname, LB=L, meta=meta))
    return out


def v1_expected_macs(m: dict):
    """Tensor-core multiply-adds of one v1 program (one pair), or None where its dots run on
    CUDA cores (fp32 'ieee') or the factor is passed in several column chunks."""
    if m["DOT_PREC"] == "ieee" or m["RWC"] != m["RWP"] or m["RVC"] != m["RVP"]:
        return None
    KP, LP, DHp, Hh = m["KP"], m["LP"], m["DH"], m["H"]
    n_dots = 1 if m["O_IS_Q"] else 2
    i2t = KP * LP * DHp * n_dots + KP * LP * (LP if m["BLOCK_DIAG"] else m["RWC"])
    t2i = LP * KP * DHp * n_dots + LP * KP * (KP if m["BLOCK_DIAG"] else m["RVC"])
    return Hh * (i2t + t2i)


def v1_trips(build, m: dict):
    """v1's SASS loops: per direction a loop over query-row blocks (when there are several)
    around the head loop, then the global score's D loop (paper) or E loop (acf-code)."""
    instrs = build.instructions()
    blocks = iter([m["KP"] // m["KB"], m["LP"] // m["LB"]])
    trips = []
    for lp in build.loops:
        if not _mma_in(instrs, lp):
            trips.append(m["D"] // m["BLOCK_D"] if m["PAIRWISE"] else -(-E_EMBED // m["BLOCK_E"]))
        elif lp.depth == 1 or (lp.depth == 0 and not any(o.depth == 1 and lp.start <= o.start <= lp.end
                                                         for o in build.loops)):
            trips.append(m["H"])  # a head loop (with a single query block it is the outer loop)
        else:
            trips.append(next(blocks))
    return trips


def v1_records(variants, dtypes, log):
    reqs = v1_requests(variants, dtypes)
    t0 = time.perf_counter()
    builds = compile_offline_many([r["request"] for r in reqs])
    log(f"v1: {len(builds)} builds in {time.perf_counter() - t0:.0f} s")
    recs = []
    for r, b in zip(reqs, builds):
        m = r["meta"]
        expected = v1_expected_macs(m)
        trips = v1_trips(b, m) if expected is not None else None
        rec = _record(b, trips, expected, 1, r, padded_K=m["KP"], padded_L=m["LP"], L_useful=L_MEAN)
        rec["tile"] = "1 image x 1 text (one program per pair)"
        rec["head_passes"] = 1
        recs.append(rec)
    return recs


# --------------------------------------------------------------------------- records


def _per_pair_record(build, trips, expected_macs: int, pairs: int, *, exact: bool, what: str, **extra) -> dict:
    """offline_compile.report_record of ``build`` plus its counts per pair, after checking the
    trip-count mapping: the tensor-core multiply-adds it gives must equal the design's
    ``expected_macs`` per program (``exact``), else lie within 1-4x of them."""
    rec = report_record(build, trips, **extra)
    macs = rec["mma_macs"]
    if macs != expected_macs if exact else not expected_macs <= macs <= 4 * expected_macs:
        raise RuntimeError(f"{what}: the trip-count mapping gives {macs} tensor-core MACs per program, the design "
                           f"{expected_macs}: loops {[(lp.depth, lp.body_instructions) for lp in build.loops]}")
    rec["warp_instructions_per_pair"] = rec["warp_instructions"] * build.num_warps / pairs
    rec["spill_instructions_per_pair"] = rec["spill_instructions"] * build.num_warps / pairs
    rec["design_mma_macs_per_pair"] = expected_macs / pairs
    rec["tensor_core_macs_per_pair"] = macs / pairs
    rec["global_bytes_per_pair"] = (rec["global_load_bytes"] + rec["global_store_bytes"]) / pairs
    return rec


def _record(build, trips, expected_macs, pairs: int, req: dict, *, padded_K: float, padded_L: float,
            L_useful: float) -> dict:
    variant = req["variant"]
    extra = dict(variant=variant, dtype=req["dtype"], bucket=req["LB"], version=req["kernel"], pairs_per_program=pairs)
    if trips is None:
        rec = {"kernel": build.name, "num_warps": build.num_warps, "num_stages": build.num_stages,
               "registers": build.registers, "stack_bytes": build.stack_bytes, "spill_stores": build.spill_stores,
               "spill_store_bytes": build.spill_store_bytes, "shared_bytes": build.shared_bytes,
               "dots_total": build.dots_total, "dots_wgmma": build.dots_wgmma, "hgmma": build.hgmma,
               "hmma": build.hmma, "ffma": build.ffma, "sass_instructions": build.sass_instructions,
               "loops": [lp._asdict() for lp in build.loops], "compile_seconds": build.compile_seconds,
               "triton": build.triton_version, **extra}
        rec["warp_instructions_per_pair"] = None
        rec["spill_instructions_per_pair"] = None
        rec["tensor_core_macs_per_pair"] = None
        rec["global_bytes_per_pair"] = None
        rec["note"] = ("per-pair counts not derived: fp32 dots on CUDA cores (no tensor-core work to check the "
                       "trip-count mapping against)")
    else:
        # v2's tiles fill every warp; v1's small per-pair dots can be replicated across warps
        # (issued, so counted): there the design is a floor, not an equality.
        rec = _per_pair_record(build, trips, expected_macs, pairs, exact=req["kernel"] == "v2",
                               what=f"{build.name} {variant} {req['dtype']} LB={req['LB']}", **extra)
    rec["spill_bytes"] = build.spill_store_bytes
    m = req["meta"]
    # κ (a PP-row dot, 3 under f16x3) and the row sums (dots except under f16x3) are not main dots,
    # nor is the batched p·Γw (tiles.batched_gw: per text (BR, LB) x (LB, LB), 1/8 of a tile's dot, mma.sync)
    f16x3 = m.get("DOT_PREC") == "f16x3"
    aux = (3 if f16x3 else 2) if req["kernel"] == "v2" and m.get("PAIRWISE") else 0
    if req["kernel"] == "v2" and m.get("BATCHED_GW"):
        aux += 3 if f16x3 else 1
    if req["kernel"] == "v2":  # the keys' mask bias, a K = 16 product (tiles._add_mask_bias)
        aux += (m["MASK_I2T"] == "bias") + (m["MASK_T2I"] == "bias")
    main_dots = build.dots_total - aux
    rec["main_dots"] = main_dots
    rec["wgmma"] = build.dots_wgmma >= main_dots > 0
    rec["useful_macs_per_pair"] = pair_macs(K, L_useful, D, H, variant)
    rec["padded_macs_per_pair"] = pair_macs(padded_K, padded_L, D, H, variant)
    rec["padding_efficiency"] = rec["useful_macs_per_pair"] / rec["padded_macs_per_pair"]
    rec["L_useful"] = L_useful
    return rec


@functools.lru_cache(maxsize=None)
def coco_buckets(M: int = GRID[1], seed: int = 0) -> dict:
    """gpu_check's COCO-like caption draw per v2 length bucket, drawn once per (M, seed):
    {bucket: (captions, their mean valid length)}; an empty bucket's mean is the bucket
    itself (v1 pads every text to 32 and uses only the means). Read, do not modify."""
    import torch

    from bench.gpu_check import coco_lengths

    lengths = coco_lengths(M, torch.Generator().manual_seed(seed)).float()
    out, lo = {}, 0
    for b in BUCKETS:
        sel = lengths[(lengths > lo) & (lengths <= b)]
        out[b] = (sel.numel(), float(sel.mean()) if sel.numel() else float(b))
        lo = b
    return out


def grid_estimates(records, gpu: dict = H200, grid=GRID, texts_per_bucket=None) -> list:
    """Offline floors on the time of the full COCO grid (``grid`` = images x captions) on an
    H200, per (kernel, variant, dtype), from the records' per-pair counts: per bucket the
    configuration with the lowest floor (the autotuner may find it), whose floor is the
    larger of an issue bound (warp-instructions at one per scheduler and cycle) and a
    tensor-core bound (its tensor-core multiply-adds at ``tensor_flops``); the buckets add.

    Records of the pairwise global score's kernel (``part`` "global score", paper) add their
    own floor over all N x M pairs (``rows``: with each image's partly empty last block of
    texts per bucket): it runs after the tiles (``global_score`` in the result).

    A floor, not a prediction: real kernels issue well under one instruction per cycle per
    scheduler (latencies, barriers, spills) and memory traffic, the precompute and acf-code's
    embedding GEMM are not in it. What a GPU measures per bucket (gpu_check's
    ``full_per_bucket``, its ``global_s`` the global score's kernel) sets against it.

    Beside it, ``l2_s``: the same configurations' global loads and stores
    (``global_bytes_per_pair``) at ``l2_bytes_per_s``, the time the tiles' traffic takes if
    it all hits L2. An estimate, not part of the floor: the bytes count masked lanes and
    pipelined loads ahead, and the bandwidth is assumed."""
    N, M = grid
    if texts_per_bucket is None:
        texts_per_bucket = {b: n for b, (n, _) in coco_buckets(M).items()}
    issue_rate = gpu["sms"] * gpu["schedulers"] * gpu["clock_hz"]  # warp-instructions per second
    groups, global_score = {}, {}
    for r in records:
        if r.get("warp_instructions_per_pair") is None or r.get("tensor_core_macs_per_pair") is None:
            continue  # v1's fp32 dots on CUDA cores: no per-pair counts
        if r.get("part") == "global score":
            global_score[(r["version"], r["variant"], r["dtype"])] = r
        else:
            groups.setdefault((r["version"], r["variant"], r["dtype"]), []).append(r)

    def bounds(r, pairs):
        issue = pairs * r["warp_instructions_per_pair"] / issue_rate
        tensor = pairs * 2 * r["tensor_core_macs_per_pair"] / gpu["tensor_flops"]
        gb = r.get("global_bytes_per_pair")
        return dict(issue_s=issue, tensor_s=tensor, floor_s=max(issue, tensor),
                    l2_s=None if gb is None else pairs * gb / gpu["l2_bytes_per_s"])

    out = []
    for (version, variant, dtype), recs in groups.items():
        per_bucket = []
        # v1 has one configuration for every text (padded to 32); v2 one launch per bucket
        shares = {recs[0]["bucket"]: M} if version == "v1" else texts_per_bucket
        for b, texts in shares.items():
            cands = [r for r in recs if r["bucket"] == b]
            if not cands:
                raise ValueError(f"{version} {variant} {dtype}: no record for bucket {b}, which holds {texts} captions")
            pairs = N * texts
            best = None
            for r in cands:
                cand = dict(bucket=b, pairs=pairs, num_stages=r["num_stages"], head_passes=r.get("head_passes", 1),
                            **bounds(r, pairs))
                if best is None or cand["floor_s"] < best["floor_s"]:
                    best = cand
            per_bucket.append(best)
        # the pairwise global score's kernel runs after the tiles, over every pair: its floor adds.
        # A program holds one image against pairs_per_program texts of one bucket, so each
        # image's last block of a bucket is partly empty: those rows are counted (COCO: ~1 %)
        g = global_score.get((version, variant, dtype))
        parts = list(per_bucket)
        if g:
            bm = g.get("pairs_per_program", 1)
            rows = N * sum(-(-t // bm) * bm for t in texts_per_bucket.values())
            parts.append(dict(bucket="global score", pairs=N * M, rows=rows, **bounds(g, rows)))
        out.append(dict(version=version, variant=variant, dtype=dtype, grid=list(grid),
                        floor_s=sum(p["floor_s"] for p in parts), issue_s=sum(p["issue_s"] for p in parts),
                        tensor_s=sum(p["tensor_s"] for p in parts),
                        l2_s=None if any(p["l2_s"] is None for p in parts) else sum(p["l2_s"] for p in parts),
                        global_score=parts[-1] if g else None,
                        target_s=GPU_TARGETS_S.get((variant, dtype)), per_bucket=per_bucket))
    return out


def build_report(kernels=("v2", "v1"), variants=("acf-code", "paper"), dtypes=("bf16", "fp32"), log=print) -> dict:
    import triton

    recs = []
    if "v2" in kernels:
        recs += v2_records(variants, dtypes, log)
        if "paper" in variants:
            recs += global_records(dtypes, log)
    if "v1" in kernels:
        recs += v1_records(variants, dtypes, log)
    return {"script": "bench/kernel_report.py", "target": "sm_90 (GPUTarget('cuda', 90, 32)), offline",
            "triton": triton.__version__, "shape": dict(K=K, D=D, H=H, buckets=BUCKETS, L_mean=L_MEAN),
            "targets": {f"{k[0]} {k[1]} {k[2]}": v for k, v in TARGETS.items()},
            "min_padding_efficiency": MIN_PADDING_EFFICIENCY, "records": recs,
            "gpu_assumed": H200, "coco_grid_estimates": grid_estimates(recs)}


def markdown(report: dict) -> str:
    rows = ["| kernel | variant | dtype | bucket | warps / stages | head passes | registers | spill B | "
            "spill instr / pair | shared KiB | wgmma | warp-instr / pair | useful / padded MACs | "
            "tensor-core MACs / pair | global KB / pair |",
            "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in report["records"]:
        wi = r["warp_instructions_per_pair"]
        si = r.get("spill_instructions_per_pair")
        tc = r["tensor_core_macs_per_pair"]
        gb = r.get("global_bytes_per_pair")
        pe = r["padding_efficiency"]
        dt = r["dtype"] if r.get("dots", "bf16") == "bf16" else f"{r['dtype']} ({r['dots']})"
        kern = r["version"] if r.get("part") is None else f"{r['version']} {r['part']}"
        rows.append(f"| {kern} | {r['variant']} | {dt} | {r['bucket']} | {r['num_warps']} / "
                    f"{r['num_stages']} | {r.get('head_passes') or '-'} | {r['registers']} | {r['spill_bytes']} | "
                    f"{'-' if si is None else f'{si:.0f}'} | {r['shared_bytes'] / 1024:.0f} | "
                    f"{'yes' if r['wgmma'] else 'no'} | {'-' if wi is None else f'{wi / 1e3:.1f} K'} | "
                    f"{'-' if pe is None else f'{pe:.2f}'} | {'-' if tc is None else f'{tc / 1e6:.2f} M'} | "
                    f"{'-' if gb is None else f'{gb / 1e3:.1f}'} |")
    est = report.get("coco_grid_estimates")
    if est:
        g = report["gpu_assumed"]
        N, M = est[0]["grid"]
        rows += ["", f"Offline floors for the full {N} x {M} grid on an H200 ({g['sms']} SMs at "
                 f"{g['clock_hz'] / 1e9:.2f} GHz, one warp-instruction per scheduler and cycle; tensor cores at "
                 f"{g['tensor_flops'] / 1e12:.0f} TFLOP/s), per bucket the configuration with the lowest floor, COCO-like "
                 "caption lengths; paper's adds the floor of its pairwise global score's kernel over every pair "
                 "(beside it). Lower bounds at those rates, not predictions: memory traffic, the precompute and "
                 "acf-code's embedding GEMM are not in them, and no kernel issues an instruction every cycle. The "
                 "fp32 target is 3 x the bf16 time. L2 traffic: the same configurations' global loads and stores at "
                 f"an assumed {g['l2_bytes_per_s'] / 1e12:.0f} TB/s of L2 (masked lanes and pipelined loads ahead "
                 "counted): an estimate beside the floor, not part of it.", "",
                 "| kernel | variant | dtype | issue bound s | tensor-core bound s | floor s | of it, global score s | "
                 "floor / bf16 floor | L2 traffic s | GPU target s |",
                 "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        bf16 = {(e["version"], e["variant"]): e["floor_s"] for e in est if e["dtype"] == "bf16"}
        for e in est:
            t, b = e["target_s"], bf16.get((e["version"], e["variant"]))
            ratio = "-" if e["dtype"] == "bf16" or not b else f"{e['floor_s'] / b:.1f}"
            l2 = "-" if e.get("l2_s") is None else f"{e['l2_s']:.2f}"
            gs = "-" if e.get("global_score") is None else f"{e['global_score']['floor_s']:.2f}"
            rows.append(f"| {e['version']} | {e['variant']} | {e['dtype']} | {e['issue_s']:.2f} | {e['tensor_s']:.2f} | "
                        f"{e['floor_s']:.2f} | {gs} | {ratio} | {l2} | {'-' if t is None else f'{t:g}'} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="where to write the report (JSON)")
    p.add_argument("--md", default=None, help="also write the table as markdown here")
    p.add_argument("--kernels", default="v2,v1")
    p.add_argument("--variants", default="acf-code,paper")
    p.add_argument("--dtypes", default="bf16,fp32")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_report: unset TRITON_INTERPRET (the kernels are compiled, not interpreted)", file=sys.stderr)
        return 2
    rep = build_report(tuple(a.kernels.split(",")), tuple(a.variants.split(",")), tuple(a.dtypes.split(",")))
    from acf_fast.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(Path(a.json), rep)
    md = markdown(rep)
    if a.md:
        atomic_write_text(Path(a.md), md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
