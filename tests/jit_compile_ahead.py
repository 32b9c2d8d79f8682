"""Child process of tests/test_compile_ahead_jit.py: tiles.compile_ahead through Triton's real
JIT (not the interpreter), on a CPU, with a stand-in driver that names an sm_90 GPU.

``warmup`` never launches, so everything a GPU run does before its first launch happens
here for real: the JIT's binder and cache keys, AsyncCompileMode on a thread pool, sm_90
builds. Prints one JSON line: the builds of a small plan, then what a larger plan (other
sizes, the same buckets and flags) adds to the JIT's kernel cache (nothing: sizes are not
in the keys).

    python tests/jit_compile_ahead.py     # TRITON_INTERPRET unset
"""
import json
import os
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("jit_compile_ahead.py needs the real JIT: unset TRITON_INTERPRET")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class Sm90Driver:
    """What the JIT asks of its driver before a launch: a device, a stream, a target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


driver.set_active(Sm90Driver())

from acf_fast.kernels import tiles  # noqa: E402
from acf_fast.validate import check_similarity_inputs  # noqa: E402
from inputs import make_case  # noqa: E402


def planned(N, M, seed):
    """acf-code, bf16 tiles, every text in bucket 16 (three autotuning configs)."""
    case = make_case(N, M, 36, 12, D=128, H=8, variant="acf-code", seed=seed)
    vm, wm, wts, sc = check_similarity_inputs(case["V"], case["v_mask"], case["W"], case["w_mask"], heads=8,
                                              scale=case["scale"], u1=case["u1"], u2=case["u2"], weights=None,
                                              G=None, global_emb=case["global_emb"])
    plan = tiles.plan_tiles(case["V"], vm, case["W"], wm, heads=8, weights=wts, G=None, st=torch.bfloat16)
    gi, gt = (t.float().contiguous() for t in case["global_emb"])
    return plan, torch.empty(N, M), dict(scale=sc, u1=case["u1"], u2=case["u2"], gi=gi, gt=gt, dot_prec="tf32")


def main():
    cache = tiles._tile_kernel.device_caches[0][0]
    plan, out, kw = planned(6, 20, 1)
    t0 = time.perf_counter()
    with tiles.compile_ahead(workers=2) as ahead:
        tiles.launch_tiles(plan, out, **kw)
    small = dict(requests=len(ahead.requests), builds=ahead.builds, cached=len(cache),
                 seconds=time.perf_counter() - t0, zero=not bool(out.any()))
    plan, out, kw = planned(48, 160, 2)  # sizes divisible by 16 where the small plan's are not
    with tiles.compile_ahead(workers=2) as ahead:
        tiles.launch_tiles(plan, out, **kw)
    large = dict(requests=len(ahead.requests), cached=len(cache))
    print(json.dumps(dict(small=small, large=large, configs=len(tiles._configs(False)), glob=global_score())))


def global_score():
    """paper's pairwise global score kernel (kernels/pair_global.py), both dtype paths, warmed
    through compile_ahead's pool as a paper launch would leave them: builds, and the JIT's cache."""
    from acf_fast.kernels import pair_global

    g = torch.Generator().manual_seed(3)
    ahead = tiles.CompileAhead()
    for dt in (torch.bfloat16, torch.float32):
        n, Mb, HD, HK, D = 3, 5, 64, 32, 48
        S, col = torch.empty(n, Mb), torch.arange(Mb, dtype=torch.int32)
        kap, bbar = torch.randn(n * Mb, HD, generator=g).to(dt), torch.rand(n * Mb, HK, generator=g).to(dt)
        ahead.global_requests.append(pair_global.global_launch(
            S, col, kap, bbar, pair_global.weight_operands(torch.randn(HD, D, generator=g), dt),
            pair_global.image_operands(torch.randn(n, HK, D, generator=g), dt), torch.randn(n, D, generator=g), 0.2,
            1e-8))
    ahead.compile(workers=2)
    return dict(requests=len(ahead.global_requests), builds=ahead.builds,
                cached=len(pair_global._pair_global_kernel.device_caches[0][0]))


if __name__ == "__main__":
    main()
