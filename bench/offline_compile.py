"""Offline sm_90 builds of Triton kernels on a machine without a GPU, and what their SASS says.

``compile_offline(fn, signature, constexprs)`` builds a ``@triton.jit`` kernel for Hopper
(``GPUTarget("cuda", 90, 32)``) on the CPU through ``triton.compile`` (so with the ptxas of the
installed triton wheel, as the JIT on a GPU machine with that triton would), then inspects the
cubin with the wheel's ``cuobjdump``. The result, an :class:`OfflineBuild`, holds what the GPU
would run: registers, stack frame, spills (STL/LDL in SASS; spills never show in PTX), shared
memory, which dots became warp-group MMA (wgmma), static instruction counts and the SASS loops.
``dynamic_instructions(build, trip_counts)`` turns the loops into the number of warp-instructions
one warp of a program issues, ``dynamic_mma_macs`` into the tensor-core multiply-adds of a
program; ``report_record`` makes one JSON-able record for the kernel report.

Loops are natural loops of the SASS control-flow graph (a back-edge is a branch to a block that
dominates it). mbarrier retry loops (TMA waits) are kept apart as ``wait_loops`` and count as one
pass. ptxas unrolls small runtime loops (x4 with remainder loops), so a small source loop may
show as several SASS loops; loops with a dot in them stay one. The caller gives a trip count per
SASS loop: ``build.loops`` lists them, with their depth and size, for that purpose.

Argument specialisation matches what the JIT does for aligned tensors on the GPU: every pointer
argument is marked divisible by 16 (``tt.divisibility = 16``: the JIT does so for any tensor whose
data pointer is 16-byte aligned, which every torch allocation is), so loads vectorise as they
would there. Integer arguments are not specialised unless their type carries ``:16`` (``"i32:16"``),
the mark the JIT adds when a runtime value is a multiple of 16 (e.g. a row stride of 1024);
pass an integer that would be 1 at run time as a constexpr, as the JIT does. The ASTSource
format (signature by name, constexprs by name, attrs keyed by argument-index tuples) is the same
in triton 3.6 and 3.9; both are checked by tests/test_offline_compile.py.

The Triton interpreter: with ``TRITON_INTERPRET=1`` set when a kernel module is imported (as
tests/conftest.py does for the whole test session), ``@triton.jit`` returns an interpreted
function that cannot be compiled. ``compile_offline`` then rebuilds it in a child process with the
variable removed, importing the kernel from its module by name (so the kernel must be defined at
module level); a real ``JITFunction`` is built in-process.

    python bench/offline_compile.py --demo      # a toy 128x128 bf16 tiled matmul, its record
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Sequence

import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[1]

# Scalar types a signature may name (pointers are "*" + one of these). Booleans go as "i1".
SCALAR_TYPES = ("i1", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64",
                "fp8e4nv", "fp8e5", "fp16", "bf16", "fp32", "fp64")
# A dot in TTGIR, in every flavour the NVIDIA backend produces; the op name ends at a blank,
# so ``ttng.warp_group_dot_wait`` (a wait, not a product) does not count.
_DOT_OP = re.compile(r"\b(tt\.dot|tt\.dot_scaled|ttng\.warp_group_dot|ttng\.tc_gen5_mma|ttng\.tc_gen5_mma_scaled)\s")
_WGMMA_OP = "ttng.warp_group_dot"
_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_RES_USAGE = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_STL_BYTES = {"": 4, "U8": 1, "S8": 1, "U16": 2, "S16": 2, "32": 4, "64": 8, "128": 16}


class SassLoop(NamedTuple):
    """A loop found in SASS by a back-edge (a branch to a block that dominates the branch).

    ``start``: byte address of its header (first instruction); ``end``: of the back-edge branch
    (the last one when several branch back to the same header); ``depth``: how many other loops
    enclose it (0 = outermost); ``body_instructions``: every instruction of the loop, inner loops
    included (counted once) and out-of-line blocks it jumps to and back from.
    """
    start: int
    end: int
    depth: int
    body_instructions: int


class SassInstruction(NamedTuple):
    address: int
    opcode: str      # with modifiers, e.g. "HGMMA.64x128x16.F32.BF16"; predicate dropped
    text: str        # the whole instruction as cuobjdump prints it (predicate included)


@dataclasses.dataclass
class OfflineBuild:
    """One kernel compiled for a GPU target on the CPU, and what its code says.

    Named apart from ``triton.compiler.CompiledKernel``, which is the launchable object.
    Counts are static (in the code) unless they say otherwise; ``loops`` turn them into a
    dynamic count through :func:`dynamic_instructions`.
    """
    name: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int           # per thread, cuobjdump -res-usage REG
    stack_bytes: int         # per-thread stack frame (spills land here), res-usage STACK
    spill_stores: int        # STL instructions in SASS (local-memory stores: spills)
    spill_loads: int         # LDL instructions in SASS
    spill_store_bytes: int   # bytes one thread stores per pass through all STL (STL.64 = 8, ...)
    shared_bytes: int        # static (res-usage SHARED) + dynamic, what one block takes of the SM
    shared_dynamic_bytes: int  # Triton's shared memory (metadata.shared); its launch limit is 232,448 B on sm_90
    sass: str
    ttgir: str
    ptx: str
    dots_total: int          # dot ops in TTGIR, all flavours
    dots_wgmma: int          # those lowered to warp-group MMA (ttng.warp_group_dot)
    hgmma: int               # static SASS counts: warp-group MMA,
    hmma: int                # mma.sync,
    ffma: int                # fp32 fused multiply-add on CUDA cores
    sass_instructions: int   # all instructions, the trailing self-branch and padding NOPs excluded
    loops: list              # [SassLoop], in order of appearance (outermost first within a nest)
    compile_seconds: float   # triton.compile alone (front end to cubin), fresh: no Triton cache
    wait_loops: list = dataclasses.field(default_factory=list)  # [SassLoop] barrier retry loops, one pass each
    num_ctas: int = 1
    triton_version: str = triton.__version__
    ptxas_version: str = ""

    @property
    def wgmma(self) -> bool:
        """True when there are dots and every one of them maps to warp-group MMA."""
        return self.dots_total > 0 and self.dots_wgmma == self.dots_total

    def instructions(self) -> list[SassInstruction]:
        """The SASS as a list of instructions (padding excluded, see :func:`parse_sass`)."""
        return parse_sass(self.sass)


# ----------------------------------------------------------------------------- building

def _check_request(fn, signature: dict, constexprs: dict) -> list[str]:
    """Validate the argument description against the kernel; returns its argument names."""
    names = list(fn.arg_names)
    if not isinstance(signature, dict) or not isinstance(constexprs, dict):
        raise TypeError("signature and constexprs must be dicts: argument name -> type string / value")
    unknown = [k for k in [*signature, *constexprs] if k not in names]
    if unknown:
        raise ValueError(f"{fn.__name__}: unknown argument(s) {unknown}; the kernel takes {names}")
    both = sorted(set(signature) & set(constexprs))
    if both:
        raise ValueError(f"{fn.__name__}: argument(s) {both} given both in signature and constexprs")
    missing = [n for n in names if n not in signature and n not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: argument(s) {missing} missing: give each a type in signature "
                         f"(e.g. '*bf16', 'i32') or a value in constexprs")
    for name, ty in signature.items():
        base, _, hint = str(ty).partition(":")
        ok = (base[1:] if base.startswith("*") else base) in SCALAR_TYPES
        if not ok or hint not in ("", "16") or (hint and not base.startswith(("i", "u"))):
            raise ValueError(f"{fn.__name__}: signature[{name!r}] = {ty!r}: expected '*' + one of {SCALAR_TYPES} "
                             f"for a pointer, one of them for a scalar, or an integer type with ':16'")
    return names


def _ast_arguments(names: list[str], signature: dict, constexprs: dict):
    """(signature, constexprs, attrs) as ``ASTSource`` takes them in triton 3.6 and 3.9.

    Pointers and ``:16`` integers get ``tt.divisibility = 16`` (see the module docstring).
    """
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        ty, _, hint = signature[name].partition(":")
        sig[name] = ty
        if ty.startswith("*") or hint == "16":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, dict(constexprs), attrs


def _cuobjdump() -> str:
    """The cuobjdump inside the triton wheel (``TRITON_CUOBJDUMP_PATH`` overrides it, as for Triton)."""
    from triton import knobs
    return knobs.nvidia.cuobjdump.path


def _ptxas_release(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas_version
    m = re.search(r"release ([\d.]+)", get_ptxas_version(arch))
    return m.group(1) if m else "unknown"


def _is_jit_function(fn) -> bool:
    from triton.runtime.jit import JITFunction
    return isinstance(fn, JITFunction)


class _Job(NamedTuple):
    fn: object
    signature: dict
    constexprs: dict
    arch: int
    options: dict


def _prepare(fn, signature: dict[str, str], constexprs: dict[str, object], *, num_warps: int = 4,
             num_stages: int = 2, arch: int = 90, num_ctas: int = 1, **options) -> _Job:
    """Check one request completely (before anything is compiled) and fill in the options."""
    if not (_is_jit_function(fn) or _is_interpreted(fn)):
        raise TypeError(f"compile_offline: fn must be a @triton.jit function, got {type(fn).__name__}")
    _check_request(fn, signature, constexprs)
    for k, v in (("num_warps", num_warps), ("num_stages", num_stages), ("arch", arch), ("num_ctas", num_ctas)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"compile_offline: {k} must be a positive int, got {v!r}")
    if num_warps & (num_warps - 1):
        raise ValueError(f"compile_offline: num_warps must be a power of two, got {num_warps}")
    if _is_interpreted(fn):
        for k, v in constexprs.items():
            _encode_constexpr(k, v)
    return _Job(fn, dict(signature), dict(constexprs), arch,
                {"num_warps": num_warps, "num_stages": num_stages, "num_ctas": num_ctas,
                 "enable_fp_fusion": True, **options})


def compile_offline(fn, signature: dict[str, str], constexprs: dict[str, object], *, num_warps: int = 4,
                    num_stages: int = 2, arch: int = 90, num_ctas: int = 1, **options) -> OfflineBuild:
    """Compile ``fn`` for ``sm_<arch>`` on this machine (no GPU) and inspect the result.

    fn: a ``@triton.jit`` kernel (an interpreted one is rebuilt in a child process, see the
    module docstring). signature: argument name -> Triton type string (``'*bf16'``, ``'*fp32'``,
    ``'i32'``, ``'i32:16'`` for an integer the JIT would see as a multiple of 16, ``'fp32'``...).
    constexprs: argument name -> value for every ``tl.constexpr`` argument (int, float, bool, str,
    None or a ``tl.dtype``). Every argument appears in exactly one of the two. ``options``: further
    ``triton.compile`` options (``maxnreg``, ``enable_fp_fusion``, ...); fp fusion defaults to on,
    the JIT default of triton 3.6 and 3.9. Raises ``ValueError``/``TypeError`` on a bad request
    before compiling; a failing build raises Triton's own error (``RuntimeError`` with its text
    when built in a child).
    """
    return compile_offline_many([dict(fn=fn, signature=signature, constexprs=constexprs, num_warps=num_warps,
                                      num_stages=num_stages, arch=arch, num_ctas=num_ctas, **options)])[0]


def compile_offline_many(requests: Sequence[dict]) -> list[OfflineBuild]:
    """``[compile_offline(**r) for r in requests]``, but interpreted kernels share one child process.

    Starting a child (python, triton, the kernel modules) and the first build in a process cost
    seconds; a batch pays that once. Every request is checked before the first one is compiled.
    """
    jobs = [_prepare(**r) for r in requests]
    builds: list = [None] * len(jobs)
    in_child = [i for i, j in enumerate(jobs) if _is_interpreted(j.fn)]
    for i, j in enumerate(jobs):
        if i not in in_child:
            builds[i] = _compile_here(j)
    if in_child:
        for i, b in zip(in_child, _compile_in_child([jobs[i] for i in in_child])):
            builds[i] = b
    return builds


def _is_interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction" and callable(getattr(fn, "fn", None))


def _compile_here(job: _Job) -> OfflineBuild:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn, arch = job.fn, job.arch
    sig, consts, attrs = _ast_arguments(list(fn.arg_names), job.signature, job.constexprs)
    target = GPUTarget("cuda", arch, 32)
    opts = make_backend(target).parse_options(dict(job.options)).__dict__
    with tempfile.TemporaryDirectory(prefix="offline_compile_") as tmp, knobs.cache.scope():
        # A private cache: every build is compiled afresh, so compile_seconds is never a cache hit
        # and ~/.triton does not fill up with kernels no GPU will load.
        knobs.cache.dir = os.path.join(tmp, "cache")
        t0 = time.perf_counter()
        kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=opts)
        seconds = time.perf_counter() - t0
        cubin = Path(tmp) / f"{kernel.metadata.name}.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        dump = _run([_cuobjdump(), "-res-usage", "-sass", str(cubin)])
    return inspect_build(name=kernel.metadata.name, arch=arch, options=opts, cuobjdump_text=dump,
                         ttgir=kernel.asm["ttgir"], ptx=kernel.asm["ptx"], dynamic_shared=kernel.metadata.shared,
                         compile_seconds=seconds)


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout


def inspect_build(*, name: str, arch: int, options: dict, cuobjdump_text: str, ttgir: str, ptx: str,
                  dynamic_shared: int, compile_seconds: float) -> OfflineBuild:
    """An :class:`OfflineBuild` from ``cuobjdump -res-usage -sass`` output and the IR."""
    usage = {m.group(1): tuple(int(x) for x in m.groups()[1:]) for m in _RES_USAGE.finditer(cuobjdump_text)}
    if name not in usage:
        raise RuntimeError(f"cuobjdump -res-usage has no entry for kernel {name!r}: {cuobjdump_text[:500]!r}")
    regs, stack, static_shared, _local = usage[name]
    sass = _kernel_sass(cuobjdump_text, name)
    instrs = parse_sass(sass)
    base = Counter(i.opcode.split(".")[0] for i in instrs)
    stl = [i.opcode for i in instrs if i.opcode.split(".")[0] == "STL"]
    dots = _DOT_OP.findall(ttgir)
    loops, wait_loops = find_loops(instrs)
    return OfflineBuild(
        name=name, arch=arch, num_warps=options["num_warps"], num_stages=options["num_stages"],
        num_ctas=options.get("num_ctas", 1), registers=regs, stack_bytes=stack,
        spill_stores=len(stl), spill_loads=base["LDL"],
        spill_store_bytes=sum(_STL_BYTES.get(op.split(".")[1] if "." in op else "", 4) for op in stl),
        shared_bytes=static_shared + int(dynamic_shared), shared_dynamic_bytes=int(dynamic_shared),
        sass=sass, ttgir=ttgir, ptx=ptx,
        dots_total=len(dots), dots_wgmma=sum(d == _WGMMA_OP for d in dots),
        hgmma=base["HGMMA"], hmma=base["HMMA"], ffma=base["FFMA"], sass_instructions=len(instrs),
        loops=loops, wait_loops=wait_loops, compile_seconds=round(compile_seconds, 3),
        ptxas_version=_ptxas_release(arch))


def _kernel_sass(sass: str, name: str) -> str:
    """The ``Function : name`` section of cuobjdump -sass output (Triton inlines every helper)."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    sections = dict(zip(parts[1::2], parts[2::2]))
    if name not in sections:
        raise RuntimeError(f"cuobjdump -sass has no function {name!r} (found {sorted(sections)})")
    return sections[name]


# ----------------------------------------------------------------------------- SASS analysis

def parse_sass(sass: str) -> list[SassInstruction]:
    """Instructions of one function's SASS text, in address order.

    The code ends with ``EXIT`` followed by a branch to itself (a trap nothing reaches) and
    alignment NOPs; those trailing instructions are dropped, so they count neither as code nor
    as a loop.
    """
    out = []
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if not m:
            continue
        text = m.group(2).strip()
        words = text.split()
        if words[0].startswith("@"):
            words = words[1:]
        out.append(SassInstruction(int(m.group(1), 16), words[0], text))
    while out and out[-1].opcode == "NOP":
        out.pop()
    if out and out[-1].text.startswith("BRA") and _branch_target(out[-1]) == out[-1].address:
        out.pop()
    return out


def _branch_target(ins: SassInstruction) -> int | None:
    if ins.opcode.split(".")[0] not in ("BRA", "JMP"):
        return None
    m = re.search(r"\b0x([0-9a-f]+)\b", ins.text)
    return int(m.group(1), 16) if m else None


def _always(ins: SassInstruction) -> bool:
    """True when ``ins`` is unpredicated (or predicated on the constant-true ``PT``)."""
    return not ins.text.startswith("@") or ins.text.startswith(("@PT ", "@UPT "))


class _Loop(NamedTuple):
    loop: SassLoop
    members: frozenset   # indices into the instruction list
    wait: bool


def _cfg(instrs: Sequence[SassInstruction]):
    """Basic blocks (lists of instruction indices) and successor lists, entry = block 0."""
    index = {ins.address: i for i, ins in enumerate(instrs)}
    leaders = {0}
    for i, ins in enumerate(instrs):
        t = _branch_target(ins)
        if t is not None and t in index:
            leaders.add(index[t])
        if (t is not None or ins.opcode.split(".")[0] in ("EXIT", "RET", "BRX", "JMX")) and i + 1 < len(instrs):
            leaders.add(i + 1)
    starts = sorted(leaders)
    blocks = [list(range(a, b)) for a, b in zip(starts, starts[1:] + [len(instrs)])]
    block_of = {b[0]: k for k, b in enumerate(blocks)}
    succ = []
    for k, b in enumerate(blocks):
        last = instrs[b[-1]]
        op = last.opcode.split(".")[0]
        t = _branch_target(last)
        out = []
        if t is not None and t in index:
            out.append(block_of[index[t]])
        # an unconditional branch or exit has no fall-through; an indirect branch's targets are unknown
        ends = op in ("BRX", "JMX") or (op in ("BRA", "JMP", "EXIT", "RET") and _always(last))
        if not ends and k + 1 < len(blocks):
            out.append(k + 1)
        succ.append(out)
    return blocks, succ


def _dominators(succ: list[list[int]]) -> list[set | None]:
    """Dominator sets per block (None for blocks unreachable from the entry)."""
    n = len(succ)
    pred = [[] for _ in range(n)]
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    reach, stack = {0}, [0]
    while stack:
        for v in succ[stack.pop()]:
            if v not in reach:
                reach.add(v)
                stack.append(v)
    dom = [set(reach) if k in reach else None for k in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for k in sorted(reach - {0}):
            new = set.intersection(*(dom[p] for p in pred[k] if dom[p] is not None)) | {k}
            if new != dom[k]:
                dom[k], changed = new, True
    return dom


def _loop_nest(instrs: Sequence[SassInstruction]) -> list[_Loop]:
    """Natural loops: a back-edge is a branch to a block that dominates it; the loop is every block
    that reaches the branch without passing the header. Out-of-line blocks a loop jumps to and back
    from (e.g. an mbarrier retry placed after EXIT) belong to it; a forward jump into a block
    that merely lies at a lower address is not a loop."""
    if not instrs:
        return []
    blocks, succ = _cfg(instrs)
    dom = _dominators(succ)
    pred = [[] for _ in blocks]
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    bodies: dict[int, set] = {}
    latch: dict[int, int] = {}
    for u, vs in enumerate(succ):
        for h in vs:
            if dom[u] is not None and h in dom[u]:
                body, stack = ({h}, []) if u == h else ({h, u}, [u])
                while stack:
                    for p in pred[stack.pop()]:
                        if p not in body and dom[p] is not None:
                            body.add(p)
                            stack.append(p)
                bodies.setdefault(h, set()).update(body)   # several back-edges to one header: one loop
                latch[h] = max(latch.get(h, 0), instrs[blocks[u][-1]].address)
    members = {h: frozenset(i for k in body for i in blocks[k]) for h, body in bodies.items()}
    out = []
    for h in sorted(bodies, key=lambda h: instrs[blocks[h][0]].address):
        m = members[h]
        depth = sum(1 for h2, m2 in members.items() if h2 != h and m < m2)
        ops = [instrs[i].opcode for i in m]
        wait = len(m) <= 6 and any(op.startswith("SYNCS.PHASECHK") for op in ops)
        out.append(_Loop(SassLoop(instrs[blocks[h][0]].address, latch[h], depth, len(m)), m, wait))
    return out


def find_loops(instrs: Sequence[SassInstruction]) -> tuple[list[SassLoop], list[SassLoop]]:
    """(loops, wait_loops) of a function's SASS, each in order of appearance (outermost first).

    ``wait_loops`` are barrier retry loops (an mbarrier try-wait and its branch, at most 6
    instructions): how often they spin is a matter of time, not of work, so they count as one pass.
    Code the software pipeliner peels before or after a loop (prologue / epilogue copies) has no
    back-edge and stays straight-line code. Note that ptxas unrolls small runtime loops (x4 with
    x2 / x1 remainders seen here), so one source loop may be several SASS loops; a loop with a dot
    in it keeps one.
    """
    nest = _loop_nest(instrs)
    return [lp.loop for lp in nest if not lp.wait], [lp.loop for lp in nest if lp.wait]


def _resolve_trips(build: OfflineBuild, trip_counts) -> list:
    loops = build.loops
    if callable(trip_counts):
        trips = [trip_counts(lp.depth, i) for i, lp in enumerate(loops)]
    else:
        trips = list(trip_counts)
        if len(trips) != len(loops):
            found = ", ".join(f"#{i} depth {lp.depth}, {lp.body_instructions} instructions at 0x{lp.start:x}"
                              for i, lp in enumerate(loops)) or "none"
            raise ValueError(f"{build.name}: trip_counts gives {len(trips)} loop(s) but the SASS has {len(loops)} "
                             f"({found}); describe every back-edge loop, outermost first within a nest")
    for i, t in enumerate(trips):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
            raise ValueError(f"{build.name}: trip count of loop #{i} must be a number >= 0, got {t!r}")
    return trips


def dynamic_instructions(build: OfflineBuild, trip_counts, *, opcodes: Sequence[str] | None = None):
    """Warp-instructions one warp of one program issues.

    Each instruction counts once times the trip counts of every loop that holds it: code outside
    loops once, a loop body ``trips`` times, an inner loop's body ``trips_outer * trips_inner`` times.
    trip_counts: one number per loop of ``build.loops`` in that order (outermost first within a nest),
    or a callable ``(depth, index) -> trips`` with ``index`` the loop's position in ``build.loops``.
    A trip count is how often the loop's first instruction runs per entry of its enclosing loop (a
    mean is fine for ragged loops). Barrier retry loops (``build.wait_loops``) count as one pass.
    opcodes: count only instructions whose opcode starts with one of these (e.g. ``("HGMMA",)``).

    Approximation: both paths of a branch count as if they ran (a loop body with an ``if`` counts
    both sides on every trip); predicated-off instructions issue anyway, so those count right.
    Raises ``ValueError`` when ``trip_counts`` describes another number of loops than the SASS has.
    """
    instrs, weight = _weights(build, trip_counts)
    keep = tuple(opcodes) if opcodes is not None else None
    return sum(w for ins, w in zip(instrs, weight) if keep is None or ins.opcode.startswith(keep))


def _weights(build: OfflineBuild, trip_counts) -> tuple[list[SassInstruction], list]:
    """The instructions and how often each runs (product of the trips of the loops holding it)."""
    trips = _resolve_trips(build, trip_counts)
    instrs = build.instructions()
    counted = [lp for lp in _loop_nest(instrs) if not lp.wait]
    if [lp.loop for lp in counted] != list(build.loops):
        raise RuntimeError(f"{build.name}: build.loops does not match its SASS (was the build edited?)")
    weight = [1] * len(instrs)
    for lp, t in zip(counted, trips):
        for i in lp.members:
            weight[i] *= t
    return instrs, weight


_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32), "884": (8, 8, 4)}


def dynamic_mma_macs(build: OfflineBuild, trip_counts) -> int:
    """Tensor-core multiply-adds one program (all its warps) issues, padding included.

    HGMMA.MxNxK is one warp group's product (counted once per 4 warps), HMMA.16816 one warp's;
    loops count as in :func:`dynamic_instructions`. Assumes every warp runs the same path (not so
    in warp-specialised kernels). Compare with the useful multiply-adds of the tile.
    """
    total = 0
    for ins, w in zip(*_weights(build, trip_counts)):
        op = ins.opcode
        if op.startswith("HGMMA."):
            m, n, k = (int(x) for x in re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op).groups())
            total += w * m * n * k * build.num_warps // 4
        elif op.startswith("HMMA."):
            shape = _HMMA_SHAPES.get(op.split(".")[1])
            if shape is None:
                raise ValueError(f"{build.name}: unknown mma.sync shape in {op!r}")
            total += w * shape[0] * shape[1] * shape[2] * build.num_warps
    return total


_ACCESS_BYTES = {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}
# global loads and stores whose bytes are one access per lane (LDGSTS: cp.async, global to shared)
_PER_LANE_GLOBAL = {"LDG": "load", "LDGSTS": "load", "STG": "store", "RED": "store", "ATOMG": "store"}
# bulk copies (TMA) and the like move bytes no per-lane width tells
_BULK_GLOBAL = ("UTMALDG", "UTMASTG", "UBLKCP", "UTMAREDG", "UBLKRED")


def dynamic_global_bytes(build: OfflineBuild, trip_counts) -> dict:
    """Bytes one program (all its warps) asks of global memory: {"load": ..., "store": ...}.

    Each LDG/LDGSTS (loads, cp.async included) and STG/RED/ATOMG (stores) moves its access
    width (``.128`` 16 B, ``.64`` 8, ``.U16`` 2, ``.U8`` 1, else 4) for each of a warp's 32
    lanes, times every warp of the program; loops count as in :func:`dynamic_instructions`.
    Masked-off lanes count as if they moved their bytes (the SASS does not say which lanes a
    mask turns off), so this bounds from above what a masked tile reads; so does a software-
    pipelined loop (``num_stages`` > 1): its body loads for a later trip, the last trips' loads
    are predicated off but counted, and its prologue loads ``num_stages - 1`` trips ahead, so
    it counts that many trips' loads once more. Refuses TMA bulk copies, whose bytes no
    instruction width gives."""
    out = {"load": 0, "store": 0}
    for ins, w in zip(*_weights(build, trip_counts)):
        parts = ins.opcode.split(".")
        if parts[0] in _BULK_GLOBAL:
            raise ValueError(f"{build.name}: {ins.opcode!r} is a bulk copy, whose bytes its width does not give")
        kind = _PER_LANE_GLOBAL.get(parts[0])
        if kind is None:
            continue
        width = next((_ACCESS_BYTES[p] for p in parts[1:] if p in _ACCESS_BYTES), 4)
        out[kind] += w * width * 32 * build.num_warps
    return out


def report_record(build: OfflineBuild, trip_counts, **extra) -> dict:
    """One JSON-able record of ``build`` (no SASS/IR text) for bench/kernel_report.py.

    ``warp_instructions`` is :func:`dynamic_instructions` (per warp of one program),
    ``spill_instructions`` the same count of local-memory loads and stores alone (spills: where
    they sit, in a hot loop or once per program, decides what they cost), ``mma_macs``
    :func:`dynamic_mma_macs` (per program), ``global_load_bytes`` / ``global_store_bytes``
    :func:`dynamic_global_bytes` (per program); ``extra`` adds
    the caller's fields (variant, dtype, pairs per program...) and may not overwrite computed ones.
    """
    trips = _resolve_trips(build, trip_counts)
    rec = {
        "kernel": build.name, "arch": build.arch, "num_warps": build.num_warps, "num_stages": build.num_stages,
        "num_ctas": build.num_ctas, "registers": build.registers, "stack_bytes": build.stack_bytes,
        "spill_stores": build.spill_stores, "spill_loads": build.spill_loads,
        "spill_store_bytes": build.spill_store_bytes, "shared_bytes": build.shared_bytes,
        "shared_dynamic_bytes": build.shared_dynamic_bytes,
        "dots_total": build.dots_total, "dots_wgmma": build.dots_wgmma, "wgmma": build.wgmma,
        "hgmma": build.hgmma, "hmma": build.hmma, "ffma": build.ffma, "sass_instructions": build.sass_instructions,
        "loops": [lp._asdict() for lp in build.loops], "trip_counts": trips,
        "wait_loops": [lp._asdict() for lp in build.wait_loops],
        "warp_instructions": dynamic_instructions(build, trips), "mma_macs": dynamic_mma_macs(build, trips),
        "spill_instructions": dynamic_instructions(build, trips, opcodes=("LDL", "STL")),
        **{f"global_{k}_bytes": v for k, v in dynamic_global_bytes(build, trips).items()},
        "compile_seconds": build.compile_seconds, "triton": build.triton_version, "ptxas": build.ptxas_version,
    }
    clash = sorted(set(extra) & set(rec))
    if clash:
        raise ValueError(f"report_record: extra field(s) {clash} would overwrite computed ones")
    rec.update(extra)
    return rec


# ----------------------------------------------------------------------------- child process

def _encode_constexpr(name: str, v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, tl.dtype):
        return {"tl.dtype": v.name}
    raise TypeError(f"constexprs[{name!r}] = {v!r}: a kernel built in a child process (TRITON_INTERPRET is set) "
                    f"takes int, float, bool, str, None or tl.dtype constexprs")


def _decode_constexpr(v):
    return getattr(tl, _DTYPE_ATTR.get(v["tl.dtype"], v["tl.dtype"])) if isinstance(v, dict) else v


_DTYPE_ATTR = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64", "i1": "int1",
               "i8": "int8", "i16": "int16", "i32": "int32", "i64": "int64", "u8": "uint8", "u16": "uint16",
               "u32": "uint32", "u64": "uint64", "fp8e4nv": "float8e4nv", "fp8e5": "float8e5"}


_CHILD_MARK = "ACF_OFFLINE_COMPILE_CHILD"  # set in the child: a module that re-enters cannot fork without end


def _compile_in_child(jobs: list[_Job]) -> list[OfflineBuild]:
    if os.environ.get(_CHILD_MARK):
        raise RuntimeError("asked to compile an interpreted kernel inside an offline-compile child process "
                           "(a kernel module compiled at import time, or set TRITON_INTERPRET itself); "
                           "refusing to start another child")
    request = []
    for j in jobs:
        py = j.fn.fn
        if "<locals>" in py.__qualname__:
            raise ValueError(f"{py.__qualname__}: TRITON_INTERPRET is set, so the kernel is rebuilt in a child "
                             f"process that imports it by name; define it at module level")
        request.append({"module": py.__module__, "file": inspect.getsourcefile(py), "qualname": py.__qualname__,
                        "signature": j.signature, "arch": j.arch, "options": j.options,
                        "constexprs": {k: _encode_constexpr(k, v) for k, v in j.constexprs.items()}})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[_CHILD_MARK] = "1"
    # the child imports kernel modules by the names this process knows them by (tests/ for pytest's
    # test modules, the repository for kernels/ and bench/); the interpreter's own paths come by themselves
    prefixes = tuple(os.path.realpath(p) for p in {sys.prefix, sys.base_prefix})
    paths = [str(REPO)] + [p for p in sys.path if p and not os.path.realpath(p).startswith(prefixes)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    with tempfile.TemporaryDirectory(prefix="offline_compile_") as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "builds.json"
        req.write_text(json.dumps(request))
        done = subprocess.run([sys.executable, "-m", "bench.offline_compile", "--child", str(req), str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            tail = (done.stderr or done.stdout).strip()[-3000:]
            names = ", ".join(r["qualname"] for r in request)
            raise RuntimeError(f"offline compile of {names} in a child process failed (exit {done.returncode}):\n{tail}")
        dicts = json.loads(out.read_text())
    for d in dicts:
        d["loops"] = [SassLoop(*lp) for lp in d["loops"]]
        d["wait_loops"] = [SassLoop(*lp) for lp in d["wait_loops"]]
    return [OfflineBuild(**d) for d in dicts]


def _child(request_path: str, out_path: str) -> None:
    """The child's side: build every request of the JSON file, write the builds as JSON."""
    by_file: dict = {}
    builds = []
    for r in json.loads(Path(request_path).read_text()):
        try:
            module = importlib.import_module(r["module"]) if r["module"] != "__main__" else None
        except ImportError:
            module = None
        if module is None:  # a script run as __main__, or a module importable only by its path
            if r["file"] not in by_file:
                name = f"_offline_compile_{len(by_file)}"
                spec = importlib.util.spec_from_file_location(name, r["file"])
                by_file[r["file"]] = sys.modules[name] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(by_file[r["file"]])
            module = by_file[r["file"]]
        fn = module
        for part in r["qualname"].split("."):
            fn = getattr(fn, part)
        if not _is_jit_function(fn):
            raise TypeError(f"{r['qualname']} from {r['file']} is a {type(fn).__name__} even with TRITON_INTERPRET "
                            f"removed (does the module set it itself?); expected a @triton.jit function")
        consts = {k: _decode_constexpr(v) for k, v in r["constexprs"].items()}
        builds.append(_compile_here(_Job(fn, r["signature"], consts, r["arch"], r["options"])))
    Path(out_path).write_text(json.dumps([dataclasses.asdict(b) for b in builds]))


# ----------------------------------------------------------------------------- demo

@triton.jit
def demo_matmul(a_ptr, b_ptr, c_ptr, K, stride_am, stride_bk, stride_cm,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C[BM, BN] (fp32) = A[BM, K] @ B[K, BN], bf16 inputs; one tile, a K-loop of K / BK steps."""
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * stride_bk + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc)


def demo(num_warps: int = 4, num_stages: int = 3, K: int = 1024) -> dict:
    """Build :func:`demo_matmul` (M = N = 128, BK = 64, bf16) and return its record for ``K``."""
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K": "i32:16",
           "stride_am": "i32:16", "stride_bk": "i32:16", "stride_cm": "i32:16"}
    build = compile_offline(demo_matmul, sig, {"BM": 128, "BN": 128, "BK": 64},
                            num_warps=num_warps, num_stages=num_stages)
    trips = [K // 64] * len(build.loops)
    return report_record(build, trips, M=128, N=128, K=K, useful_macs=128 * 128 * K)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", action="store_true", help="compile a toy 128x128 bf16 matmul and print its record")
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--num-stages", type=int, default=3)
    p.add_argument("--K", type=int, default=1024, help="demo reduction length (a multiple of 64)")
    p.add_argument("--child", nargs=2, metavar=("REQUEST", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(*a.child)
        return 0
    if not a.demo:
        p.print_help()
        return 2
    if a.K <= 0 or a.K % 64:
        p.error(f"--K must be a positive multiple of 64, got {a.K}")
    print(json.dumps(demo(a.num_warps, a.num_stages, a.K), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
