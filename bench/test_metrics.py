"""pytest-benchmark: ``recall_metrics`` vs the SCAN-style per-query argsort loop."""
import pytest

from bench import baselines
from bench.cases import _as_numpy
from bench.conftest import run_timed
from bench.workloads import score_matrix


def _size(device):
    return (5000, 25000) if device.type == "cuda" else (1000, 5000)


@pytest.mark.parametrize("impl", ["acf_fast", "numpy loop"])
def test_metrics(benchmark, bench_device, impl):
    evaluate = pytest.importorskip("acf_fast.evaluate")
    N, M = _size(bench_device)
    if impl == "numpy loop":
        N, M = 1000, 5000  # the loop at 5K x 25K takes ~30 s per round
    S, t2i = score_matrix(N, M, device=bench_device)
    benchmark.group = "metrics"
    benchmark.extra_info.update(N=N, M=M, impl=impl)
    if impl == "acf_fast":
        out = run_timed(benchmark, lambda: evaluate.recall_metrics(S, t2i), bench_device)
    else:
        S_np, t_np = _as_numpy(S), _as_numpy(t2i)
        out = run_timed(benchmark, lambda: baselines.recall_loop(S_np, t_np), bench_device.__class__("cpu"), rounds=1)
    assert 0.0 <= out["rsum"] <= 600.0
