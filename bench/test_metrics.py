"""pytest-benchmark: ``recall_metrics`` vs the SCAN-style per-query argsort loop
(``acf_fast.reference_ranking``); every run checks its result against the other."""
import numpy as np
import pytest

from acf_fast import reference_ranking as loops
from acf_fast.evaluate import ranks_i2t, ranks_t2i, recall_metrics
from bench.cases import _as_numpy
from bench.conftest import run_timed
from bench.workloads import score_matrix


def _size(device):
    return (5000, 25000) if device.type == "cuda" else (1000, 5000)


@pytest.mark.parametrize("impl", ["acf_fast", "numpy loop"])
def test_metrics(benchmark, bench_device, impl):
    N, M = _size(bench_device)
    if impl == "numpy loop":
        N, M = 1000, 5000  # the loop at 5K x 25K takes ~30 s per round
    S, t2i = score_matrix(N, M, device=bench_device)
    S_np, t_np = _as_numpy(S), _as_numpy(t2i)
    benchmark.group = "metrics"
    benchmark.extra_info.update(N=N, M=M, impl=impl)
    if impl == "acf_fast":
        got = run_timed(benchmark, lambda: recall_metrics(S, t2i), bench_device)
        qi, qt = np.arange(0, N, N // 100), np.arange(0, M, M // 100)  # the loop on a slice of queries
        np.testing.assert_array_equal(_as_numpy(ranks_i2t(S, t2i))[qi], loops.i2t_ranks(S_np, t_np, queries=qi))
        np.testing.assert_array_equal(_as_numpy(ranks_t2i(S, t2i))[qt], loops.t2i_ranks(S_np, t_np, queries=qt))
        assert got == recall_metrics(S.cpu(), t2i.cpu(), backend="torch")
    else:
        got = run_timed(benchmark, lambda: loops.recall_loop(S_np, t_np), bench_device.__class__("cpu"), rounds=1)
        want = recall_metrics(S, t2i)
        for d in ("i2t", "t2i"):
            for key in ("r1", "r5", "r10", "medr", "meanr"):
                assert got[d][key] == pytest.approx(want[d][key], abs=1e-9), (d, key)
