"""Fused vs eager: one ACF training step per backend, side by side in one run.

A command line over the harness: the workload is ``bench.train_step`` (the trainer's
own ``Objective``: four B×B score blocks, the spec §6 loss, backward, clip, Adam, on
``bench.workloads.train_batch``), the timer ``bench.timing``. Before timing, the
backends must agree on the first step's loss and gradients (printed).

    PYTHONPATH=. python bench/train_step_cpu.py                 # CPU: eager vs torch
    PYTHONPATH=. python bench/train_step_cpu.py --device cuda   # GPU: eager vs torch vs triton
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from acf_fast.machine import machine_record, resolve_device  # noqa: E402
from bench.timing import time_fn  # noqa: E402
from bench.train_step import first_step_gradient, make_train_step  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--variant", default="paper", choices=("paper", "acf-code"))
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--words", type=int, default=16, help="longest caption (positives: twice)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default=None, help="comma list (default: eager,torch on CPU; + triton on CUDA)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    backends = args.backends.split(",") if args.backends else ["eager", "torch"] + (["triton"] if device.type == "cuda" else [])
    shape = dict(batch=args.batch, embed_dim=args.embed_dim, heads=args.heads, K=args.regions, words=args.words,
                 device=device)
    m = machine_record(device)
    print(f"one training step: batch {args.batch} x 4 text sets (T, T-, T+, T~-), {args.variant} D={args.embed_dim} "
          f"H={args.heads}, K={args.regions}, L<={args.words} (positives <={2 * args.words}); {m['node']} "
          f"{m['processor']} {m['cpus']} CPUs, torch {m['torch']} threads {torch.get_num_threads()}"
          + (f", {m['gpu']}" if m["gpu"] else ""))
    rows = []
    for name in backends:
        loss, grads = first_step_gradient(args.variant, name, **shape)
        step, _ = make_train_step(args.variant, name, **shape)
        rows.append((name, loss, grads, time_fn(step, device, repeats=args.repeats)))
    ref = rows[0]
    print(f"{'backend':<8} {'step ms':>9} {'speed-up':>9} {'first loss':>11} {'max |dgrad| vs ' + ref[0]:>22}  method")
    for name, loss, grads, t in rows:
        dg = float((grads - ref[2]).abs().max())
        print(f"{name:<8} {1e3 * t['median_s']:9.1f} {ref[3]['median_s'] / t['median_s']:8.2f}x {loss:11.5f} {dg:22.2e}"
              f"  {t['method']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
