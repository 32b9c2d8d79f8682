"""CPU benchmark: ``backend="torch"`` (spec §8 algebra) against ``backend="eager"`` (per pair).

A command line over the harness: inputs from ``bench.workloads.similarity_inputs``,
times and peak memory from ``bench.timing`` (through ``bench.cases.similarity_case``,
the report's own similarity case), FLOPs from ``bench.flops`` (spec §8, each pair at
its own valid lengths). Default: 100 images × 500 texts, K = 36, L uniform in 12..32,
D = 1024, H = 8, float32, both variants side by side in one run.

    PYTHONPATH=. python bench/similarity_cpu.py                  # the acceptance run
    PYTHONPATH=. python bench/similarity_cpu.py --eager-texts 50 # eager on 100 x 50, extrapolated to 100 x 500

Eager's cost is linear in the number of pairs (it loops over them), so with
``--eager-texts`` it is timed at N × that many texts and extrapolated per pair; the
table marks it.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from acf_fast.atomic import atomic_write_json  # noqa: E402
from acf_fast.machine import machine_record  # noqa: E402
from bench.cases import similarity_case  # noqa: E402
from bench.report import jsonable  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100, help="N images")
    p.add_argument("--texts", type=int, default=500, help="M texts")
    p.add_argument("--regions", type=int, default=36, help="K regions per image")
    p.add_argument("--max-len", type=int, default=32, help="padded caption length L")
    p.add_argument("--min-len", type=int, default=12, help="shortest caption (lengths uniform in min..max)")
    p.add_argument("--dim", type=int, default=1024, help="D")
    p.add_argument("--heads", type=int, default=8, help="H")
    p.add_argument("--variants", nargs="+", default=["paper", "acf-code"], choices=["paper", "acf-code"])
    p.add_argument("--eager-texts", type=int, default=0,
                   help="time eager on N x this many texts and extrapolate per pair (0 = all)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per backend (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", default=None, help="also write the rows here (atomic)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.min_len <= args.max_len:
        raise SystemExit("--min-len must be between 1 and --max-len")
    N, M = args.images, args.texts
    sizes, caps = [(N, M)], {}
    if 0 < args.eager_texts < M:
        sizes.insert(0, (N, args.eager_texts))  # eager's measured size; torch is timed there too
        caps["eager"] = N * args.eager_texts
    rows = similarity_case(sizes, args.variants, "cpu", backends=("eager", "torch"), caps=caps, K=args.regions,
                           l_min=args.min_len, l_max=args.max_len, D=args.dim, heads=args.heads, repeats=args.repeats,
                           seed=args.seed)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    print(f"{'variant':<9} {'N x M':>11} {'backend':<7} {'median s':>9} {'vs eager':>9} {'GFLOP/s':>8} "
          f"{'peak MiB':>9} {'max|dS| vs eager':>17}  status")
    eager = {(r["variant"], r["N"], r["M"]): r.get("median_s") for r in rows if r["backend"] == "eager"}
    for r in rows:
        t, te = r.get("median_s"), eager.get((r["variant"], r["N"], r["M"]))
        ratio = f"{te / t:8.1f}x" if t and te and r["backend"] != "eager" else f"{'':9}"
        gflops = f"{r['tflops'] * 1e3:8.1f}" if r.get("tflops") else f"{'—':>8}"
        peak = f"{r['peak_bytes'] / 2**20:9.0f}" if r.get("peak_bytes") is not None else f"{'—':>9}"
        diff = f"{r['max_abs_diff_vs_eager']:17.1e}" if "max_abs_diff_vs_eager" in r else f"{'':17}"
        median = f"{t:9.2f}" if t else f"{'—':>9}"
        note = r.get("note") or ""
        status = note if note.startswith(r["status"]) else r["status"] + (f": {note}" if note else "")
        print(f"{r['variant']:<9} {r['N']:>4} x {r['M']:<5} {r['backend']:<7} {median} {ratio} {gflops} {peak} {diff}  "
              f"{status}")
    if args.json:
        atomic_write_json(args.json, jsonable({"machine": machine_record("cpu"), "threads": torch.get_num_threads(),
                                               "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
