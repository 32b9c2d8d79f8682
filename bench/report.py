"""The benchmark report: one size sweep of every case, written as JSON, markdown and PNGs.

    acf-fast bench [--quick] [--cases ...] [--out bench/results]    (= python -m bench)

Writes ``<out>/<device>-<date>[-quick].json`` (atomically), the markdown table
``<same stem>.md`` and plots ``<same stem>-time.png``, ``-speedup.png``, ``-tflops.png``.
Derived figures (speed-ups, fraction of the ceiling) are computed here and stored in
the JSON, so the markdown and the README only ever format numbers a results file holds.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from acf_fast.atomic import atomic_write_text
from acf_fast.machine import resolve_device

from . import cases
from .compile_worker import compile_rows
from .device import device_record

RESULTS_DIR = Path(__file__).resolve().parent / "results"
OMP_NOTE = ("OMP_WAIT_POLICY=PASSIVE is set by the harness (unless already set) before torch loads: on this "
            "project's shared 2-core CPU, spinning OpenMP threads made op-heavy calls up to 70x slower "
            "(eager acf-code at 10 x 50: 14.8 s spinning vs 0.27 s passive, same machine, same minute).")
SCHEMA = 1
ALL_CASES = ("similarity", "rerank", "metrics", "train", "energy")

# Sizes per device. CPU sizes are scaled so the default run takes minutes on 2 cores;
# the GPU sweep ends at the full COCO 5K × 25K grid.
PROFILES = {
    "cpu": {
        "similarity": [(10, 50), (20, 100), (50, 250), (100, 500)],
        "rerank": [(1000, 5000)], "metrics": [(1000, 5000), (5000, 25000)],
        "train_batch": 8, "repeats": 3, "budget_s": 6.0, "ceiling_quick": False, "compile_budget_s": 240.0,
        "dtype": "float32", "total_budget_s": 840.0,
    },
    "cpu-quick": {
        "similarity": [(4, 20), (8, 40)],
        "rerank": [(200, 1000)], "metrics": [(200, 1000)],
        "train_batch": 2, "repeats": 2, "budget_s": 1.0, "ceiling_quick": True, "compile_budget_s": 45.0,
        "dtype": "float32", "total_budget_s": 100.0,
    },
    "cuda": {
        "similarity": [(100, 500), (500, 2500), (1000, 5000), (2000, 10000), (5000, 25000)],
        "rerank": [(1000, 5000), (5000, 25000)], "metrics": [(1000, 5000), (5000, 25000)],
        "train_batch": 64, "repeats": 3, "budget_s": 6.0, "ceiling_quick": False, "compile_budget_s": 300.0,
        "dtype": "bfloat16", "total_budget_s": 540.0,
    },
    "cuda-quick": {
        "similarity": [(100, 500), (1000, 5000)],
        "rerank": [(1000, 5000)], "metrics": [(1000, 5000)],
        "train_batch": 16, "repeats": 2, "budget_s": 2.0, "ceiling_quick": True, "compile_budget_s": 120.0,
        "dtype": "bfloat16", "total_budget_s": 200.0,
    },
}


def jsonable(x):
    """NaN/Inf -> None (JSON has no NaN), tuples -> lists, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


def annotate(results: dict) -> dict:
    """Add the derived figures to the rows, in place; returns ``results``.

    similarity rows: ``frac_ceiling`` (achieved TFLOP/s over the run's primary
    ceiling), ``speedup_vs_eager`` and ``speedup_vs_torch`` (time ratios at the same
    variant, dtype and size, where both times exist). rerank / metrics rows:
    ``speedup_vs_numpy``. train rows: ``speedup_vs_eager``.
    """
    ceiling = cases.primary_ceiling(results.get("ceiling", []))
    top = ceiling.get("tflops") if ceiling else None
    sim = results.get("similarity", [])
    times = {}
    for r in sim:
        if r.get("median_s"):
            times[(r["variant"], r.get("dtype"), r["N"], r["M"], r["backend"])] = r["median_s"]
    for r in sim:
        t = r.get("median_s")
        if not t:
            continue
        if top and r.get("tflops") is not None and math.isfinite(r["tflops"]):
            r["frac_ceiling"] = r["tflops"] / top
        key = (r["variant"], r.get("dtype"), r["N"], r["M"])
        for base in ("eager", "torch"):
            tb = times.get(key + (base,))
            if tb and r["backend"] != base:
                r[f"speedup_vs_{base}"] = tb / t
    for name, base_backend, field in (("rerank", "numpy loop", "speedup_vs_numpy"), ("metrics", "numpy loop", "speedup_vs_numpy"),
                                      ("train", "eager", "speedup_vs_eager")):
        rows = results.get(name, [])
        ident = ("direction", "N", "M", "variant", "batch")
        for r in rows:
            if not r.get("median_s") or r["backend"] == base_backend:
                continue
            for b in rows:
                if b["backend"] == base_backend and b.get("median_s") and all(b.get(k) == r.get(k) for k in ident):
                    r[field] = b["median_s"] / r["median_s"]
    return results


def results_stem(record: dict, quick: bool) -> str:
    return f"{record['label']}-{record['date'][:10]}" + ("-quick" if quick else "")


def run_report(*, device: Optional[str] = None, quick: bool = False, case_names: Sequence[str] = ALL_CASES,
               variants: Sequence[str] = ("paper", "acf-code"), out_dir: Path = RESULTS_DIR, plots: bool = True,
               progress: bool = True, similarity_sizes: Optional[Sequence[tuple]] = None, log=print) -> Path:
    """Run the sweep and write the JSON, markdown and PNGs; returns the JSON path."""
    dev = resolve_device(device)
    unknown = set(case_names) - set(ALL_CASES)
    if unknown:
        raise ValueError(f"--cases: unknown {sorted(unknown)}; expected any of {', '.join(ALL_CASES)}")
    prof = dict(PROFILES[dev.type + ("-quick" if quick else "")])
    if similarity_sizes:
        prof["similarity"] = list(similarity_sizes)
    record = device_record(dev)
    t_start = time.perf_counter()
    log(f"acf-fast bench on {record['name']} ({dev.type}, {record['torch_threads']} threads){' [quick]' if quick else ''}")
    # Timings on a shared machine are only as good as its load: say what it was.
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = {"schema": SCHEMA, "created": record["date"], "quick": quick, "device": record,
               "profile": {k: v for k, v in prof.items()}, "variants": list(variants), "notes": []}
    results["ceiling"] = cases.ceiling_case(dev, quick=prof["ceiling_quick"])
    c = cases.primary_ceiling(results["ceiling"])
    log(f"  ceiling: {c['what']}: {c['tflops']:.3f} TFLOP/s")
    common = dict(repeats=prof["repeats"], budget_s=prof["budget_s"], progress=progress)
    # The whole report keeps to ``total_budget_s``: each case gets a deadline (a share of
    # the budget, cumulative); past it, its remaining sizes are listed as skipped.
    total = prof["total_budget_s"]

    def by(share):
        return t_start + share * total

    if "similarity" in case_names:
        dtype = getattr(torch, prof["dtype"])
        compiled = None
        if "torch.compile" in cases.SIMILARITY_BACKENDS:
            # First, so its budget is not eaten by the other columns (see bench.compile_worker).
            compiled = compile_rows(sorted(prof["similarity"], key=lambda t: t[0] * t[1]), variants, dev,
                                    budget_total_s=min(prof["compile_budget_s"], 0.28 * total),
                                    cap=cases.default_caps(dev)["torch.compile"], repeats=prof["repeats"],
                                    budget_s=prof["budget_s"], dtype=dtype, log=log)
        results["similarity"] = cases.similarity_case(prof["similarity"], variants, dev, dtype=dtype, deadline=by(0.62),
                                                      compiled_rows=compiled, **common)
    if "rerank" in case_names:
        results["rerank"] = cases.rerank_case(prof["rerank"], dev, deadline=by(0.72), **common)
    if "metrics" in case_names:
        results["metrics"] = cases.metrics_case(prof["metrics"], dev, deadline=by(0.80), **common)
    if "train" in case_names:
        results["train"] = cases.train_step_case(dev, batch=prof["train_batch"], variants=variants, deadline=by(0.95),
                                                 repeats=prof["repeats"], budget_s=2 * prof["budget_s"], progress=progress)
    if "energy" in case_names:
        if dev.type == "cuda" and not quick:
            results["energy"] = cases.energy_case(dev, dtype=getattr(torch, prof["dtype"]))
        else:
            results["notes"].append("energy per COCO-5K evaluation: not measured (needs an NVIDIA GPU and a full run)")
    results["env"] = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if dev.type != "cuda" and os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        results["notes"].append(OMP_NOTE)
    if dev.type != "cuda":
        results["notes"].append("GPU figures (Triton backend, full COCO 5K x 25K grid, joules per evaluation) "
                                "are not in this file: it was measured without a GPU")
    results["wall_s"] = time.perf_counter() - t_start
    results["load_average"] = {"start": load_start, "end": os.getloadavg() if hasattr(os, "getloadavg") else None,
                               "cpus": os.cpu_count()}
    annotate(results)
    results = jsonable(results)
    stem = results_stem(record, quick)
    out_dir = Path(out_dir)
    json_path = out_dir / f"{stem}.json"
    atomic_write_text(json_path, json.dumps(results, indent=1, sort_keys=False) + "\n")
    from .markdown import render

    if plots:
        from .plots import write_plots

        results["plots"] = [p.name for p in write_plots(results, out_dir, stem)]
        atomic_write_text(json_path, json.dumps(results, indent=1) + "\n")
    atomic_write_text(out_dir / f"{stem}.md", render(results))
    log(f"  wrote {json_path} (+ .md{', plots' if plots else ''}) in {results['wall_s']:.0f} s")
    return json_path


def load_results(path: Path) -> dict:
    """Read a results JSON written by :func:`run_report`; ValueError if it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable results JSON ({err})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or "device" not in data:
        raise ValueError(f"{path}: not an acf-fast bench results file (schema {SCHEMA} with a device record expected)")
    return data
