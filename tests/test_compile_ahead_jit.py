"""tiles.compile_ahead through Triton's real JIT on this CPU (tests/jit_compile_ahead.py).

The interpreter tests (tests/test_similarity_triton.py) check what a compile-ahead block
collects; this one runs the part a GPU run depends on: each request warmed through the
JIT (binder, cache keys, AsyncCompileMode on threads, sm_90 builds, no launch), and a
larger plan of the same buckets and flags finding every kernel already in the JIT's cache.
It runs in a child process: tests/conftest.py interprets Triton in this one.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_compile_ahead_builds_each_config_once_and_larger_plans_hit_the_cache(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is the JIT default
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")  # real builds, and none left in ~/.triton
    done = subprocess.run([sys.executable, str(HERE / "jit_compile_ahead.py")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = r["small"], r["large"]
    # bf16 block-diagonal tiles: every autotuning config the pruning keeps for one bucket
    assert small["requests"] == small["builds"] == small["cached"] == 3 <= r["configs"]
    assert small["zero"]  # nothing was scored
    assert large["requests"] == 3 and large["cached"] == small["cached"]  # other sizes, the same kernels
    # paper's global-score kernel, bf16 and fp32 (f16x3) paths: one build each
    assert r["glob"] == dict(requests=2, builds=2, cached=2)
