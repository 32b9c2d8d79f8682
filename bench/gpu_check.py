"""The one prepared GPU check (issues 10 and 11): every contract, every timing, one call.

    PYTHONPATH=. python bench/gpu_check.py                # on a CUDA machine (~5 min of device time)
    PYTHONPATH=. python bench/gpu_check.py --quick        # smaller grid, no full-grid failure
    PYTHONPATH=. python bench/gpu_check.py --smoke        # CPU, Triton interpreter, tiny shapes

First every tile kernel the cases will launch is compiled at once on all CPUs
(``tiles.compile_ahead``; ``--no-compile-ahead`` leaves each to its first launch). Then,
for each variant (acf-code, paper) × storage (bf16, fp32 via f16x3), at the COCO 5K
shape (N = 5,000 images of K = 36 regions, M = 25,000 captions of COCO-like lengths
≤ 32 wordpieces, D = 1024, H = 8), inputs drawn on the GPU:

1. **side by side on slices**: kernel v2 (end to end: what ``acf_similarity`` runs; its
   first call autotunes on this slice, sizes are not in the autotune key), kernel v1
   (its kernel alone, its first shipped config) and the torch backend, per pair, and
   eager on a tiny slice; ratios name their baseline.
2. **contract**: kernel v2 on a check slice of ≥ 1,000 pairs (images with masked
   regions, ragged texts) against the torch backend in float64 (an independent
   implementation of the same algebra), which is itself checked against the literal
   per-pair float64 reference (``acf_fast.reference``) on a few pairs; spec §9 tolerance
   (bf16 5e-3, fp32 1e-4). Kernel v1 is checked on the same slice.
3. **full grid**: kernel v2 end to end on all 125 M pairs, once, with CUDA events
   around the per-item precompute and around the tile launches, NVML energy, and the
   GPU memory peak beyond the inputs and S. TFLOP/s counts the spec §8 useful work of
   the valid rows (bench/flops.py) and is set against the bf16 matrix ceiling measured
   in the same run.
4. **re-ranking and metrics** on the GPU (bench/rerank_gpu.py, issue 11).

A step that would not fit in ``--budget-s`` is skipped and recorded as a failure (no
silent skips; ``--quick`` turns full-grid skips into notes). The exit code is non-zero
when any contract fails, any step fails, or a full grid is skipped without ``--quick``.
``--plant-wrong`` adds 0.01 to every kernel score before the checks (the test that
this script can fail). Writes ``$OUT/gpu_check.json`` (``OUT`` defaults to ./gpu_out)
atomically after every step; commit it as ``bench/results/gpu/<device>-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__" and "--smoke" in sys.argv[1:]:
    # Triton reads the interpreter switch when kernels are decorated (PLATFORM_FACTS).
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from acf_fast import VARIANTS, acf_similarity  # noqa: E402
from acf_fast.atomic import atomic_write_json  # noqa: E402
from acf_fast.reference import reference_similarity  # noqa: E402
from acf_fast.validate import check_similarity_inputs  # noqa: E402
from bench.flops import grid_flops  # noqa: E402
from bench.timing import time_fn, time_once  # noqa: E402

CONTRACT = {torch.bfloat16: 5e-3, torch.float16: 5e-3, torch.float32: 1e-4}  # spec §9
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Check and time the fused Triton similarity, the re-ranker and the "
                                            "metrics at the COCO-5K shape on one GPU.")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    p.add_argument("--quick", action="store_true", help="a 1,000 x 5,000 grid; full-grid skips are notes, not failures")
    p.add_argument("--variants", default="acf-code,paper", help="comma-separated variants")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated storage dtypes (bf16, fp32)")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for the whole check (default 420)")
    p.add_argument("--no-rerank", action="store_true", help="leave out the re-ranker and metrics timings")
    p.add_argument("--no-compile-ahead", action="store_true",
                   help="compile each tile kernel at its first launch instead of all of them at once first")
    p.add_argument("--plant-wrong", action="store_true", help="add 0.01 to the kernel's scores (tests the exit code)")
    p.add_argument("--out", default=None, help="output folder (default $OUT or ./gpu_out)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- inputs


def coco_lengths(M: int, gen: torch.Generator, l_max: int = 32) -> torch.Tensor:
    """(M,) int64 wordpiece counts incl. [CLS]/[SEP]: 2 + round(lognormal(log 11.5, 0.3)),
    clipped to [8, l_max] (COCO captions hold ~10.5 words, ≈ 11.5 wordpieces)."""
    z = torch.randn(M, generator=gen, device=gen.device, dtype=torch.float32)
    words = torch.exp(math.log(11.5) + 0.3 * z).round()
    return (2 + words).clamp(8, l_max).to(torch.int64)


def make_case(variant: str, N: int, M: int, *, K: int, l_max: int, D: int, H: int, dtype, device, seed: int,
              masked_images: int) -> dict:
    """acf_similarity kwargs, drawn on ``device``: unit region vectors; texts with COCO
    lengths (acf-code: unnormalised words of norm ~10, as the authors' features, spec §1);
    the first ``masked_images`` images keep only 20-35 of their K regions; paper weights
    like a trained model (I + N(0, 1/D))."""
    gen = torch.Generator(device=device).manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=gen, device=device), dim=-1)  # noqa: E731
    lengths = coco_lengths(M, gen, l_max)
    L = int(lengths.max())
    w_mask = torch.arange(L, device=device)[None, :] < lengths[:, None]
    v_mask = torch.ones(N, K, dtype=torch.bool, device=device)
    nm = min(masked_images, N)
    if nm:  # keep 20..K regions (fewer for tiny K)
        keep = torch.randint(max(1, min(20, K - 2)), K + 1, (nm,), generator=gen, device=device)
        v_mask[:nm] = torch.arange(K, device=device)[None, :] < keep[:, None]
    v = VARIANTS[variant]
    W = unit(M, L, D)
    if variant == "acf-code":
        W = W * 10.0
    kw = dict(heads=H, scale=v.scale, u1=v.u1, u2=v.u2)
    if v.learned_projections:
        eye = torch.eye(D, device=device)
        kw["weights"] = {n: eye + torch.randn(D, D, generator=gen, device=device) / D**0.5
                         for n in ("z_x", "z_y", "z_o", "x_w", "x_v", "x_g")}
        kw["weights"]["gate"] = torch.randn(D, generator=gen, device=device)
    if v.global_mode == "pairwise":
        kw["G"] = unit(N, D)
    else:
        kw["global_emb"] = (unit(N, D), unit(M, D))
    case = dict(V=unit(N, K, D), v_mask=v_mask, W=W, w_mask=w_mask, **kw)
    return _cast(case, dtype), v_mask.sum(1), lengths


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _cast(t, dtype) for k, t in x.items()}
    if isinstance(x, tuple):
        return tuple(_cast(t, dtype) for t in x)
    return x


def sliced(case: dict, n: int, m: int) -> dict:
    c = dict(case)
    c["V"], c["v_mask"], c["W"], c["w_mask"] = case["V"][:n], case["v_mask"][:n], case["W"][:m], case["w_mask"][:m]
    if case.get("G") is not None:
        c["G"] = case["G"][:n]
    if case.get("global_emb") is not None:
        c["global_emb"] = (case["global_emb"][0][:n], case["global_emb"][1][:m])
    return c


def score(case: dict, backend: str) -> torch.Tensor:
    c = dict(case)
    return acf_similarity(c.pop("V"), c.pop("v_mask"), c.pop("W"), c.pop("w_mask"), backend=backend, **c)


# --------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def ceilings(device) -> dict:
    """bf16 matrix rate and device-to-device copy bandwidth, measured now (METHOD.md)."""
    if device.type != "cuda":
        return {"note": "no GPU: ceilings not measured"}
    import triton.testing as tt

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = tt.do_bench(lambda: a @ b, warmup=100, rep=400, return_mode="median")
    x = torch.randn(2**29, device=device)
    y = torch.empty_like(x)
    ms_c = tt.do_bench(lambda: y.copy_(x), warmup=50, rep=200, return_mode="median")
    return {"bf16_matmul_tflops": 2 * 8192**3 / (ms * 1e-3) / 1e12,
            "copy_tbps": 2 * x.numel() * 4 / (ms_c * 1e-3) / 1e12,
            "method": "triton.testing.do_bench median; 8192^3 bf16 random; 2 GiB fp32 copy (read + write)"}


# --------------------------------------------------------------------------- one variant × dtype


class Budget:
    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max())


def _checked(case: dict, H: int):
    """check_similarity_inputs on a case of H heads: (v_mask, w_mask, weights, scale)."""
    return check_similarity_inputs(case["V"], case["v_mask"], case["W"], case["w_mask"], heads=H, scale=case["scale"],
                                   u1=case["u1"], u2=case["u2"], weights=case.get("weights"), G=case.get("G"),
                                   global_emb=case.get("global_emb"))


def _v1_kernel(case: dict, H: int, device):
    """Kernel v1 alone on ``case``, its per-item precompute done here (untimed): a callable
    that writes S into ``out`` (N, M) fp32, NaN until then, and ``out``. The inputs it
    prepared go when the callable does."""
    from acf_fast.kernels import pair_v1

    vm, wm, wts, sc = _checked(case, H)
    img, txt = pair_v1.prepare_sides(case["V"], vm, case["W"], wm, heads=H, weights=wts, G=case.get("G"))
    out = torch.full((vm.shape[0], wm.shape[0]), float("nan"), device=device)
    return (lambda: pair_v1.launch_similarity(img, txt, out, scale=sc, u1=case["u1"], u2=case["u2"],
                                              global_emb=case.get("global_emb"))), out


def run_case(variant, dname, shape, device, args, budget: Budget, log, ceiling_tflops) -> dict:
    from acf_fast.kernels import pair_v1, tiles
    from acf_fast.kernels import similarity as ks

    # v1 is timed with the first of its shipped configs: its autotuning (5 configs per
    # variant and dtype) would cost more device time than the comparison is worth.
    pair_v1._acf_pair_kernel_tuned.configs = pair_v1._acf_pair_kernel_tuned.configs[:1]

    dtype = DTYPES[dname]
    N, M, K, l_max, D, H, check_nm, ref_nm, slice_nm, v1_nm, torch_nm, eager_nm, masked = shape
    rec = {"variant": variant, "dtype": dname, "N": N, "M": M, "K": K, "L_max": l_max, "D": D, "H": H,
           "fp32_dots": "f16x3" if dtype == torch.float32 else None, "failures": [], "notes": []}
    case, k_valid, l_valid = make_case(variant, N, M, K=K, l_max=l_max, D=D, H=H, dtype=dtype, device=device,
                                       seed=args.seed, masked_images=masked)
    rec["L_mean"] = float(l_valid.float().mean())
    rec["masked_images"] = masked
    plant = 0.01 if args.plant_wrong else 0.0
    tol = CONTRACT[dtype]
    rec["contract_atol"] = tol

    # 1. side by side on slices, per pair (v2's first call autotunes on its slice: sizes are not in the key)
    def per_pair(nm, fn):
        t = time_fn(fn, device, repeats=3)
        return t["median_s"] / (nm[0] * nm[1]), t

    s_case = sliced(case, *slice_nm)
    rec["v2_slice"] = slice_nm
    v2_pp, t = per_pair(slice_nm, lambda: score(s_case, "triton"))
    rec["v2_slice_s"], rec["v2_slice_first_s"] = t["median_s"], t["first_s"]
    if dtype == torch.float32 and not args.smoke:  # v1's fp32 dots run on CUDA cores: a smaller slice
        v1_nm = (v1_nm[0] // 4, v1_nm[1] // 4)
    v1_pp, t = per_pair(v1_nm, _v1_kernel(sliced(case, *v1_nm), H, device)[0])
    rec["v1_slice"], rec["v1_kernel_slice_s"] = v1_nm, t["median_s"]
    t_case = sliced(case, *torch_nm)
    torch_pp, t = per_pair(torch_nm, lambda: score(t_case, "torch"))
    rec["torch_slice"], rec["torch_slice_s"] = torch_nm, t["median_s"]
    e_case = sliced(case, *eager_nm)
    t_e = time_once(lambda: score(e_case, "eager"), device)
    eager_pp = t_e / (eager_nm[0] * eager_nm[1])
    rec["eager_slice"], rec["eager_slice_s"] = eager_nm, t_e
    pairs = N * M
    rec["per_pair_s"] = {"v2_end_to_end": v2_pp, "v1_kernel": v1_pp, "torch": torch_pp, "eager": eager_pp}
    rec["full_s_from_slices"] = {k: v * pairs for k, v in rec["per_pair_s"].items()}
    log(f"[{variant} {dname}] per 1M pairs: v2 {v2_pp * 1e6 * 1e3:.1f} ms, v1 kernel {v1_pp * 1e9:.1f} ms, "
        f"torch {torch_pp * 1e9:.0f} ms, eager {eager_pp * 1e9:.0f} ms")

    # 2. contract: kernel v2 vs the torch backend in float64 on >= 1,000 pairs; that vs the literal reference
    n, m = check_nm
    c_case = sliced(case, n, m)
    S_new = score(c_case, "triton") + plant
    S64 = score(_cast(c_case, torch.float64), "torch")
    rn, rm = ref_nm
    r_case = _cast(sliced(case, rn, rm), torch.float64)
    ref = reference_similarity(**{k: v for k, v in r_case.items()})
    rec["check_pairs"] = n * m
    rec["torch64_vs_reference"] = _err(S64[:rn, :rm], ref)
    rec["v2_vs_float64"] = _err(S_new, S64)
    v1, S_v1 = _v1_kernel(c_case, H, device)
    v1()
    rec["v1_vs_float64"] = _err(S_v1 + plant, S64)
    for key in ("torch64_vs_reference", "v2_vs_float64", "v1_vs_float64"):
        limit = 1e-9 if key == "torch64_vs_reference" else tol
        if not rec[key] <= limit:  # NaN fails too
            rec["failures"].append(f"contract: {key} = {rec[key]:.3e} > {limit:g}")
    log(f"[{variant} {dname}] |v2 - f64| {rec['v2_vs_float64']:.2e}  |v1 - f64| {rec['v1_vs_float64']:.2e}  "
        f"(contract {tol:g}, {n * m} pairs; torch f64 vs reference {rec['torch64_vs_reference']:.1e})")
    del S64, v1, S_v1

    # 3. the full grid, once
    flops = grid_flops(k_valid.tolist(), l_valid.tolist(), D, H, variant)
    rec["full_flops"] = flops
    predicted = v2_pp * pairs * 1.3 + 5.0
    if predicted > budget.left() - 20:
        msg = f"full grid skipped: predicted {predicted:.0f} s > {budget.left() - 20:.0f} s of budget left"
        (rec["notes"] if args.quick else rec["failures"]).append(msg)
        log(f"[{variant} {dname}] {msg}")
    else:
        vm, wm, wts, sc = _checked(case, H)
        st = ks.storage_dtype(dtype)
        meter = _energy_meter(device)
        sync(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out = torch.empty(N, M, device=device)
        if meter is not None:
            meter.start()
        holder = {}
        t_prep = time_once(lambda: holder.setdefault("plan", tiles.plan_tiles(
            case["V"], vm, case["W"], wm, heads=H, weights=wts, G=case.get("G"), st=st)), device)
        ge = case.get("global_emb")
        gi, gt = (None, None) if ge is None else (ge[0].float().contiguous(), ge[1].float().contiguous())
        launches = []
        t_kernel = time_once(lambda: tiles.launch_tiles(holder["plan"], out, scale=sc, u1=case["u1"], u2=case["u2"],
                                                   gi=gi, gt=gt, dot_prec=ks.dot_precision(st, False),
                                                   timings=launches), device)
        if meter is not None:
            rec["full_energy"] = meter.stop()
        if device.type == "cuda":
            rec["full_peak_bytes_beyond_inputs_and_S"] = int(torch.cuda.max_memory_allocated(device) - base - out.numel() * 4)
        rec["full_precompute_s"] = t_prep
        rec["full_kernel_s"] = t_kernel
        rec["full_per_bucket"] = _per_bucket(launches)  # beside the offline report's instructions per pair
        rec["full_end_to_end_s"] = t_prep + t_kernel
        rec["full_tflops"] = flops / rec["full_end_to_end_s"] / 1e12
        rec["full_kernel_tflops"] = flops / t_kernel / 1e12
        if ceiling_tflops:
            rec["full_fraction_of_bf16_ceiling"] = rec["full_tflops"] / ceiling_tflops
        rec["v2_autotuned"] = tiles.autotuned_configs()  # e.g. one or two passes over the heads
        if not bool(torch.isfinite(out).all()):
            rec["failures"].append("full grid: S has NaN/Inf or unwritten entries")
        # spot check of the full run against the check slice (same inputs, same code)
        rec["full_vs_check_slice"] = _err(out[:n, :m] + plant, S_new)
        if rec["full_vs_check_slice"] > tol:
            rec["failures"].append(f"full grid disagrees with the check slice: {rec['full_vs_check_slice']:.2e}")
        for k, v in rec["full_s_from_slices"].items():
            rec.setdefault("speedup_of_v2_full", {})[f"vs_{k}"] = v / rec["full_end_to_end_s"]
        del holder, out
        log(f"[{variant} {dname}] FULL {N}x{M}: {rec['full_end_to_end_s']:.2f} s end to end "
            f"(precompute {t_prep:.2f} s, kernels {t_kernel:.2f} s), {rec['full_tflops']:.0f} TFLOP/s useful"
            + (f", {rec['full_energy']['joules']:.0f} J" if "full_energy" in rec else ""))
        log(f"[{variant} {dname}] per bucket: " + ", ".join(
            f"{lb} tokens {b['pairs'] / 1e6:.1f} M pairs {b['kernel_s']:.2f} s ({b['kernel_ns_per_pair']:.1f} ns/pair)"
            for lb, b in rec["full_per_bucket"].items()))
    return rec


def _per_bucket(launches: list) -> dict:
    """launch_tiles' per-launch timings summed per text bucket: pairs, tile-kernel seconds,
    the pairwise global score's kernel after them (kernels/pair_global.py), and kernel
    nanoseconds per pair."""
    out = {}
    for t in launches:
        b = out.setdefault(str(t["LB"]), {"pairs": 0, "launches": 0, "kernel_s": 0.0, "global_s": 0.0})
        b["pairs"] += t["pairs"]
        b["launches"] += 1
        b["kernel_s"] += t["kernel_s"]
        b["global_s"] += t["global_s"]
    for b in out.values():
        b["kernel_ns_per_pair"] = b["kernel_s"] / max(b["pairs"], 1) * 1e9
    return out


def _energy_meter(device):
    if device.type != "cuda":
        return None
    try:
        from bench.device import EnergyMeter

        return EnergyMeter(device.index or 0)
    except Exception:  # no NVML: the record says so
        return None


# --------------------------------------------------------------------------- main


def main(args) -> int:
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check: --smoke needs TRITON_INTERPRET=1 before triton is imported; run the script directly",
              file=sys.stderr)
        return 2
    out_dir = Path(args.out or os.environ.get("OUT") or "gpu_out")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    dnames = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {v!r}; expected any of {tuple(VARIANTS)}")
    for d in dnames:
        if d not in DTYPES:
            raise ValueError(f"--dtypes: unknown dtype {d!r}; expected any of {tuple(DTYPES)}")
    # (N, M, K, l_max, D, H, check slice, reference slice, v2 slice, v1 slice, torch slice, eager slice, masked images)
    if args.smoke:
        device = torch.device("cpu")
        dnames = ["fp32"]  # bf16 arithmetic is wrong in the interpreter (PLATFORM_FACTS)
        shape = (6, 9, 5, 8, 32, 2, (6, 9), (2, 3), (3, 4), (2, 3), (3, 4), (2, 2), 2)
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; run with --smoke on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        N, M = (1000, 5000) if args.quick else (5000, 25000)
        shape = (N, M, 36, 32, 1024, 8, (40, 200), (2, 4), (500, 2500), (256, 1280), (128, 640), (8, 40), 10)
    budget = Budget(args.budget_s)
    record = {
        "script": "bench/gpu_check.py",
        "args": vars(args),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "flops_note": "spec §8 per-pair counts on valid rows (bench/flops.py), FLOPs = 2 x MACs",
        "results": [],
        "failures": [],
    }
    try:
        from bench.device import device_record

        record["device_record"] = device_record(device)
    except Exception as err:  # the record is a bonus; the check must not fail on it
        record["device_record"] = f"unavailable ({type(err).__name__}: {err})"
    path = out_dir / f"gpu_check{'-smoke' if args.smoke else ''}{'-quick' if args.quick else ''}.json"
    record["ceilings"] = ceilings(device)
    ceil = record["ceilings"].get("bf16_matmul_tflops")
    atomic_write_json(path, record)

    def log(msg):
        print(f"[{time.perf_counter() - budget.t0:6.1f}s] {msg}", flush=True)

    if not args.no_compile_ahead:
        record["compile_ahead"] = _compile_ahead(variants, dnames, shape, device, args, log)
        atomic_write_json(path, record)
    # bf16 first (the headline), then the re-ranker, then the slower fp32 path
    steps = [("case", v, "bf16") for v in variants if "bf16" in dnames]
    steps += [] if args.no_rerank else [("rerank", None, None)]
    steps += [("case", v, "fp32") for v in variants if "fp32" in dnames]
    for kind, v, d in steps:
        if kind == "rerank":
            _rerank(record, device, log, args)
            atomic_write_json(path, record)
            continue
        t0 = time.perf_counter()
        if budget.left() < 30:
            rec = {"variant": v, "dtype": d, "failures": [f"not run: {budget.left():.0f} s of budget left"]}
        else:
            try:
                rec = run_case(v, d, shape, device, args, budget, log, ceil)
            except Exception as err:  # keep what the other cases measured
                rec = {"variant": v, "dtype": d, "failures": [f"error: {type(err).__name__}: {err}"]}
                log(f"[{v} {d}] FAILED: {type(err).__name__}: {err}")
        rec["wall_s"] = time.perf_counter() - t0
        record["results"].append(rec)
        record["failures"] += [f"{v} {d}: {f}" for f in rec["failures"]]
        atomic_write_json(path, record)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    record["wall_s"] = time.perf_counter() - budget.t0
    record["ok"] = not record["failures"]
    atomic_write_json(path, record)
    _table(record, log)
    print(f"wrote {path}")
    return 0 if record["ok"] else 1


def _compile_ahead(variants, dnames, shape, device, args, log) -> dict:
    """Every tile kernel the cases will launch, built at once on all CPUs (tiles.compile_ahead)
    from a few images and texts per variant and dtype: sizes are not in the kernels' keys, so
    the cases' first calls then only load and autotune them (their ``v2_slice_first_s`` shows
    it). A failure here is a note, not a failure: the cases compile what they need anyway."""
    from acf_fast.kernels import tiles

    N, M, K, l_max, D, H = shape[:6]
    t0 = time.perf_counter()
    try:
        with tiles.compile_ahead() as ahead:
            for v in variants:
                for d in dnames:
                    case, _, _ = make_case(v, min(N, 8), min(M, 256), K=K, l_max=l_max, D=D, H=H, dtype=DTYPES[d],
                                           device=device, seed=args.seed, masked_images=2)
                    score(case, "triton")
        out = {"requests": len(ahead.requests), "builds": ahead.builds, "workers": ahead.workers,
               "compile_s": ahead.seconds, "wall_s": time.perf_counter() - t0}
        log(f"compile ahead: {ahead.builds} tile-kernel builds on {ahead.workers} threads in {ahead.seconds:.1f} s "
            f"({out['wall_s']:.1f} s in all)")
    except Exception as err:
        out = {"error": f"{type(err).__name__}: {err}", "wall_s": time.perf_counter() - t0}
        log(f"compile ahead FAILED (the cases compile at their first launch): {out['error']}")
    return out


def _rerank(record, device, log, args):
    try:
        from bench import rerank_gpu

        rec = record["rerank"] = rerank_gpu.run(device, log, smoke=args.smoke)
        if not rec.get("ok"):  # run() never raises: errors and failed checks are in the record
            errs = [str(e).splitlines()[0] if str(e) else repr(e) for e in rec.get("errors", [])] or ["ok is False"]
            record["failures"] += [f"rerank: {e}" for e in errs]
    except Exception as err:
        record["rerank"] = {"error": f"{type(err).__name__}: {err}"}
        record["failures"].append(f"rerank: {type(err).__name__}: {err}")
        log(f"[rerank] FAILED: {type(err).__name__}: {err}")


def _table(record, log):
    rows = ["variant   dtype  |v2-f64|   full e2e (s)  TFLOP/s  %ceil  v2 vs v1  vs torch  vs eager  joules"]
    for r in record["results"]:
        sp = r.get("speedup_of_v2_full", {})
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        rows.append(f"{r.get('variant', '?'):9s} {r.get('dtype', '?'):5s}  {fmt(r.get('v2_vs_float64'), '.1e'):8s}  "
                    f"{fmt(r.get('full_end_to_end_s'), '.2f'):>12s}  {fmt(r.get('full_tflops'), '.0f'):>7s}  "
                    f"{fmt(None if r.get('full_fraction_of_bf16_ceiling') is None else 100 * r['full_fraction_of_bf16_ceiling'], '.0f'):>5s}  "
                    f"{fmt(sp.get('vs_v1_kernel'), '.1f'):>8s}  {fmt(sp.get('vs_torch'), '.0f'):>8s}  "
                    f"{fmt(sp.get('vs_eager'), '.0f'):>8s}  {fmt(r.get('full_energy', {}).get('joules'), '.0f'):>6s}")
    for line in rows:
        log(line)
    for f in record["failures"]:
        log(f"FAILURE: {f}")


if __name__ == "__main__":
    sys.exit(main(parse_args()))
