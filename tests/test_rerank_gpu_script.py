"""bench/rerank_gpu.py (the GPU record of issue 11) at tiny sizes under the interpreter:
the record comes back whatever fails, and says when the GPU path differs from the CPU."""
import json

import pytest
import torch

from acf_fast import rerank as rr
from acf_fast.kernels import ranking as kernels
from bench import rerank_gpu


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(rerank_gpu.SIZES, "smoke", dict(N=9, M=45, D=4))
    monkeypatch.setattr(rerank_gpu, "K_I2T", 5)
    monkeypatch.setattr(rerank_gpu, "K_T2I", 4)
    monkeypatch.setattr(rerank_gpu, "K_NB", 3)


def test_record_is_complete_and_equal(tiny):
    rec = rerank_gpu.run("cpu", log=lambda s: None, smoke=True, loop_queries=5)
    assert rec["ok"] and rec["bitwise_equal_cpu"] and not rec["errors"], rec["errors"]
    assert len(rec["checks"]) == 7 and all(rec["checks"].values())
    assert rec["times_ms"]["rerank_both_ms"] > 0 and rec["cpu_times_ms"]["rerank_both_ms"] > 0
    assert rec["loop"]["queries_i2t"] == 5 and rec["loop"]["rerank_both_ms_scaled"] > 0
    json.dumps(rec)  # JSON-ready


def test_a_wrong_gpu_result_is_reported(tiny, monkeypatch):
    count = kernels.count_positions

    def off_by_one(X, lines, items, **kw):
        out = count(X, lines, items, **kw)
        out[::7] += 1
        return out

    monkeypatch.setattr(kernels, "count_positions", off_by_one)
    rec = rerank_gpu.run("cpu", log=lambda s: None, smoke=True, loop_queries=5)
    assert not rec["ok"] and not rec["bitwise_equal_cpu"]
    assert not (rec["checks"]["heads_i2t_equal_cpu"] and rec["checks"]["heads_t2i_equal_cpu"])


def test_a_failing_step_is_recorded_not_raised(tiny, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("planted")

    monkeypatch.setattr(rr, "text_neighbors", broken)
    rec = rerank_gpu.run("cpu", log=lambda s: None, smoke=True, loop_queries=5)
    assert not rec["ok"]
    assert any(e["step"] == "gpu neighbours" and "planted" in e["error"] for e in rec["errors"])
    json.dumps(rec)


def test_a_failure_between_steps_is_recorded(tiny, monkeypatch):
    def broken(rec):
        raise RuntimeError("planted in the summary")

    monkeypatch.setattr(rerank_gpu, "summary", broken)
    rec = rerank_gpu.run("cpu", log=lambda s: None, smoke=True, cpu=False)
    assert not rec["ok"] and rec["errors"][-1]["step"] == "run"
    json.dumps(rec)
