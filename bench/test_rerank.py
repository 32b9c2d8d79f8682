"""pytest-benchmark: the ACF-R+ re-ranker vs the numpy per-query loops (bench/baselines.py)."""
import numpy as np
import pytest

from bench import baselines
from bench.cases import _as_numpy, _text_neighbors_for
from bench.conftest import run_timed
from bench.workloads import score_matrix


def _size(device):
    return (1000, 5000) if device.type == "cuda" else (200, 1000)


@pytest.mark.parametrize("impl", ["acf_fast", "numpy loop"])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_rerank(benchmark, bench_device, direction, impl):
    rerank = pytest.importorskip("acf_fast.rerank")
    N, M = _size(bench_device)
    S, _ = score_matrix(N, M, device=bench_device)
    nb = _text_neighbors_for(S, bench_device)
    benchmark.group = f"rerank {direction}"
    benchmark.extra_info.update(N=N, M=M, impl=impl)
    if impl == "acf_fast":
        fn = (lambda: rerank.rerank_i2t(S, k=15)) if direction == "i2t" else (lambda: rerank.rerank_t2i(S, nb, k=20))
        out = _as_numpy(run_timed(benchmark, fn, bench_device))
    else:
        S_np, nb_np = _as_numpy(S), _as_numpy(nb)
        fn = (lambda: baselines.rerank_i2t_loop(S_np, 15)) if direction == "i2t" else (lambda: baselines.rerank_t2i_loop(S_np, nb_np, 20))
        out = run_timed(benchmark, fn, bench_device.__class__("cpu"), rounds=1)
    assert out.shape == ((N, 15) if direction == "i2t" else (M, 20))
    assert np.all((out >= 0) & (out < (M if direction == "i2t" else N)))
