"""Streaming evaluation (acf_fast.stream) against the in-memory evaluator, and its memory
at a size whose S does not fit (issue 15, item 2).

    python bench/stream_check.py [--device cpu|cuda] [--small 5000 --large 20000] [--skip-large]

Scorer: a cheap dot-product block scorer, score(rows, cols) = A[rows] @ B[cols].T, with
A (N, 32) ~ N(0, 1) and B[t] = A[t // 5] + 2 N(0, 1) (captions near their image, so
the recalls are neither 0 nor 100), fixed seed; B is also the text vectors of the
``embedding`` neighbours. Re-ranking: k_i2t 15, k_t2i 20, k' 5, full ranking (n None).

1. Small (N x 5N, default 5,000 x 25,000, coco5k's shape): S assembled from the SAME
   tiles the stream reads; ``evaluate_protocol(S, rerank=True)`` and ``rerank(S, Nb)``
   against ``stream_evaluate`` (metrics dicts and both re-ranked head lists compared
   exactly); times of each path, the in-memory one split into scoring S and evaluating.
2. Large (default 20,000 x 100,000: S would be 8 GB in float32): the stream alone, in
   a child process under ``/usr/bin/time -v``; its "Maximum resident set size" and wall
   time are recorded with the verbatim output.

Writes bench/results/stream-<machine>-<date>.json (atomic; ``--out`` to change).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see bench.report)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from acf_fast.atomic import atomic_write_json  # noqa: E402
from acf_fast.evaluate import evaluate_protocol  # noqa: E402
from acf_fast.rerank import rerank, text_neighbors  # noqa: E402
from acf_fast.stream import dot_scorer, stream_evaluate  # noqa: E402

D, SEED = 32, 0
OPTS = dict(rerank=True, k_i2t=15, k_t2i=20, kprime=5, n=None)


def embeddings(N: int, device) -> tuple:
    """A (N, D), B (5N, D) float32 on ``device``, from a fixed CPU generator."""
    gen = torch.Generator().manual_seed(SEED)
    A = torch.randn(N, D, generator=gen)
    B = A.repeat_interleave(5, 0) + 2.0 * torch.randn(5 * N, D, generator=gen)
    return A.to(device), B.to(device)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_stream(A, B, device, tile_rows: int, tile_cols: int, progress: bool, rerank: bool = True):
    N = A.shape[0]
    sync(device)
    t0 = time.perf_counter()
    result, runs = stream_evaluate(dot_scorer(A, B), N, 5 * N, text_vectors=B, tile_rows=tile_rows,
                                   tile_cols=tile_cols, progress=progress, details=True, **dict(OPTS, rerank=rerank))
    sync(device)
    return result, runs[0], time.perf_counter() - t0


def small(N: int, device, tile_rows: int, tile_cols: int, progress: bool) -> dict:
    M = 5 * N
    A, B = embeddings(N, device)
    result, run, t_stream = run_stream(A, B, device, tile_rows, tile_cols, progress)
    score = dot_scorer(A, B)
    sync(device)
    t0 = time.perf_counter()
    S = torch.empty(N, M, dtype=torch.float32, device=device)
    for a in range(0, N, tile_rows):  # the same tiles, so S holds the entries the stream read
        for b in range(0, M, tile_cols):
            S[a : a + tile_rows, b : b + tile_cols] = score(torch.arange(a, min(N, a + tile_rows)),
                                                            torch.arange(b, min(M, b + tile_cols)))
    sync(device)
    t_score = time.perf_counter() - t0
    want = evaluate_protocol(S, "any", text_vectors=B, **OPTS)
    sync(device)
    t_eval = time.perf_counter() - t0 - t_score
    nb = text_neighbors("embedding", OPTS["kprime"], text_vectors=B)
    hi, ht = rerank(S, nb, OPTS["k_i2t"], OPTS["k_t2i"], OPTS["n"])
    t0 = time.perf_counter()
    want_plain = evaluate_protocol(S, "any", **dict(OPTS, rerank=False))
    t_eval_plain = time.perf_counter() - t0
    del S
    plain, plain_run, t_plain = run_stream(A, B, device, tile_rows, tile_cols, progress, rerank=False)
    equal = {
        "metrics": result == want,
        "i2t_heads": bool(torch.equal(hi, run.i2t_heads)),
        "t2i_heads": bool(torch.equal(ht, run.t2i_heads)),
        "plain_only_metrics": plain == want_plain,
    }
    return {
        "images": N, "texts": M, "tiles": [tile_rows, tile_cols], "equal": equal,
        "plain": want["plain"], "reranked": want["reranked"],
        "stream": {"wall_s": round(t_stream, 3), "neighbors_s": run.info["neighbors_s"], "passes": run.info["passes"]},
        "in_memory": {"score_s": round(t_score, 3), "evaluate_s": round(t_eval, 3),
                      "wall_s": round(t_score + t_eval, 3), "S_bytes": N * M * 4},
        "stream_over_in_memory": round(t_stream / (t_score + t_eval), 2),
        "plain_only": {"stream_wall_s": round(t_plain, 3), "stream_passes": plain_run.info["passes"],
                       "in_memory_wall_s": round(t_score + t_eval_plain, 3),
                       "in_memory_evaluate_s": round(t_eval_plain, 3)},
    }


def large(N: int, device, tile_rows: int, tile_cols: int) -> dict:
    """The stream alone at N x 5N in a child under /usr/bin/time -v."""
    cmd = ["/usr/bin/time", "-v", sys.executable, str(Path(__file__).resolve()), "--worker", str(N),
           "--device", str(device), "--tile-rows", str(tile_rows), "--tile-cols", str(tile_cols)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    time_v = [ln.strip() for ln in proc.stderr.splitlines() if ":" in ln and "\t" in ln]
    fields = dict(ln.split(": ", 1) for ln in time_v if ": " in ln)
    rss_kb = int(fields["Maximum resident set size (kbytes)"])
    report.update({"command": " ".join(cmd[2:]), "time_v": time_v, "max_rss_kbytes": rss_kb,
                   "max_rss_gib": round(rss_kb / 2**20, 3), "elapsed_wall": fields["Elapsed (wall clock) time (h:mm:ss or m:ss)"],
                   "S_bytes_if_held": N * 5 * N * 4, "rss_at_most_2GB": rss_kb * 1024 <= 2 * 10**9})
    return report


def worker(N: int, device, tile_rows: int, tile_cols: int) -> None:
    result, run, t = run_stream(*embeddings(N, device), device, tile_rows, tile_cols, progress=False)
    print(json.dumps({"images": N, "texts": 5 * N, "tiles": [tile_rows, tile_cols], "wall_s": round(t, 3),
                      "plain": result["plain"], "reranked": result["reranked"], "passes": run.info["passes"],
                      "neighbors_s": run.info["neighbors_s"],
                      "peak_rss_bytes_self": peak_rss_bytes()}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", type=int, default=5000, help="images of the exactness check (texts = 5x)")
    p.add_argument("--large", type=int, default=20000, help="images of the memory run (texts = 5x)")
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--tile-rows", type=int, default=None, help="default 1024 (CPU) / 4096 (GPU)")
    p.add_argument("--tile-cols", type=int, default=None, help="default 8192 (CPU) / 32768 (GPU)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    tr = args.tile_rows or (4096 if gpu else 1024)
    tc = args.tile_cols or (32768 if gpu else 8192)
    if args.worker is not None:
        worker(args.worker, args.device, tr, tc)
        return 0
    from bench.device import device_record

    dev = device_record(torch.device(args.device))
    rec = {"what": "acf_fast.stream vs evaluate_protocol, dot-product block scorer (D = 32, seed 0)",
           "scorer": "A[rows] @ B[cols].T; A ~ N(0,1) (N, 32); B[t] = A[t // 5] + 2 N(0,1); B = text vectors",
           "rerank": OPTS, "device": dev, "torch_threads": torch.get_num_threads(),
           "load_avg_before": os.getloadavg()}
    rec["small"] = small(args.small, args.device, tr, tc, args.progress)
    print(json.dumps({k: rec["small"][k] for k in ("equal", "stream", "in_memory", "stream_over_in_memory",
                                                     "plain_only")}, indent=1))
    if not args.skip_large:
        rec["large"] = large(args.large, args.device, tr, tc)
        print("\n".join(rec["large"]["time_v"]))
        print(json.dumps({k: rec["large"][k] for k in ("wall_s", "max_rss_gib", "rss_at_most_2GB", "neighbors_s", "passes")}, indent=1))
    rec["load_avg_after"] = os.getloadavg()
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
    out = args.out or ROOT / "bench" / "results" / f"stream-{dev['label']}-{date}.json"
    atomic_write_json(out, rec)
    print(f"wrote {out}")
    return 0 if all(rec["small"]["equal"].values()) and rec.get("large", {}).get("rss_at_most_2GB", True) else 1


if __name__ == "__main__":
    sys.exit(main())
