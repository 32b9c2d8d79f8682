"""Fused vs eager: one ACF training step, side by side in one run.

One step = ``acf_fast.train.objective.Objective`` (the trainer's own forward):
encoders, the four B×B score blocks S(I,T), S(I,T⁻), S(I,T⁺), S(I,T̃⁻) from
``acf_similarity``, the spec §6 loss, then backward. Same model, same batch, same
negatives for every backend; the script checks the backends agree on the loss
and the gradients before it reports times.

    PYTHONPATH=. python bench/train_step_cpu.py                 # CPU: eager vs torch
    PYTHONPATH=. python bench/train_step_cpu.py --device cuda   # GPU: eager vs torch vs triton

Inputs are seeded random features of the real shapes (K = 36 regions, Dv = 2048,
Db = 384 MiniLM features, captions of up to --words wordpieces, long positives of
up to twice that), so no encoder or data set is needed.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def make_batch(B, K, L, Dv, Db, seed, device):
    g = torch.Generator().manual_seed(seed)

    def words(n, L, lo):
        lengths = torch.randint(lo, L + 1, (n,), generator=g)
        mask = torch.arange(L)[None] < lengths[:, None]
        return torch.randn(n, L, Db, generator=g) * mask[..., None], mask

    rmask = torch.ones(B, K, dtype=torch.bool)
    rmask[: B // 5, K * 2 // 3:] = False  # some images with fewer valid regions
    w, m = words(B, L, max(3, L // 2))
    pw, pm = words(B, 2 * L, max(3, L // 2))
    b = {"regions": torch.randn(B, K, Dv, generator=g), "region_mask": rmask, "globals": torch.randn(B, Dv, generator=g),
         "words": w, "mask": m, "pos_words": pw, "pos_mask": pm,
         # the cached encodings of the shuffled texts that shuffle negatives take (same masks)
         "shuf_words": torch.randn(w.shape, generator=g) * m[..., None],
         "pos_shuf_words": torch.randn(pw.shape, generator=g) * pm[..., None]}
    return {k: v.to(device) for k, v in b.items()}


def time_step(obj, batch, repeat, device):
    def once():
        obj.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss, _ = obj(batch, torch.Generator().manual_seed(1))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_fwd = time.perf_counter() - t
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return t_fwd, time.perf_counter() - t, loss

    once()  # warm-up (allocations, kernel compilation)
    runs = [once() for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[-1][2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--variant", default="paper", choices=("paper", "acf-code"))
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--words", type=int, default=16, help="longest caption (positives: twice)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--backends", default=None, help="comma list (default: eager,torch on CPU; + triton on CUDA)")
    args = p.parse_args(argv)

    from acf_fast.model import ACF
    from acf_fast.train.objective import Objective

    device = torch.device(args.device)
    backends = args.backends.split(",") if args.backends else (["eager", "torch"] + (["triton"] if device.type == "cuda" else []))
    batch = make_batch(args.batch, args.regions, args.words, 2048, 384, 0, device)
    print(f"one training step: batch {args.batch} x 4 text sets (T, T-, T+, T~-), {args.variant} D={args.embed_dim} "
          f"H={args.heads}, K={args.regions}, L<={args.words} (positives <={2 * args.words}); "
          f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    results = {}
    for name in backends:
        torch.manual_seed(0)
        model = ACF(args.variant, embed_dim=args.embed_dim, heads=args.heads).to(device)
        obj = Objective(model, negatives="mixture", positives=True, backend=name)
        fwd, total, loss = time_step(obj, batch, args.repeat, device)
        grads = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
        results[name] = (fwd, total, float(loss.detach()), grads)
    ref = results[backends[0]]
    print(f"{'backend':<8} {'forward ms':>11} {'fwd+bwd ms':>11} {'speed-up':>9} {'loss':>10} {'max |dgrad| vs ' + backends[0]:>22}")
    for name in backends:
        fwd, total, loss, grads = results[name]
        dg = float((grads - ref[3]).abs().max())
        print(f"{name:<8} {1e3 * fwd:11.1f} {1e3 * total:11.1f} {ref[1] / total:8.1f}x {loss:10.5f} {dg:22.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
