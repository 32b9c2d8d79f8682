"""pytest-benchmark: ``acf_similarity`` per backend and variant (spec §8 FLOPs in extra_info).

Per-pair FLOPs (bench/flops.py): paper ≈ 2·(4KLD + K(HL)² + L(HK)² + (HK+HL)D),
acf-code ≈ 2·(2KLD + KHL² + LHK²). Sizes: small on CPU, COCO 1K-fold on GPU.
"""
import pytest
import torch

from bench.cases import SIMILARITY_BACKENDS, _backend_callable
from bench.conftest import run_timed
from bench.flops import grid_flops
from bench.workloads import similarity_inputs


def _size(device):
    return (1000, 5000) if device.type == "cuda" else (8, 40)


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
@pytest.mark.parametrize("backend", SIMILARITY_BACKENDS)
def test_similarity(benchmark, bench_device, request, variant, backend):
    if backend == "torch.compile" and bench_device.type == "cpu" and not request.config.getoption("--bench-compile"):
        pytest.skip("torch.compile on CPU compiles for minutes; pass --bench-compile to time it")
    N, M = _size(bench_device)
    if backend == "eager" and bench_device.type == "cuda":
        N, M = 100, 500  # the per-pair loop at 5M pairs would take minutes
    x = similarity_inputs(N, M, variant, device=bench_device)
    fn, reason = _backend_callable(backend, x, bench_device)
    if fn is None:
        pytest.skip(reason)
    flops = grid_flops(x.k_valid.tolist(), x.l_valid.tolist(), 1024, 8, variant)
    benchmark.group = f"similarity {variant}"
    benchmark.extra_info.update(N=N, M=M, pairs=N * M, flops=flops, variant=variant, backend=backend)
    S = run_timed(benchmark, fn, bench_device)
    assert S.shape == (N, M) and bool(torch.isfinite(S).all())
    median = benchmark.stats.stats.median
    benchmark.extra_info["tflops"] = flops / median / 1e12 if median else None
