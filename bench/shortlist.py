"""Two-stage shortlist against the full grid (issue 15 item 3): recall and wall time.

    python bench/shortlist.py [--data demo_out/data --checkpoint demo_out/run/best.safetensors]
                              [--split test --ks 16 64 256 --backend auto --device auto]

On one split and one checkpoint (default: what ``make demo`` writes, the synthetic 1K
test, 1,000 images × 5,000 captions), it scores

- the full grid: ``acf_fast.scoring.score_split`` into a fresh, temporary ``--work``
  (nothing reused), which is what ``acf-fast evaluate --data`` runs;
- the cheap score alone (G · text_vectorsᵀ, the shortlist's first stage) as a row;
- ``acf_fast.shortlist.shortlist_split`` for each K (``evaluate --shortlist K``),

and reports spec §4 R@1/5/10 both ways and rsum (``evaluate_protocol``, protocol
"any", no re-ranking), the pairs ACF scored, and the wall time of each (data load,
encoding and scoring; the metrics are not timed). One run each: the grid takes
minutes on a CPU, and the record gives the load average before and after, since on a
shared machine wall times include waiting for cores.

Writes ``bench/results/shortlist-<machine>-<date>.{json,md}`` (atomic).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (bench.report.OMP_NOTE)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from acf_fast.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from acf_fast.evaluate import evaluate_protocol  # noqa: E402
from acf_fast.machine import resolve_device  # noqa: E402
from acf_fast.scoring import DEFAULT_PRECISION, open_split, score_split  # noqa: E402
from acf_fast.model import ACF  # noqa: E402
from acf_fast.shortlist import cheap_scores, encode_split, shortlist_pairs, shortlist_split  # noqa: E402
from bench.device import device_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KEYS = [("i2t", "r1"), ("i2t", "r5"), ("i2t", "r10"), ("t2i", "r1"), ("t2i", "r5"), ("t2i", "r10")]


def metrics_row(name: str, S, txt2img, seconds, cpu_s, pairs, grid_pairs, extra=None) -> dict:
    m = evaluate_protocol(S, "any", txt2img)["plain"]
    row = {"method": name, "pairs_scored_by_acf": pairs, "fraction_of_grid": pairs / grid_pairs,
           "wall_s": seconds, "cpu_s": cpu_s, "metrics": m}
    row.update(extra or {})
    return row


def cheap_only(checkpoint, data, split, device):
    """The shortlist's first stage alone, through its own functions: S = G · text_vectorsᵀ."""
    t0 = time.perf_counter()
    opened = open_split(checkpoint, data, split, backend="auto", device=device, precision=DEFAULT_PRECISION)
    _, _, G, texts = encode_split(opened)
    C = cheap_scores(G, texts).cpu()
    return C, time.perf_counter() - t0, np.asarray(opened.data.txt2img, dtype=np.int64)


def markdown(rec: dict) -> str:
    lines = [f"# Two-stage shortlist vs the full grid ({rec['date'][:10]})", "",
             f"Data: `{rec['data']}` split `{rec['split']}` ({rec['images']:,} images × {rec['captions']:,} captions), "
             f"checkpoint `{rec['checkpoint']}` (variant {rec['model']['variant']}, D = {rec['model']['embed_dim']}, "
             f"H = {rec['model']['heads']}). Protocol: spec §4 R@K, one split (\"any\"), no "
             f"re-ranking. Backend `{rec['backend']}` on {rec['device']['name']} "
             f"({rec['device'].get('cpu_threads', rec['device'].get('torch_threads', '?'))} threads); load average "
             f"(1 min) {rec['load_before']:.2f} before, {rec['load_after']:.2f} after. One run each; wall time = load, "
             "encode and score (metrics not timed); CPU = this process's CPU time (all threads).", "",
             "| method | ACF pairs | of grid | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | rsum | wall (s) | CPU (s) | wall vs grid |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    grid_t = rec["rows"][0]["wall_s"]
    for r in rec["rows"]:
        m = r["metrics"]
        vals = " | ".join(f"{m[d][k]:.1f}" for d, k in KEYS)
        lines.append(f"| {r['method']} | {r['pairs_scored_by_acf']:,} | {100 * r['fraction_of_grid']:.2f}% | {vals} | "
                     f"{m['rsum']:.1f} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {grid_t / r['wall_s']:.1f}× |")
    lines += ["", "Stage times of the shortlist rows (s): " + "; ".join(
        f"K = {r['k']}: encode {r['stages']['time_encode_s']:.1f}, cheap score + top-K {r['stages']['time_cheap_s']:.2f}, "
        f"ACF on the pairs {r['stages']['time_acf_s']:.1f}" for r in rec["rows"] if "k" in r), ""]
    grid_row = rec["rows"][0]
    per_grid = grid_row["wall_s"] / grid_row["pairs_scored_by_acf"]
    for r in rec["rows"]:
        if "k" not in r:
            continue
        lines.append(f"- K = {r['k']}: queries whose ground truth ACF re-scores (on the list) I2T "
                     f"{r['ground_truth_on_list_pct']['i2t']:.1f}%, T2I {r['ground_truth_on_list_pct']['t2i']:.1f}%; "
                     f"re-scored entries vs the grid's max |Δ| = {r['max_abs_diff_vs_grid_on_pairs']:.1e}; ACF time per "
                     f"re-scored pair {1e6 * r['stages']['time_acf_s'] / r['pairs_scored_by_acf']:.1f} µs vs "
                     f"{1e6 * per_grid:.1f} µs per pair of the full grid (wall, whole run).")
    lines += [""] + rec.get("notes", [])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "demo_out" / "data")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "demo_out" / "run" / "best.safetensors")
    p.add_argument("--split", default="test")
    p.add_argument("--ks", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    dev = resolve_device(args.device)
    devrec = device_record(dev)
    load_before = os.getloadavg()[0]
    rows = []

    t0, c0 = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as work:
        full = score_split(args.checkpoint, args.data, args.split, work=work, backend=args.backend, device=args.device,
                           progress=True)
    t_full, c_full = time.perf_counter() - t0, time.process_time() - c0
    N, M = full.S.shape
    grid = N * M
    rows.append(metrics_row("full grid (ACF on every pair)", full.S, full.txt2img, t_full, c_full, grid, grid))
    print(rows[-1])

    c0 = time.process_time()
    C, t_cheap, txt2img = cheap_only(args.checkpoint, args.data, args.split, args.device)
    rows.append(metrics_row("cheap score only (G · text vectors)", C, txt2img, t_cheap, time.process_time() - c0,
                            0, grid))
    print(rows[-1])

    for k in args.ks:
        pairs = shortlist_pairs(C, k)
        t0, c0 = time.perf_counter(), time.process_time()
        short = shortlist_split(args.checkpoint, args.data, args.split, k=k, backend=args.backend,
                                device=args.device, progress=True)
        t, c = time.perf_counter() - t0, time.process_time() - c0
        assert short.info["pairs"] == pairs.shape[0]
        # queries whose ground truth made the list (else only its cheap score ranks it, below every listed pair)
        gt = torch.from_numpy(txt2img)[pairs[:, 1]] == pairs[:, 0]
        i2t_on = torch.zeros(N, dtype=torch.bool)
        i2t_on[pairs[gt, 0]] = True
        t2i_on = torch.zeros(M, dtype=torch.bool)
        t2i_on[pairs[gt, 1]] = True
        ceiling = {"i2t": 100.0 * float(i2t_on.float().mean()), "t2i": 100.0 * float(t2i_on.float().mean())}
        # the re-scored entries against the grid's (pair and grid code paths: float32 rounding)
        err = float((short.S[pairs[:, 0], pairs[:, 1]] - full.S[pairs[:, 0], pairs[:, 1]]).abs().max())
        stages = {key: short.info[key] for key in ("time_encode_s", "time_cheap_s", "time_acf_s")}
        rows.append(metrics_row(f"shortlist K = {k}", short.S, short.txt2img, t, c, short.info["pairs"], grid,
                                {"k": k, "stages": stages, "max_abs_diff_vs_grid_on_pairs": err,
                                 "ground_truth_on_list_pct": ceiling}))
        print(rows[-1])

    rel = lambda p: str(p.resolve().relative_to(ROOT)) if p.resolve().is_relative_to(ROOT) else str(p)  # noqa: E731
    rec = {"benchmark": "shortlist", "issue": 15, "date": devrec["date"], "data": rel(args.data), "split": args.split,
           "checkpoint": rel(args.checkpoint), "images": N, "captions": M,
           "model": json.loads(ACF.read_metadata(args.checkpoint)["acf_config"]),
           "backend": args.backend, "device": devrec, "load_before": load_before, "load_after": os.getloadavg()[0],
           "rows": rows, "notes": []}
    label = devrec["label"]
    stem = args.out_dir / f"shortlist-{label}-{devrec['date'][:10]}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stem.with_suffix(".json"), rec, indent=1)
    atomic_write_text(stem.with_suffix(".md"), markdown(rec))
    print(markdown(rec))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
