"""pytest-benchmark: the ACF-R+ re-ranker vs the per-query reference loops
(``acf_fast.reference_ranking``, the numpy baseline); every run checks its ids
against the other implementation (on a slice of queries for the library)."""
import numpy as np
import pytest

from acf_fast import reference_ranking as loops
from acf_fast.rerank import rerank_i2t, rerank_t2i
from bench.cases import _as_numpy, _text_neighbors_for
from bench.conftest import run_timed
from bench.workloads import score_matrix


def _size(device):
    return (1000, 5000) if device.type == "cuda" else (200, 1000)


@pytest.mark.parametrize("impl", ["acf_fast", "numpy loop"])
@pytest.mark.parametrize("direction", ["i2t", "t2i"])
def test_rerank(benchmark, bench_device, direction, impl):
    N, M = _size(bench_device)
    S, _ = score_matrix(N, M, device=bench_device)
    nb = _text_neighbors_for(S, bench_device)
    S_np, nb_np = _as_numpy(S), _as_numpy(nb)
    benchmark.group = f"rerank {direction}"
    benchmark.extra_info.update(N=N, M=M, impl=impl)
    if direction == "i2t":
        ours, loop = (lambda: rerank_i2t(S, k=15)), (lambda q=None: loops.rerank_i2t_loop(S_np, 15, queries=q))
    else:
        ours, loop = (lambda: rerank_t2i(S, nb, k=20)), (lambda q=None: loops.rerank_t2i_loop(S_np, nb_np, 20, queries=q))
    if impl == "acf_fast":
        got = _as_numpy(run_timed(benchmark, ours, bench_device))
        q = np.linspace(0, got.shape[0] - 1, 50).astype(int)
        np.testing.assert_array_equal(got[q], loop(q))
    else:
        got = run_timed(benchmark, loop, bench_device.__class__("cpu"), rounds=1)
        np.testing.assert_array_equal(got, _as_numpy(ours()))
