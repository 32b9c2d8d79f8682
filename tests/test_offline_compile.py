"""bench/offline_compile.py: real sm_90 builds on the CPU, and what their SASS says.

tests/conftest.py sets TRITON_INTERPRET=1 for the whole session before this module is imported,
so the kernels below are interpreted functions here. ``compile_offline`` rebuilds them in ONE
child process with the variable removed, importing this module by name (hence every kernel is
defined at module level); the ``builds`` fixture batches all of them through
``compile_offline_many`` so the child's start-up is paid once. With ``--device cuda`` (no
interpreter) the same builds run in-process. Nothing here needs a GPU.

References are independent of the code under test: tensor-core multiply-adds against M*N*K of the
tile (times the loop trips), the JIT's own argument binder for the specialisation, and a
hand-written SASS listing whose loops and counts are worked out by hand.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from bench.offline_compile import (OfflineBuild, SassLoop, _ast_arguments, compile_offline,
                                   compile_offline_many, demo_matmul, dynamic_global_bytes, dynamic_instructions,
                                   dynamic_mma_macs, find_loops, parse_sass, report_record)


@triton.jit
def one_dot(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N]; one tile, no loop."""
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


@triton.jit
def tiles_by_k(a_ptr, b_ptr, c_ptr, n_tiles, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """For each of n_tiles column tiles: C_t[BM, BN] = A[BM, K] @ B_t[K, BN] (two nested runtime loops)."""
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    for t in range(n_tiles):
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
            b = tl.load(b_ptr + t * K * BN + (k + rk)[:, None] * BN + rn[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + t * BM * BN + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def tma_k_loop(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """The K-loop matmul through tensor descriptors (TMA): its mbarrier waits are retry loops."""
    a_d = tl.make_tensor_descriptor(a_ptr, shape=[BM, K], strides=[K, 1], block_shape=[BM, BK])
    b_d = tl.make_tensor_descriptor(b_ptr, shape=[K, BN], strides=[BN, 1], block_shape=[BK, BN])
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        acc = tl.dot(a_d.load([0, k]), b_d.load([k, 0]), acc)
    tl.store(c_ptr + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :], acc)


@triton.jit
def row_softmax(x_ptr, y_ptr, R: tl.constexpr, C: tl.constexpr):
    """Softmax of each row of an [R, C] fp32 tile: the whole tile stays live across the reductions."""
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    x = tl.load(x_ptr + offs)
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    tl.store(y_ptr + offs, e / tl.sum(e, axis=1)[:, None])


DOT_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32"}
REQUESTS = {
    "wgmma": dict(fn=one_dot, signature=DOT_SIG, constexprs={"M": 128, "N": 128, "K": 64}, num_warps=4),
    "mma_sync": dict(fn=one_dot, signature=DOT_SIG, constexprs={"M": 16, "N": 128, "K": 64}, num_warps=4),
    "k_loop": dict(fn=demo_matmul, signature={**DOT_SIG, "K": "i32:16", "stride_am": "i32:16",
                                              "stride_bk": "i32:16", "stride_cm": "i32:16"},
                   constexprs={"BM": 128, "BN": 128, "BK": 64}, num_warps=4, num_stages=3),
    "nested": dict(fn=tiles_by_k, signature={**DOT_SIG, "n_tiles": "i32", "K": "i32:16"},
                   constexprs={"BM": 64, "BN": 64, "BK": 32}, num_warps=4, num_stages=2),
    "tma": dict(fn=tma_k_loop, signature={**DOT_SIG, "K": "i32:16"},
                constexprs={"BM": 128, "BN": 128, "BK": 64}, num_warps=4, num_stages=3),
    # 64 x 128 fp32 in one warp: 256 values per thread > 255 registers; 32 x 128 fits
    "spills": dict(fn=row_softmax, signature={"x_ptr": "*fp32", "y_ptr": "*fp32"}, constexprs={"R": 64, "C": 128},
                   num_warps=1),
    "no_spills": dict(fn=row_softmax, signature={"x_ptr": "*fp32", "y_ptr": "*fp32"},
                      constexprs={"R": 32, "C": 128}, num_warps=1),
}


@pytest.fixture(scope="module")
def builds():
    return dict(zip(REQUESTS, compile_offline_many(list(REQUESTS.values()))))


def test_large_bf16_dot_maps_to_wgmma(builds):
    b = builds["wgmma"]
    assert isinstance(b, OfflineBuild) and b.arch == 90 and b.name == "one_dot"
    assert b.dots_total == 1 and b.dots_wgmma == 1 and b.wgmma
    assert b.hgmma > 0 and b.hmma == 0 and b.ffma == 0
    assert b.loops == [] and dynamic_instructions(b, []) == b.sass_instructions
    # every multiply-add of the tile on warp-group MMA, none twice
    assert dynamic_mma_macs(b, []) == 128 * 128 * 64
    assert "HGMMA" in b.sass and ".version" in b.ptx and "ttng.warp_group_dot" in b.ttgir
    assert 0 < b.registers <= 255 and b.shared_bytes > 0 and b.compile_seconds > 0


def test_sixteen_row_dot_falls_back_to_mma_sync(builds):
    b = builds["mma_sync"]
    assert b.dots_total == 1 and b.dots_wgmma == 0 and not b.wgmma
    assert b.hmma > 0 and b.hgmma == 0
    assert dynamic_mma_macs(b, []) == 16 * 128 * 64


def test_k_loop_is_found_and_scales_with_its_trip_count(builds):
    b = builds["k_loop"]
    assert len(b.loops) == 1 and b.loops[0].depth == 0 and b.wait_loops == []
    body = b.loops[0].body_instructions
    assert 0 < body < b.sass_instructions
    d = {t: dynamic_instructions(b, [t]) for t in (1, 4, 16)}
    assert d[16] - d[4] == 12 * body and d[4] - d[1] == 3 * body
    assert d[1] == b.sass_instructions               # one trip: every instruction once
    for t in (1, 16):                                # K = 64 t: all of A @ B on tensor cores, once
        assert dynamic_mma_macs(b, [t]) == 128 * 128 * 64 * t
    assert dynamic_instructions(b, lambda depth, i: 16) == d[16]
    assert dynamic_instructions(b, [16], opcodes=("HGMMA",)) == 16 * b.hgmma


def test_nested_loops_multiply_their_trip_counts(builds):
    b = builds["nested"]
    assert [lp.depth for lp in b.loops] == [0, 1]
    outer, inner = b.loops
    assert outer.start <= inner.start and inner.end <= outer.end
    assert inner.body_instructions < outer.body_instructions
    for n_tiles, k_steps in ((1, 1), (3, 5), (7, 2)):
        assert dynamic_mma_macs(b, [n_tiles, k_steps]) == n_tiles * k_steps * 64 * 64 * 32
    # bilinear in the trips: d = a + b * outer + c * outer * inner
    d = lambda o, i: dynamic_instructions(b, [o, i])  # noqa: E731
    assert d(2, 3) - d(1, 3) == d(5, 3) - d(4, 3)
    assert d(2, 7) - d(2, 6) == 2 * (d(1, 7) - d(1, 6)) == 2 * inner.body_instructions


def test_barrier_retry_loops_count_once_and_need_no_trip_count(builds):
    b = builds["tma"]
    assert len(b.loops) == 1 and len(b.wait_loops) >= 1
    at = {ins.address: ins for ins in b.instructions()}
    assert all(at[w.start].opcode.startswith("SYNCS.PHASECHK") for w in b.wait_loops)
    # the retry blocks sit after EXIT and jump back into the loop: they belong to it, they make no loop
    assert dynamic_mma_macs(b, [16]) == 128 * 128 * 64 * 16 and b.wgmma


def test_spills_are_seen_in_sass_and_a_small_tile_has_none(builds):
    big, small = builds["spills"], builds["no_spills"]
    assert big.spill_stores > 0 and big.spill_loads > 0 and big.stack_bytes > 0
    assert big.spill_store_bytes >= 4 * big.spill_stores
    assert ".local" not in big.ptx                    # PTX never shows spills: they come from ptxas
    assert small.spill_stores == small.spill_loads == small.stack_bytes == small.spill_store_bytes == 0
    assert big.dots_total == small.dots_total == 0 and not big.wgmma
    # the record counts the spill instructions a program issues (no loops here: each once)
    assert not big.loops
    assert report_record(big, [])["spill_instructions"] == big.spill_stores + big.spill_loads > 0
    assert report_record(small, [])["spill_instructions"] == 0


def test_record_is_json_and_refuses_wrong_loop_counts(builds):
    b = builds["k_loop"]
    rec = report_record(b, [16], variant="toy", dtype="bf16")
    again = json.loads(json.dumps(rec))
    assert again == rec and not {"sass", "ttgir", "ptx"} & set(rec)
    assert rec["warp_instructions"] == dynamic_instructions(b, [16]) and rec["trip_counts"] == [16]
    assert rec["mma_macs"] == 128 * 128 * 1024 and rec["spill_stores"] == 0 and rec["wgmma"] is True
    assert rec["variant"] == "toy" and rec["triton"] == triton.__version__ and rec["ptxas"]
    with pytest.raises(ValueError, match="SASS has 1 "):
        dynamic_instructions(b, [16, 2])
    with pytest.raises(ValueError, match="has 2"):
        report_record(builds["nested"], [4])
    with pytest.raises(ValueError, match="overwrite"):
        report_record(b, [16], registers=1)
    with pytest.raises(ValueError, match=">= 0"):
        dynamic_instructions(b, [-1])


def test_arguments_are_specialised_as_the_jit_does():
    """Our ASTSource arguments equal the JIT binder's for aligned torch tensors and a K of 1024."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = JITFunction(demo_matmul.fn)                  # .fn: the Python function, interpreted or not
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    a, b, c = torch.empty(64, dtype=torch.bfloat16), torch.empty(64, dtype=torch.bfloat16), torch.empty(64)
    bound, spec, opts = binder(a, b, c, 1024, 1024, 128, 128, BM=128, BN=128, BK=64)
    _, jit_sig, jit_consts, jit_attrs = jit._pack_args(backend, {"enable_fp_fusion": True}, bound, spec, opts)
    sig, consts, attrs = _ast_arguments(jit.arg_names, REQUESTS["k_loop"]["signature"], REQUESTS["k_loop"]["constexprs"])
    assert sig == jit_sig
    assert {(jit.arg_names.index(k),): v for k, v in consts.items()} == jit_consts
    assert attrs == {k: v for k, v in jit_attrs.items() if v}


def test_bad_requests_fail_before_compiling():
    sig = dict(DOT_SIG)
    with pytest.raises(ValueError, match="'c_ptr'.*missing|missing.*c_ptr"):
        compile_offline(one_dot, {"a_ptr": "*bf16", "b_ptr": "*bf16"}, {"M": 16, "N": 16, "K": 16})
    with pytest.raises(ValueError, match="unknown argument.*'Q'"):
        compile_offline(one_dot, sig, {"M": 16, "N": 16, "K": 16, "Q": 1})
    with pytest.raises(ValueError, match=r"signature\['a_ptr'\]"):
        compile_offline(one_dot, {**sig, "a_ptr": "*bfloat16"}, {"M": 16, "N": 16, "K": 16})
    with pytest.raises(ValueError, match="both"):
        compile_offline(one_dot, {**sig, "M": "i32"}, {"M": 16, "N": 16, "K": 16})
    with pytest.raises(ValueError, match="num_warps"):
        compile_offline(one_dot, sig, {"M": 16, "N": 16, "K": 16}, num_warps=3)
    with pytest.raises(TypeError, match="triton.jit"):
        compile_offline(lambda a_ptr: None, {"a_ptr": "*fp32"}, {})
    # one bad request in a batch: nothing is compiled
    with pytest.raises(ValueError, match="num_stages"):
        compile_offline_many([REQUESTS["wgmma"], {**REQUESTS["mma_sync"], "num_stages": 0}])


def test_demo_cli_prints_a_record():
    """The script itself (its kernel lives in ``__main__``; under the interpreter the child loads it by path)."""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "bench" / "offline_compile.py"), "--demo", "--K", "128"],
                         cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads(out.stdout)
    assert rec["kernel"] == "demo_matmul" and rec["trip_counts"] == [2] and rec["wgmma"] is True
    assert rec["mma_macs"] == rec["useful_macs"] == 128 * 128 * 128 and rec["spill_stores"] == 0


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="the child process serves interpreted kernels")
def test_interpreted_kernels_go_to_a_child_that_imports_them_by_name():
    assert type(one_dot).__name__ == "InterpretedFunction"   # what conftest makes of @triton.jit

    @triton.jit
    def local_kernel(x_ptr):
        pass

    with pytest.raises(ValueError, match="module level"):
        compile_offline(local_kernel, {"x_ptr": "*fp32"}, {})


# A listing in cuobjdump's format, loops worked out by hand:
#   0x00-0x20 entry (3), outer loop 0x30-0xc0 (10 instructions, holding the inner loop 0x50-0x70, 3),
#   a forward branch over 0x90, EXIT, then an out-of-line mbarrier retry loop (0xf0-0x100) that
#   the outer loop jumps to at 0x40 and returns from by 0x110, and the end-of-code trap and NOPs.
SASS = """
        code for sm_90a
                Function : toy
        /*0000*/                   LDC R1, c[0x0][0x28] ;            /* 0x000 */
        /*0010*/                   S2R R0, SR_TID.X ;                 /* 0x000 */
        /*0020*/                   MOV R2, RZ ;                       /* 0x000 */
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;            /* 0x000 */
        /*0040*/              @!P0 BRA 0xf0 ;                         /* 0x000 */
        /*0050*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;  /* 0x000 */
        /*0060*/                   ISETP.NE.AND P1, PT, R2, 0x4, PT ; /* 0x000 */
        /*0070*/               @P1 BRA 0x50 ;                         /* 0x000 */
        /*0080*/               @P2 BRA 0xa0 ;                         /* 0x000 */
        /*0090*/                   FFMA R4, R4, R4, R4 ;              /* 0x000 */
        /*00a0*/                   FADD R4, R4, 1 ;                   /* 0x000 */
        /*00b0*/                   ISETP.NE.AND P3, PT, R2, 0x8, PT ; /* 0x000 */
        /*00c0*/               @P3 BRA 0x30 ;                         /* 0x000 */
        /*00d0*/                   STG.E desc[UR4][R6.64], R4 ;       /* 0x000 */
        /*00e0*/                   EXIT ;                             /* 0x000 */
        /*00f0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4], R3 ;  /* 0x000 */
        /*0100*/              @!P0 BRA 0xf0 ;                         /* 0x000 */
        /*0110*/                   BRA 0x50 ;                         /* 0x000 */
        /*0120*/                   BRA 0x120;                         /* 0x000 */
        /*0130*/                   NOP;                               /* 0x000 */
"""


def _toy_build(sass: str = SASS, name: str = "toy") -> OfflineBuild:
    instrs = parse_sass(sass)
    loops, wait_loops = find_loops(instrs)
    return OfflineBuild(name=name, arch=90, num_warps=4, num_stages=1, registers=0, stack_bytes=0, spill_stores=0,
                        spill_loads=0, spill_store_bytes=0, shared_bytes=0, shared_dynamic_bytes=0, sass=sass,
                        ttgir="", ptx="", dots_total=0, dots_wgmma=0, hgmma=0, hmma=1, ffma=1,
                        sass_instructions=len(instrs), loops=loops, wait_loops=wait_loops, compile_seconds=0.0)


def test_loop_finder_on_a_hand_written_listing():
    b = _toy_build()
    assert b.sass_instructions == 18                 # the trap at 0x120 and the NOP are padding
    # outer: 0x30-0xc0 (10) + the retry block and the jump back (3); inner: 0x50-0x70
    assert b.loops == [SassLoop(0x30, 0xc0, 0, 13), SassLoop(0x50, 0x70, 1, 3)]
    assert b.wait_loops == [SassLoop(0xf0, 0x100, 1, 2)]
    # 3 entry + 2 exit once; per outer trip 13 - 3 inner; per inner trip 3
    for o, i in ((1, 1), (2, 5), (8, 4)):
        assert dynamic_instructions(b, [o, i]) == 5 + o * 10 + o * i * 3
        assert dynamic_instructions(b, [o, i], opcodes=("HMMA",)) == o * i
        assert dynamic_mma_macs(b, [o, i]) == o * i * 16 * 8 * 16 * 4
    assert dynamic_instructions(b, lambda depth, index: (2, 5)[depth]) == 5 + 20 + 30


# Global accesses of every width, one each (no loop), in a 4-warp program.
WIDTHS_SASS = """
        code for sm_90a
                Function : widths
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;   /* 0x000 */
        /*0010*/                   LDG.E.U16 R8, desc[UR4][R2.64] ;   /* 0x000 */
        /*0020*/               @P0 LDG.E.U8 R9, desc[UR4][R2.64] ;    /* 0x000 */
        /*0030*/                   LDGSTS.E.BYPASS.128 [R10], desc[UR4][R2.64] ;  /* 0x000 */
        /*0040*/                   LDS.128 R12, [R10] ;               /* 0x000 */
        /*0050*/                   STG.E.64 desc[UR4][R6.64], R4 ;    /* 0x000 */
        /*0060*/                   STG.E desc[UR4][R6.64], R4 ;       /* 0x000 */
        /*0070*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R6.64], R4 ;  /* 0x000 */
        /*0080*/                   STL [R1], R4 ;                     /* 0x000 */
        /*0090*/                   EXIT ;                             /* 0x000 */
        /*00a0*/                   BRA 0xa0;                          /* 0x000 */
"""


def test_global_bytes_count_each_access_width_for_every_lane_of_every_warp():
    """16 + 2 + 1 + 16 (cp.async) bytes loaded and 8 + 4 + 4 (a reduction) stored per lane,
    times 32 lanes and 4 warps; shared and local memory are not global; a predicated load counts."""
    assert dynamic_global_bytes(_toy_build(WIDTHS_SASS, "widths"), []) == {"load": 35 * 32 * 4, "store": 16 * 32 * 4}
    # the hand-written loop listing: one 32-bit store after its loops, whatever their trips
    assert dynamic_global_bytes(_toy_build(), [3, 7]) == {"load": 0, "store": 4 * 32 * 4}
    tma = WIDTHS_SASS.replace("LDG.E.U16 R8, desc[UR4][R2.64]", "UTMALDG.2D [UR8], [UR4]")
    with pytest.raises(ValueError, match="bulk copy"):
        dynamic_global_bytes(_toy_build(tma, "tma"), [])


def test_global_bytes_of_a_dot_are_its_operands_and_result(builds):
    assert dynamic_global_bytes(builds["wgmma"], []) == {"load": (128 * 64 + 64 * 128) * 2, "store": 128 * 128 * 4}
    assert dynamic_global_bytes(builds["mma_sync"], []) == {"load": (16 * 64 + 64 * 128) * 2, "store": 16 * 128 * 4}


def test_global_bytes_of_pipelined_loops_count_the_loads_issued_ahead(builds):
    """A K-loop with num_stages stages loads num_stages - 1 steps ahead in its prologue, and
    its body's loads for steps past the end are predicated off but counted."""
    b = builds["k_loop"]
    step = (128 * 64 + 64 * 128) * 2  # demo_matmul: one BK step of A and B
    for t in (1, 4, 16):
        assert dynamic_global_bytes(b, [t]) == {"load": (t + b.num_stages - 1) * step, "store": 128 * 128 * 4}
    b = builds["nested"]
    step = (64 * 32 + 32 * 64) * 2
    for n, k in ((1, 1), (3, 5)):
        assert dynamic_global_bytes(b, [n, k]) == {"load": n * (k + b.num_stages - 1) * step, "store": n * 64 * 64 * 4}
