"""Re-ranking and metrics on a COCO-5K-sized S (spec §4, §5), vs a per-query numpy loop.

    python bench/rerank_cpu.py [--images 5000 --texts 25000 --repeats 3 --slice 200 --device cpu]

Times (median of ``--repeats`` after one warm-up):
- ``rerank_i2t`` (k̂ = 15) + ``rerank_t2i`` (k̂ = 20, k' = 5 neighbours given) on S;
- ``recall_metrics`` plain and with both re-ranked heads;
- the neighbour lists themselves (siblings: free; profile: an M x M x N matmul, reported
  separately because it is not part of re-ranking and is slow on a CPU).
The baseline is the straightforward loop (one query at a time, ``np.argsort`` of
the query's list, positions by ``np.where``), timed on ``--slice`` queries per direction
and scaled to all queries; the ratio is baseline / ours. Writes
``bench/results/rerank_<device>.json`` (atomic) and prints a table with the wall
time, the process CPU time and the load average (on a shared CPU the wall time of a
multi-threaded run includes waiting for the other thread; ``--threads 1`` avoids it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acf_fast.atomic import atomic_write_json as write_json_atomic  # noqa: E402
from acf_fast.evaluate import recall_metrics  # noqa: E402
from acf_fast.rerank import rerank_i2t, rerank_t2i, text_neighbors  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


CPU_TIMES = {}


def median_time(fn, device, repeats, name=None):
    """Median wall time of ``repeats`` calls after a warm-up; also keeps the median
    process CPU time under ``name`` (on a shared machine wall time includes waiting)."""
    fn()
    _sync(device)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if name:
        CPU_TIMES[name] = float(np.median(cpu))
    return float(np.median(times)), times


def loop_rerank_i2t(S, queries, k):
    """The authors' style: argsort each list, positions by np.where."""
    out = []
    for i in queries:
        C = np.argsort(-S[i], kind="stable")[:k]
        r = [np.where(np.argsort(-S[:, t], kind="stable") == i)[0][0] + 1 for t in C]
        out.append(C[np.argsort(r, kind="stable")])
    return out


def loop_rerank_t2i(S, nb, queries, k):
    out = []
    for t in queries:
        C = np.argsort(-S[:, t], kind="stable")[:k]
        r = []
        for c in C:
            order = np.argsort(-S[c], kind="stable")
            r.append(min(np.where(order == u)[0][0] for u in nb[t]) + 1)
        out.append(C[np.argsort(r, kind="stable")])
    return out


def loop_ranks(S, txt2img, img_queries, txt_queries):
    ranks = []
    for i in img_queries:
        order = np.argsort(-S[i], kind="stable")
        ranks.append(min(np.where(order == t)[0][0] for t in np.nonzero(txt2img == i)[0]))
    for t in txt_queries:
        order = np.argsort(-S[:, t], kind="stable")
        ranks.append(np.where(order == txt2img[t])[0][0])
    return ranks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--texts", type=int, default=25000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slice", type=int, default=200, help="queries per direction timed in the baseline loop")
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", action="store_true", help="also time text_neighbors('profile') (slow on CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    N, M = a.images, a.texts
    g = torch.Generator().manual_seed(0)
    S_cpu = torch.rand(N, M, generator=g)
    S = S_cpu.to(device)
    txt2img = torch.arange(M) // 5
    nb = text_neighbors("siblings", 5, txt2img=txt2img.to(device))

    res = {"device": str(device), "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "images": N, "texts": M, "repeats": a.repeats}
    heads = {}

    def both():
        heads["i2t"] = rerank_i2t(S, 15)
        heads["t2i"] = rerank_t2i(S, nb, 20)

    res["load_average_before"] = os.getloadavg()[0]
    res["rerank_i2t_s"], _ = median_time(lambda: rerank_i2t(S, 15), device, a.repeats, "rerank_i2t")
    res["rerank_t2i_s"], _ = median_time(lambda: rerank_t2i(S, nb, 20), device, a.repeats, "rerank_t2i")
    res["rerank_both_s"], res["rerank_both_all_s"] = median_time(both, device, a.repeats, "rerank_both")
    res["metrics_plain_s"], _ = median_time(lambda: recall_metrics(S), device, a.repeats, "metrics_plain")
    res["metrics_reranked_s"], _ = median_time(lambda: recall_metrics(S, None, heads["i2t"], heads["t2i"]), device,
                                               a.repeats, "metrics_reranked")
    res["neighbors_siblings_s"], _ = median_time(lambda: text_neighbors("siblings", 5, txt2img=txt2img), device, 1)
    if a.profile:
        res["neighbors_profile_s"], _ = median_time(lambda: text_neighbors("profile", 5, S=S), device, 1)

    Sn, nbn, t2i_np = S_cpu.numpy(), nb.cpu().numpy(), txt2img.numpy()
    q_img = np.linspace(0, N - 1, a.slice).astype(int)
    q_txt = np.linspace(0, M - 1, a.slice).astype(int)
    t0 = time.perf_counter()
    base_i2t = loop_rerank_i2t(Sn, q_img, 15)
    t1 = time.perf_counter()
    base_t2i = loop_rerank_t2i(Sn, nbn, q_txt[: max(1, a.slice // 10)], 20)  # 20 row sorts per query: fewer
    t2 = time.perf_counter()
    loop_ranks(Sn, t2i_np, q_img, q_txt)
    t3 = time.perf_counter()
    res["loop_rerank_both_s_scaled"] = (t1 - t0) / len(q_img) * N + (t2 - t1) / max(1, a.slice // 10) * M
    res["loop_metrics_s_scaled"] = (t3 - t2) / (2 * a.slice) * (N + M)
    res["cpu_time_s"] = dict(CPU_TIMES)
    res["load_average_after"] = os.getloadavg()[0]
    res["speedup_rerank"] = res["loop_rerank_both_s_scaled"] / res["rerank_both_s"]
    res["speedup_metrics"] = res["loop_metrics_s_scaled"] / res["metrics_plain_s"]
    # the loop and ours must agree on the slice
    ours_i2t, ours_t2i = heads["i2t"].cpu().numpy(), heads["t2i"].cpu().numpy()
    res["agree_with_loop"] = bool(
        all((ours_i2t[i] == b).all() for i, b in zip(q_img, base_i2t))
        and all((ours_t2i[t] == b).all() for t, b in zip(q_txt, base_t2i))
    )

    print(f"{N} x {M} float32 on {device} ({torch.get_num_threads()} threads), median of {a.repeats}; "
          f"load average {res['load_average_before']:.1f} -> {res['load_average_after']:.1f} on {os.cpu_count()} cores")
    rows = [
        ("re-rank I2T (k=15)", res["rerank_i2t_s"], None),
        ("re-rank T2I (k=20, k'=5)", res["rerank_t2i_s"], None),
        ("re-rank both", res["rerank_both_s"], res["loop_rerank_both_s_scaled"]),
        ("metrics, plain", res["metrics_plain_s"], res["loop_metrics_s_scaled"]),
        ("metrics, with heads", res["metrics_reranked_s"], None),
        ("neighbours: siblings", res["neighbors_siblings_s"], None),
    ]
    if a.profile:
        rows.append(("neighbours: profile", res["neighbors_profile_s"], None))
    cpu_of = {"re-rank I2T (k=15)": "rerank_i2t", "re-rank T2I (k=20, k'=5)": "rerank_t2i",
              "re-rank both": "rerank_both", "metrics, plain": "metrics_plain", "metrics, with heads": "metrics_reranked"}
    print(f"{'step':28s} {'ours (s)':>10s} {'cpu (s)':>8s} {'loop (s, scaled)':>17s} {'ratio':>8s}")
    for name, ours, base in rows:
        b = f"{base:17.1f}" if base else " " * 17
        r = f"{base / ours:8.0f}x" if base else ""
        c = f"{CPU_TIMES[cpu_of[name]]:8.3f}" if name in cpu_of else " " * 8
        print(f"{name:28s} {ours:10.3f} {c} {b} {r}")
    print(f"loop agrees with ours on the slice: {res['agree_with_loop']}")
    out = a.out or Path(__file__).resolve().parent / "results" / f"rerank_{device.type}.json"
    write_json_atomic(out, res)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
