"""ACF-R+ re-ranking, text neighbours and metrics on the GPU at COCO-5K size, beside the
CPU path and the numpy per-query loop, in one record (issue 11).

    PYTHONPATH=. python bench/rerank_gpu.py [--out FILE]   # a CUDA machine, < 60 s
    PYTHONPATH=. python bench/rerank_gpu.py --smoke        # CPU, Triton interpreter, tiny sizes

``run(device, log)`` is the entry bench/gpu_check.py calls: it returns a JSON-ready dict
and never raises (an exception in a step is recorded under ``errors`` with its
traceback, that step's fields stay None and ``ok`` is False).

Workload: S (N x M, 5,000 x 25,000) generated on the device, scores rounded to
multiples of 2^-8 so that lists hold equal scores and some k-th boundaries are tied
(``tied_boundaries`` says how many); caption t belongs to image t // 5; 25,000 text
vectors of D = 1024, 1% exact duplicates (cosine ties). k̂ = 15 (I2T), 20 (T2I),
k' = 5 ``embedding`` neighbours.

Measured:
- GPU, ``backend="triton"`` (bench.timing.time_fn: a warm-up call, then the median of
  CUDA-event timings): ``rerank_i2t``, ``rerank_t2i``, ``rerank`` (both, S checked and
  transposed once), :class:`acf_fast.rerank.CapturedRerank` (the same in a CUDA graph:
  replay alone, and replay after the check of S), ``text_neighbors("embedding")``,
  ``recall_metrics`` plain and with the re-ranked heads, ``torch.topk`` of S on both
  axes for scale, and the stages of ``rerank`` (``stage_*``: transposed copy, exact
  top-k per direction, best neighbours, each counting kernel);
- CPU, ``backend="torch"``, on the same S copied to the host: the same calls, few
  repeats (the CPU part stays well under a minute on 16 cores);
- the numpy per-query loops of ``acf_fast.reference_ranking`` on a slice of queries,
  scaled per query to all of them (``*_scaled`` fields, slice sizes recorded);
- bit-for-bit checks: GPU heads, graph heads, neighbours and metrics equal the CPU
  path's, and the loop's ids on its slice: ``bitwise_equal_cpu`` (a bool) and
  ``checks`` (one bool each).
Targets of issue 11 on an H200 (``targets``): both directions <= 5 ms, neighbours
<= 5 ms, metrics <= 2 ms.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (PLATFORM_FACTS)

import numpy as np  # noqa: E402
import torch  # noqa: E402

SIZES = {"full": dict(N=5000, M=25000, D=1024), "smoke": dict(N=21, M=105, D=8)}
K_I2T, K_T2I, K_NB = 15, 20, 5
TARGETS_MS = {"rerank_both_graph_ms": 5.0, "rerank_both_ms": 5.0, "neighbors_ms": 5.0, "metrics_plain_ms": 2.0}


@contextlib.contextmanager
def _step(rec: dict, name: str, log):
    """Run one step; an exception is recorded (with its traceback), never raised."""
    t0 = time.perf_counter()
    try:
        yield
    except Exception as err:  # the record must come back whatever fails
        rec["errors"].append({"step": name, "error": f"{type(err).__name__}: {err}"[:1000],
                              "traceback": traceback.format_exc()[-3000:]})
        log(f"[rerank_gpu] {name} failed: {type(err).__name__}: {err}")
    finally:
        rec["step_wall_s"][name] = round(time.perf_counter() - t0, 3)


def _ms(timing: dict) -> float:
    return 1e3 * timing["median_s"]


def _timed(rec: dict, key: str, fn, device) -> None:
    from bench.timing import time_fn

    # a smoke run (interpreter) times one call: it checks that the script runs, not speed
    t = time_fn(fn, device, **({"repeats": 1, "warmup": 0} if rec["smoke"] else {}))
    rec["times_ms"][key] = _ms(t)
    rec["timing_method"][key] = t["method"]


def _tied_fraction(S: torch.Tensor, k: int, dim: int) -> float:
    vals = torch.topk(S, k + 1, dim=dim).values
    a, b = (vals[:, k - 1], vals[:, k]) if dim == 1 else (vals[k - 1], vals[k])
    return float((a == b).float().mean())


def run(device="cuda", log=print, *, smoke: bool = False, cpu: bool = True, loop_queries: int = 20,
        seed: int = 0) -> dict:
    """Measure and check on ``device`` (see the module doc); returns the record, whatever fails."""
    rec = {"script": "bench/rerank_gpu.py", "smoke": smoke, "ok": False, "errors": [], "step_wall_s": {}}
    try:
        _run(rec, device, log, smoke, cpu, loop_queries, seed)
    except Exception as err:  # a failure between steps (an import, the summary): still a record
        rec["errors"].append({"step": "run", "error": f"{type(err).__name__}: {err}"[:1000],
                              "traceback": traceback.format_exc()[-3000:]})
        rec["ok"] = False
    return rec


def _run(rec, device, log, smoke, cpu, loop_queries, seed) -> None:
    t_start = time.perf_counter()
    sizes = SIZES["smoke" if smoke else "full"]
    N, M, D = sizes["N"], sizes["M"], sizes["D"]
    rec.update({"N": N, "M": M, "D": D, "k_i2t": K_I2T, "k_t2i": K_T2I, "kprime": K_NB, "neighbors": "embedding",
                "workload": "S ~ N(0,1) + 2 on true pairs, rounded to multiples of 2^-8 (planted ties); "
                            "txt2img = t // 5; text vectors N(0,1), 1% exact duplicates",
                "backend_gpu": "triton", "backend_cpu": "torch", "times_ms": {}, "timing_method": {},
                "cpu_times_ms": {}, "loop": {}, "checks": {}, "bitwise_equal_cpu": False, "targets": {}})
    device = torch.device(device)
    rec["device"] = str(device)
    with _step(rec, "device record", log):
        from bench.device import device_record

        rec["device_record"] = device_record(device)
    from acf_fast.evaluate import recall_metrics
    from acf_fast.rerank import CapturedRerank, rerank, rerank_i2t, rerank_t2i, text_neighbors
    from bench.workloads import text_vectors, tied_score_matrix

    gpu, host = {}, {}
    be = "triton"
    with _step(rec, "inputs", log):
        S, g = tied_score_matrix(N, M, device=device, seed=seed)
        tv = text_vectors(M, D, device=device, seed=seed + 1)
        rec["tied_boundaries"] = {"i2t_rows": _tied_fraction(S, K_I2T, 1), "t2i_columns": _tied_fraction(S, K_T2I, 0)}
        host.update(S=S.cpu(), g=g.cpu(), tv=tv.cpu())
    with _step(rec, "gpu neighbours", log):
        gpu["nb"] = text_neighbors("embedding", K_NB, text_vectors=tv, backend=be)
        _timed(rec, "neighbors_ms", lambda: text_neighbors("embedding", K_NB, text_vectors=tv, backend=be), device)
    with _step(rec, "gpu re-rank", log):
        nb = gpu["nb"]
        gpu["heads"] = rerank(S, nb, K_I2T, K_T2I, backend=be)
        _timed(rec, "rerank_i2t_ms", lambda: rerank_i2t(S, K_I2T, backend=be), device)
        _timed(rec, "rerank_t2i_ms", lambda: rerank_t2i(S, nb, K_T2I, backend=be), device)
        _timed(rec, "rerank_both_ms", lambda: rerank(S, nb, K_I2T, K_T2I, backend=be), device)
    with _step(rec, "gpu graph", log):
        if device.type != "cuda":
            rec["graph"] = "not captured: CUDA graphs need a CUDA device"
        else:
            graph = CapturedRerank(S, gpu["nb"], K_I2T, K_T2I)
            gpu["graph_heads"] = tuple(h.clone() for h in graph())
            _timed(rec, "rerank_both_graph_ms", graph.graph.replay, device)
            _timed(rec, "rerank_both_graph_checked_ms", graph, device)
    with _step(rec, "gpu metrics", log):
        gpu["metrics"] = recall_metrics(S, g, backend=be)
        gpu["metrics_reranked"] = recall_metrics(S, g, *gpu["heads"], backend=be)
        _timed(rec, "metrics_plain_ms", lambda: recall_metrics(S, g, backend=be), device)
        _timed(rec, "metrics_reranked_ms", lambda: recall_metrics(S, g, *gpu["heads"], backend=be), device)
    with _step(rec, "gpu topk", log):
        _timed(rec, "topk_rows_ms", lambda: torch.topk(S, K_I2T + 1, dim=1), device)
        _timed(rec, "topk_columns_ms", lambda: torch.topk(S, K_T2I + 1, dim=0), device)
    with _step(rec, "gpu stages", log):
        _stages(rec, S, gpu["nb"], device)
    rec["gpu_wall_s"] = round(time.perf_counter() - t_start, 2)
    if cpu:
        _cpu_part(rec, host, log)
        _loop_part(rec, host, gpu, loop_queries, log)
        _checks(rec, host, gpu, log)
    for key, limit in TARGETS_MS.items():
        v = rec["times_ms"].get(key)
        rec["targets"][key] = {"limit_ms": limit, "measured_ms": v, "met": None if v is None else v <= limit}
    rec["ok"] = not rec["errors"] and rec["bitwise_equal_cpu"]
    rec["wall_s"] = round(time.perf_counter() - t_start, 2)
    log(summary(rec))


def _stages(rec, S, nb, device):
    """Where the time of ``rerank`` goes on the triton path: the transposed copy, the
    exact top-k of each direction, the best neighbours and each counting kernel."""
    from acf_fast.ranking import positions_exact, topk_exact
    from acf_fast.rerank import _best_neighbors

    N, M = S.shape
    St = S.T.contiguous()
    C_i2t, C_t2i = topk_exact(S, K_I2T), topk_exact(St, K_T2I)
    rows = torch.arange(N, device=S.device).repeat_interleave(K_I2T)
    best = _best_neighbors(S, C_t2i, nb, M)
    stages = {
        "transpose_ms": lambda: S.T.contiguous(),
        "topk_exact_i2t_ms": lambda: topk_exact(S, K_I2T),
        "topk_exact_t2i_ms": lambda: topk_exact(St, K_T2I),
        "best_neighbors_ms": lambda: _best_neighbors(S, C_t2i, nb, M),
        "positions_i2t_ms": lambda: positions_exact(St, C_i2t.reshape(-1), rows),
        "positions_t2i_ms": lambda: positions_exact(S, C_t2i.reshape(-1), best.reshape(-1)),
    }
    for key, fn in stages.items():
        _timed(rec, "stage_" + key, fn, device)


def _cpu_part(rec, host, log):
    from acf_fast.evaluate import recall_metrics
    from acf_fast.rerank import rerank, text_neighbors
    from bench.timing import time_cpu

    S, g, tv = host.get("S"), host.get("g"), host.get("tv")
    rec["cpu_threads"] = torch.get_num_threads()
    rec["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    def timed(key, fn, **kw):
        t = time_cpu(fn, **kw)
        rec["cpu_times_ms"][key] = _ms(t)

    with _step(rec, "cpu neighbours", log):
        t0 = time.perf_counter()
        host["nb"] = text_neighbors("embedding", K_NB, text_vectors=tv, backend="torch")
        rec["cpu_times_ms"]["neighbors_ms"] = 1e3 * (time.perf_counter() - t0)  # one call: the slowest CPU part
    with _step(rec, "cpu re-rank", log):
        host["heads"] = rerank(S, host["nb"], K_I2T, K_T2I, backend="torch")
        timed("rerank_both_ms", lambda: rerank(S, host["nb"], K_I2T, K_T2I, backend="torch"), repeats=2, warmup=0)
    with _step(rec, "cpu metrics", log):
        host["metrics"] = recall_metrics(S, g, backend="torch")
        host["metrics_reranked"] = recall_metrics(S, g, *host["heads"], backend="torch")
        timed("metrics_plain_ms", lambda: recall_metrics(S, g, backend="torch"), repeats=3, warmup=0)
    with _step(rec, "cpu topk", log):
        timed("topk_rows_ms", lambda: torch.topk(S, K_I2T + 1, dim=1), repeats=2, warmup=0)
        timed("topk_columns_ms", lambda: torch.topk(S, K_T2I + 1, dim=0), repeats=2, warmup=0)


def _loop_part(rec, host, gpu, n_queries, log):
    """The numpy per-query loops on a slice, scaled per query (stated in the record)."""
    from acf_fast import reference_ranking as loops

    with _step(rec, "numpy loop", log):
        S, g = host["S"].numpy(), host["g"].numpy()
        nb = (host.get("nb") if host.get("nb") is not None else gpu["nb"].cpu()).numpy()
        N, M = S.shape
        qi = np.linspace(0, N - 1, min(N, n_queries)).astype(int)
        qt = np.linspace(0, M - 1, min(M, n_queries)).astype(int)
        t0 = time.perf_counter()
        host["loop_i2t"] = loops.rerank_i2t_loop(S, K_I2T, queries=qi)
        t1 = time.perf_counter()
        host["loop_t2i"] = loops.rerank_t2i_loop(S, nb, K_T2I, queries=qt)
        t2 = time.perf_counter()
        loops.i2t_ranks(S, g, queries=qi)
        t3 = time.perf_counter()
        loops.t2i_ranks(S, g, queries=qt)
        t4 = time.perf_counter()
        host["loop_q"] = (qi, qt)
        rec["loop"] = {
            "what": "acf_fast.reference_ranking per-query loops on a slice of queries, time scaled per query "
                    "to all N images and M texts",
            "queries_i2t": len(qi), "queries_t2i": len(qt),
            "rerank_both_ms_scaled": 1e3 * ((t1 - t0) / len(qi) * N + (t2 - t1) / len(qt) * M),
            "metrics_ms_scaled": 1e3 * ((t3 - t2) / len(qi) * N + (t4 - t3) / len(qt) * M),
        }


def _checks(rec, host, gpu, log):
    with _step(rec, "checks", log):
        c = rec["checks"]

        def same(a, b):
            return a is not None and b is not None and torch.equal(a.cpu(), b.cpu())

        c["neighbors_equal_cpu"] = same(gpu.get("nb"), host.get("nb"))
        gh, hh = gpu.get("heads"), host.get("heads")
        c["heads_i2t_equal_cpu"] = bool(gh and hh and same(gh[0], hh[0]))
        c["heads_t2i_equal_cpu"] = bool(gh and hh and same(gh[1], hh[1]))
        if gpu.get("graph_heads") is not None:
            c["graph_heads_equal_eager"] = same(gpu["graph_heads"][0], gh[0]) and same(gpu["graph_heads"][1], gh[1])
        c["metrics_equal_cpu"] = gpu.get("metrics") is not None and gpu.get("metrics") == host.get("metrics")
        c["metrics_reranked_equal_cpu"] = (gpu.get("metrics_reranked") is not None
                                           and gpu.get("metrics_reranked") == host.get("metrics_reranked"))
        qi, qt = host["loop_q"]
        c["loop_i2t_equal_on_slice"] = bool(np.array_equal(gh[0].cpu().numpy()[qi], host["loop_i2t"]))
        c["loop_t2i_equal_on_slice"] = bool(np.array_equal(gh[1].cpu().numpy()[qt], host["loop_t2i"]))
        rec["bitwise_equal_cpu"] = all(c.values())
        rec["metrics"] = gpu.get("metrics")
        rec["metrics_reranked"] = gpu.get("metrics_reranked")


def summary(rec: dict) -> str:
    """A few lines for a log: each figure GPU | CPU | loop, the checks and the errors."""
    t, c, lp = rec["times_ms"], rec["cpu_times_ms"], rec.get("loop") or {}

    def f(v):
        return "-" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")

    rows = [("re-rank I2T", t.get("rerank_i2t_ms"), None, None),
            ("re-rank T2I", t.get("rerank_t2i_ms"), None, None),
            ("re-rank both", t.get("rerank_both_ms"), c.get("rerank_both_ms"), lp.get("rerank_both_ms_scaled")),
            ("re-rank both, CUDA graph", t.get("rerank_both_graph_ms"), None, None),
            ("neighbours (embedding)", t.get("neighbors_ms"), c.get("neighbors_ms"), None),
            ("metrics", t.get("metrics_plain_ms"), c.get("metrics_plain_ms"), lp.get("metrics_ms_scaled")),
            ("metrics, re-ranked heads", t.get("metrics_reranked_ms"), None, None),
            ("torch.topk rows / columns", t.get("topk_rows_ms"), c.get("topk_rows_ms"), None)]
    lines = [f"[rerank_gpu] {rec['N']} x {rec['M']} on {rec.get('device')}, ms (GPU {rec['backend_gpu']} | CPU "
             f"{rec['backend_cpu']} | numpy loop, slice scaled):"]
    lines += [f"  {name:28s} {f(a):>9s} {f(b):>10s} {f(l):>12s}" for name, a, b, l in rows]
    stages = {k[len("stage_"):-len("_ms")]: round(v, 3) for k, v in t.items() if k.startswith("stage_")}
    if stages:
        lines.append(f"  stages of re-rank both on the GPU (ms): {stages}")
    lines.append(f"  bit for bit equal to the CPU path: {rec['bitwise_equal_cpu']}  {rec['checks']}")
    if rec["errors"]:
        lines.append(f"  errors: {[e['step'] + ': ' + e['error'] for e in rec['errors']]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU through the Triton interpreter")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--out", type=Path, default=None, help="write the record here as JSON (atomic)")
    a = p.parse_args(argv)
    if a.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("rerank_gpu: --smoke needs TRITON_INTERPRET=1 before triton is imported; run the script directly")
        return 2
    rec = run(a.device or ("cpu" if a.smoke else "cuda"), smoke=a.smoke)
    if a.out:
        from acf_fast.atomic import atomic_write_json

        atomic_write_json(a.out, rec)
        print(f"wrote {a.out}")
    return 0 if rec["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
