"""CPU benchmark: ``backend="torch"`` (spec §8 algebra) against ``backend="eager"`` (per pair).

Issue 3's CPU acceptance point: 100 images × 500 texts, K = 36, L uniform in 12..32,
D = 1024, H = 8, float32, both variants side by side in one run, plus the peak
memory of the torch backend (target < 2 GB) measured in a fresh child process as
the growth of ru_maxrss over the inputs (tracemalloc does not see torch's allocator).

    PYTHONPATH=. python bench/similarity_cpu.py                  # the acceptance run
    PYTHONPATH=. python bench/similarity_cpu.py --eager-texts 50 # eager on 50 texts, scaled ×M/50

Eager's cost is exactly linear in the number of texts (it loops over texts), so
``--eager-texts`` times it on the first texts and scales; the table says so.
FLOP counts are spec §8's per-pair multiply-adds ×2 at the padded L.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from acf_fast import acf_similarity  # noqa: E402
from acf_fast.atomic import atomic_write_json as write_json_atomic  # noqa: E402

MATS = ("z_x", "z_y", "z_o", "x_w", "x_v", "x_g")


def make_inputs(args, variant):
    """Synthetic inputs shaped like COCO features: l2-normalised rows, ragged captions."""
    g = torch.Generator().manual_seed(args.seed)
    N, M, K, L, D = args.images, args.texts, args.regions, args.max_len, args.dim
    V = torch.nn.functional.normalize(torch.randn(N, K, D, generator=g), dim=-1)
    W = torch.nn.functional.normalize(torch.randn(M, L, D, generator=g), dim=-1)
    lens = torch.randint(args.min_len, L + 1, (M,), generator=g)
    w_mask = torch.arange(L)[None, :] < lens[:, None]
    G = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1)
    kw = dict(heads=args.heads)
    if variant == "paper":
        kw["weights"] = {k: torch.randn(D, D, generator=g) / D ** 0.5 for k in MATS}
        kw["weights"]["gate"] = torch.randn(D, generator=g)
        kw["G"] = G
    else:
        kw["scale"] = (4.0, 9.0)
        Wm = (W * w_mask[..., None]).sum(1) / w_mask.sum(1, keepdim=True)
        kw["global_emb"] = (G, torch.nn.functional.normalize(Wm, dim=-1))
    return V, None, W, w_mask, kw


def spec_macs(variant, K, L, D, H):
    """Spec §8 per-pair multiply-adds."""
    if variant == "paper":
        return 4 * K * L * D + K * (H * L) ** 2 + L * (H * K) ** 2 + (H * K + H * L) * D
    return 2 * K * L * D + K * H * L * L + L * H * K * K


def timed(fn, repeats):
    """Best wall seconds and the process CPU seconds of that run (CPU time is the
    steadier figure when other jobs share the cores)."""
    best, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        t, c = time.perf_counter() - t, time.process_time() - c
        if t < best:
            best, cpu = t, c
    return best, cpu, out


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_child(args):
    """Runs in a fresh process: peak RSS of one torch-backend call, and its growth over the inputs.

    Linux: the high-water mark (VmHWM) is reset after the inputs are built (write 5 to
    /proc/self/clear_refs), so import-time peaks do not mask the call's own peak.
    Elsewhere it falls back to ru_maxrss, which may then over-state the baseline.
    """
    V, vm, W, wm, kw = make_inputs(args, args.memory_child)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
        read_peak = lambda: _status_kib("VmHWM")  # noqa: E731
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        read_peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    with torch.no_grad():
        acf_similarity(V, vm, W, wm, backend="torch", **kw)
    peak = read_peak()
    print(json.dumps({"peak_rss_mib": peak / 1024, "growth_mib": (peak - before) / 1024}))


def measure_memory(args, variant):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", variant] + [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("images", "texts", "regions", "max_len", "min_len", "dim", "heads", "seed", "threads")
    ]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_variant(args, variant):
    V, vm, W, wm, kw = make_inputs(args, variant)
    N, M = V.shape[0], W.shape[0]
    with torch.no_grad():
        # warm-up on a slice so one-time costs (thread pools, allocator) are not timed
        acf_similarity(V[:4], vm, W[:8], wm[:8], backend="torch", **_slice_kw(kw, 4, 8))
        print(f"[{variant}] torch backend, {N} x {M} ...", flush=True)
        t_torch, c_torch, S_torch = timed(lambda: acf_similarity(V, vm, W, wm, backend="torch", **kw), args.repeats)
        m_e = min(M, args.eager_texts or M)
        print(f"[{variant}] eager backend, {N} x {m_e} ...", flush=True)
        t_e, c_e, S_eager = timed(lambda: acf_similarity(V, vm, W[:m_e], wm[:m_e], backend="eager", **_slice_kw(kw, N, m_e)), 1)
    t_eager, c_eager = t_e * M / m_e, c_e * M / m_e
    err = (S_torch[:, :m_e] - S_eager).abs().max().item()
    K, L, D, H = args.regions, args.max_len, args.dim, args.heads
    flop = 2 * spec_macs(variant, K, L, D, H) * N * M
    mem = measure_memory(args, variant)
    return {
        "variant": variant, "N": N, "M": M, "K": K, "L_max": L, "D": D, "H": H,
        "torch_s": t_torch, "eager_s": t_eager, "eager_texts_timed": m_e,
        "eager_extrapolated": m_e < M, "speedup": t_eager / t_torch,
        "torch_cpu_s": c_torch, "eager_cpu_s": c_eager, "speedup_cpu_time": c_eager / c_torch,
        "torch_gflops": flop / t_torch / 1e9, "max_abs_diff_torch_vs_eager": err,
        "torch_peak_rss_mib": mem["peak_rss_mib"], "torch_rss_growth_mib": mem["growth_mib"],
    }


def _slice_kw(kw, n, m):
    out = dict(kw)
    if "G" in out:
        out["G"] = out["G"][:n]
    if "global_emb" in out:
        out["global_emb"] = (out["global_emb"][0][:n], out["global_emb"][1][:m])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=100, help="N images")
    p.add_argument("--texts", type=int, default=500, help="M texts")
    p.add_argument("--regions", type=int, default=36, help="K regions per image")
    p.add_argument("--max-len", type=int, default=32, help="padded caption length L")
    p.add_argument("--min-len", type=int, default=12, help="shortest caption (lengths uniform in min..max)")
    p.add_argument("--dim", type=int, default=1024, help="D")
    p.add_argument("--heads", type=int, default=8, help="H")
    p.add_argument("--variants", nargs="+", default=["paper", "acf-code"], choices=["paper", "acf-code"])
    p.add_argument("--eager-texts", type=int, default=0, help="time eager on this many texts and scale (0 = all)")
    p.add_argument("--repeats", type=int, default=1, help="torch backend timings (best of)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", default=None, help="also write the results here (atomic)")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    if not 1 <= args.min_len <= args.max_len:
        raise SystemExit("--min-len must be between 1 and --max-len")
    rows = [run_variant(args, v) for v in args.variants]
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    print(f"{'variant':<9} {'N x M':>10} {'eager s':>9} {'torch s':>8} {'speed-up':>8} {'cpu-s ratio':>11} "
          f"{'GFLOP/s':>8} {'peak RSS MiB':>12} {'growth MiB':>10} {'max|dS|':>9}")
    for r in rows:
        star = "*" if r["eager_extrapolated"] else " "
        print(f"{r['variant']:<9} {r['N']:>4} x {r['M']:<5}{r['eager_s']:>8.1f}{star} {r['torch_s']:>8.2f} {r['speedup']:>7.1f}x "
              f"{r['speedup_cpu_time']:>10.1f}x {r['torch_gflops']:>8.1f} {r['torch_peak_rss_mib']:>12.0f} "
              f"{r['torch_rss_growth_mib']:>10.0f} {r['max_abs_diff_torch_vs_eager']:>9.1e}")
    if any(r["eager_extrapolated"] for r in rows):
        print("* eager timed on the first --eager-texts texts and scaled linearly to M")
    if args.json:
        write_json_atomic(args.json, {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                                      "threads": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
