"""One prepared GPU check of the fused Triton similarity (issue 3, item 7).

    PYTHONPATH=. python bench/gpu_check.py --variants paper     # on a CUDA machine, one variant
    PYTHONPATH=. python bench/gpu_check.py --variants acf-code  # per command (each ~2-5 min)
    PYTHONPATH=. python bench/gpu_check.py --smoke        # CPU, Triton interpreter, seconds

For each variant (paper, acf-code), at the full COCO-5K shape (K = 36 regions, caption
lengths L <= 32 drawn like COCO wordpiece counts, D = 1024, H = 8, bf16 storage):

1. correctness on a slice: triton vs the torch backend (same bf16 inputs) and vs the
   float64 per-pair reference on a tiny slice (max |ΔS|; spec §9 allows 5e-3);
2. the kernel is autotuned on a slice first (the autotune key leaves out N and M, so
   the full grid reuses that choice instead of tuning at full size);
3. time of the full 5,000 × 25,000 grid: end to end (precompute + Cholesky factors +
   kernel) and kernel only (prepared sides), CUDA events; if a slice predicts more
   than ``--max-full-s`` the full grid is skipped and the extrapolation recorded;
4. torch backend and eager on slices, extrapolated per pair, for the ratios;
5. achieved TFLOP/s of the kernel from the spec §8 per-pair counts (bench/flops.py,
   valid rows only, not the padded tiles).

Writes ``$OUT/gpu_check-<variants>.json`` (``OUT`` defaults to ./gpu_out) atomically,
after each variant, with the
device name (torch.cuda.get_device_name), date and torch / triton versions; copy it
to bench/results/ to commit it.

Caption lengths: 2 + round(lognormal(log 11.5, 0.3)) clipped to [8, 32] wordpieces —
COCO captions hold ~10.5 words (≈ 11.5 wordpieces) plus [CLS] and [SEP], with a long
right tail; the clip at 32 matches the spec's L <= 32.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Check and time the fused Triton similarity at the COCO-5K shape on one GPU.")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU through the Triton interpreter (checks that the script runs)")
    p.add_argument("--images", type=int, default=5000, help="N of the full grid (default 5000)")
    p.add_argument("--texts", type=int, default=25000, help="M of the full grid (default 25000)")
    p.add_argument("--variants", default="paper,acf-code", help="comma-separated variants to run")
    p.add_argument("--max-full-s", type=float, default=40.0,
                   help="skip the full grid when a slice predicts more seconds than this (default 40)")
    p.add_argument("--repeats", type=int, default=1, help="timed repeats of the full grid after a warm-up call (default 1)")
    p.add_argument("--out", default=None, help="output folder (default $OUT or ./gpu_out)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    # Triton reads the interpreter switch when it is imported / kernels are decorated
    # (PLATFORM_FACTS), so it must be set before `import triton` below.
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from acf_fast import VARIANTS, acf_similarity  # noqa: E402  (imports no kernel module)
from acf_fast.atomic import atomic_write_json  # noqa: E402
from acf_fast.reference import reference_similarity  # noqa: E402
from acf_fast.validate import check_similarity_inputs  # noqa: E402

try:  # shared helpers of the benchmark suite; the script still runs without them
    from bench.flops import grid_flops  # noqa: E402
except Exception:  # pragma: no cover
    grid_flops = None

ks = None  # acf_fast.kernels.similarity, imported in main() once the interpreter switch is set


def coco_lengths(M: int, gen: torch.Generator, l_max: int = 32) -> torch.Tensor:
    """(M,) int64 wordpiece counts incl. [CLS]/[SEP] (see the module docstring)."""
    z = torch.randn(M, generator=gen, dtype=torch.float64)
    words = torch.exp(math.log(11.5) + 0.3 * z).round()
    return (2 + words).clamp(8, l_max).to(torch.int64)


def make_inputs(variant, N, M, *, K, l_max, D, H, dtype, device, seed):
    """acf_similarity kwargs at this shape; weights like a trained model (I + N(0, 1/D))."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)  # noqa: E731
    lengths = coco_lengths(M, g, l_max) if l_max >= 8 else torch.randint(1, l_max + 1, (M,), generator=g)
    L = int(lengths.max())
    w_mask = torch.arange(L)[None, :] < lengths[:, None]
    v = VARIANTS[variant]
    kw = dict(heads=H, scale=v.scale, u1=v.u1, u2=v.u2)
    if v.learned_projections:
        eye = torch.eye(D)
        kw["weights"] = {n: eye + torch.randn(D, D, generator=g) / D**0.5 for n in ("z_x", "z_y", "z_o", "x_w", "x_v", "x_g")}
        kw["weights"]["gate"] = torch.randn(D, generator=g)
    if v.global_mode == "pairwise":
        kw["G"] = unit(N, D)
    else:
        kw["global_emb"] = (unit(N, D), unit(M, D))
    case = dict(V=unit(N, K, D), v_mask=None, W=unit(M, L, D), w_mask=w_mask, **kw)

    def mv(x):
        if isinstance(x, torch.Tensor):
            return x.to(device, dtype) if x.is_floating_point() else x.to(device)
        if isinstance(x, dict):
            return {k: mv(t) for k, t in x.items()}
        if isinstance(x, tuple):
            return tuple(mv(t) for t in x)
        return x

    case = {k: mv(t) for k, t in case.items()}
    return case, torch.full((N,), K), lengths


def sliced(case, n, m):
    c = dict(case)
    c["V"], c["W"] = case["V"][:n], case["W"][:m]
    c["w_mask"] = None if case["w_mask"] is None else case["w_mask"][:m]
    if case.get("G") is not None:
        c["G"] = case["G"][:n]
    if case.get("global_emb") is not None:
        c["global_emb"] = (case["global_emb"][0][:n], case["global_emb"][1][:m])
    return c


def score(case, backend):
    c = dict(case)
    return acf_similarity(c.pop("V"), c.pop("v_mask"), c.pop("W"), c.pop("w_mask"), backend=backend, **c)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """(median seconds, first-call seconds): CUDA events on a GPU, perf_counter on CPU."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], first


def prepared(case):
    """(img, txt, scale, global_emb) for launching the kernel alone."""
    v_mask, w_mask, weights, scale = check_similarity_inputs(
        case["V"], case["v_mask"], case["W"], case["w_mask"], heads=case["heads"], scale=case["scale"],
        u1=case["u1"], u2=case["u2"], weights=case.get("weights"), G=case.get("G"), global_emb=case.get("global_emb"))
    img, txt = ks.prepare_sides(case["V"], v_mask, case["W"], w_mask, heads=case["heads"], weights=weights,
                                G=case.get("G"))
    return img, txt, scale


def flops_of(k_valid, l_valid, D, H, variant):
    if grid_flops is None:
        return None
    return grid_flops(k_valid.tolist(), l_valid.tolist(), D, H, variant)


def run_variant(variant, shape, device, dtype, args, log):
    N, M, K, l_max, D, H, slice_nm, ref_nm, eager_nm = shape
    rec = {"variant": variant, "N": N, "M": M, "K": K, "L_max": l_max, "D": D, "H": H, "dtype": str(dtype)}
    case, k_valid, l_valid = make_inputs(variant, N, M, K=K, l_max=l_max, D=D, H=H, dtype=dtype, device=device,
                                         seed=args.seed)
    rec["L_mean"] = float(l_valid.float().mean())
    rec["L_padded"] = int(case["W"].shape[1])

    # 1. correctness on slices
    n, m = slice_nm
    s_case = sliced(case, n, m)
    S_tr = score(s_case, "triton")
    S_to = score(s_case, "torch")
    rec["slice"] = [n, m]
    rec["max_abs_diff_triton_vs_torch"] = float((S_tr.float() - S_to.float()).abs().max())
    rn, rm = ref_nm
    r_case = sliced(case, rn, rm)
    ref = reference_similarity(r_case["V"], r_case["v_mask"], r_case["W"], r_case["w_mask"], heads=H,
                               scale=case["scale"], u1=case["u1"], u2=case["u2"], weights=case.get("weights"),
                               G=r_case.get("G"), global_emb=r_case.get("global_emb"))
    rec["ref_slice"] = [rn, rm]
    rec["max_abs_diff_triton_vs_float64"] = float((S_tr[:rn, :rm].double().cpu() - ref).abs().max())
    rec["contract_atol"] = 5e-3 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    rec["contract_ok"] = rec["max_abs_diff_triton_vs_float64"] <= rec["contract_atol"]
    log(f"[{variant}] |triton-torch| {rec['max_abs_diff_triton_vs_torch']:.2e}  "
        f"|triton-float64| {rec['max_abs_diff_triton_vs_float64']:.2e} (contract {rec['contract_atol']:g})")

    # 2. slice timing (the first call autotunes on the slice) and the prediction
    img, txt, scale = prepared(s_case)
    out = torch.empty(n, m, dtype=torch.float32, device=device)
    launch = lambda img=img, txt=txt, out=out: ks.launch_similarity(  # noqa: E731
        img, txt, out, scale=scale, u1=case["u1"], u2=case["u2"], global_emb=s_case.get("global_emb"))
    t_slice, first = timed(launch, device, max(1, args.repeats))
    rec["slice_kernel_s"] = t_slice
    rec["slice_first_call_s"] = first  # includes compilation and autotuning
    predicted = t_slice * (N * M) / (n * m)
    rec["full_kernel_s_predicted"] = predicted
    f_slice = flops_of(k_valid[:n], l_valid[:m], D, H, variant)
    rec["slice_tflops"] = None if f_slice is None else f_slice / t_slice / 1e12
    t_torch, _ = timed(lambda: score(s_case, "torch"), device, 1)
    rec["slice_torch_s"] = t_torch
    log(f"[{variant}] slice {n}x{m}: kernel {t_slice * 1e3:.2f} ms, torch backend {t_torch * 1e3:.1f} ms; "
        f"full grid predicted {predicted:.2f} s")

    # 3. full grid
    f_full = flops_of(k_valid, l_valid, D, H, variant)
    rec["full_flops"] = f_full
    if predicted <= args.max_full_s:
        img, txt, scale = prepared(case)
        out = torch.empty(N, M, dtype=torch.float32, device=device)
        launch = lambda: ks.launch_similarity(  # noqa: E731
            img, txt, out, scale=scale, u1=case["u1"], u2=case["u2"], global_emb=case.get("global_emb"))
        rec["full_kernel_s"], _ = timed(launch, device, args.repeats)
        del img, txt, out
        rec["full_tflops"] = None if f_full is None else f_full / rec["full_kernel_s"] / 1e12
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rec["full_end_to_end_s"], _ = timed(lambda: score(case, "triton"), device, 1)
        if device.type == "cuda":
            rec["full_end_to_end_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        log(f"[{variant}] full {N}x{M}: kernel {rec['full_kernel_s']:.3f} s "
            f"({rec['full_tflops'] or float('nan'):.1f} TFLOP/s), end to end {rec['full_end_to_end_s']:.3f} s")
    else:
        rec["full_kernel_s"] = None
        rec["full_skipped"] = f"slice predicted {predicted:.1f} s > --max-full-s {args.max_full_s}"
        log(f"[{variant}] full grid skipped: {rec['full_skipped']}")

    # 4. eager and torch backends, per pair, for the ratios
    en, em = eager_nm
    e_case = sliced(case, en, em)
    t_eager, _ = timed(lambda: score(e_case, "eager"), device, 1)
    rec["eager_slice"] = [en, em]
    rec["eager_slice_s"] = t_eager
    rec["eager_full_s_extrapolated"] = t_eager * (N * M) / (en * em)
    rec["torch_full_s_extrapolated"] = t_torch * (N * M) / (n * m)
    full = rec["full_kernel_s"] or predicted
    rec["speedup_vs_eager"] = rec["eager_full_s_extrapolated"] / full
    rec["speedup_vs_torch"] = rec["torch_full_s_extrapolated"] / full
    log(f"[{variant}] speed-up vs eager x{rec['speedup_vs_eager']:.0f}, vs torch backend x{rec['speedup_vs_torch']:.1f}")
    return rec


def main(args) -> int:
    global ks
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check: --smoke needs TRITON_INTERPRET=1 before triton is imported; run the script directly",
              file=sys.stderr)
        return 2
    from acf_fast.kernels import similarity as ks

    out_dir = Path(args.out or os.environ.get("OUT") or "gpu_out")
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32  # bf16 arithmetic is wrong in the interpreter
        shape = (3, 5, 6, 5, 64, 4, (3, 5), (2, 3), (2, 3))
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; run with --smoke on CPU", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        shape = (args.images, args.texts, 36, 32, 1024, 8, (256, 1280), (3, 10), (8, 40))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {v!r}; expected any of {tuple(VARIANTS)}")
    record = {
        "script": "bench/gpu_check.py",
        "smoke": bool(args.smoke),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "flops_note": "spec §8 per-pair counts on valid rows (bench/flops.py), FLOPs = 2 x MACs",
        "results": [],
    }
    try:
        from bench.device import device_record

        record["device_record"] = device_record(device)
    except Exception as err:  # the record is a bonus; the check must not fail on it
        record["device_record"] = f"unavailable ({type(err).__name__}: {err})"
    path = out_dir / f"gpu_check-{'_'.join(variants)}{'-smoke' if args.smoke else ''}.json"
    for v in variants:
        t0 = time.perf_counter()
        try:
            rec = run_variant(v, shape, device, dtype, args, print)
        except Exception as err:  # keep what the other variant measured
            rec = {"variant": v, "error": f"{type(err).__name__}: {err}"}
            print(f"[{v}] FAILED: {rec['error']}", file=sys.stderr)
        rec["wall_s"] = time.perf_counter() - t0
        record["results"].append(rec)
        atomic_write_json(path, record)  # after each variant, so a timeout keeps the first
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in record["results"]) else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
