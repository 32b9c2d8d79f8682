"""``acf-fast bench``: the benchmark report (issue 6); also ``python -m bench``.

The harness lives in the top-level ``bench/`` folder of the source tree (it is not
installed with the package); this command loads it from there, so it works from a
checkout (editable install or ``PYTHONPATH=.``) and says so clearly elsewhere.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path


def load_bench_package():
    """Import the source tree's ``bench`` package (without putting the repo root on sys.path)."""
    if "bench" in sys.modules and hasattr(sys.modules["bench"], "__path__"):
        return sys.modules["bench"]
    folder = Path(__file__).resolve().parents[2] / "bench"
    init = folder / "__init__.py"
    if not init.exists():
        raise ValueError(f"acf-fast bench needs the source checkout: {init} was not found "
                         "(run it from a clone, installed with `pip install -e .` or with PYTHONPATH=.)")
    spec = importlib.util.spec_from_file_location("bench", init, submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    return module


def _sizes(text: str):
    out = []
    for part in text.split(","):
        try:
            n, m = part.lower().split("x")
            out.append((int(n), int(m)))
        except ValueError:
            raise ValueError(f"--sizes: expected a comma-separated list like 10x50,100x500, got {part!r}") from None
        if out[-1][0] < 1 or out[-1][1] < 1:
            raise ValueError(f"--sizes: sizes must be positive, got {part!r}")
    return out


def _run(args) -> int:
    if "OMP_WAIT_POLICY" not in os.environ and len(sys.argv) > 1 and sys.argv[1] == "bench":
        # torch (and its OpenMP) is already loaded here, too late to pick the wait policy:
        # rerun as ``python -m bench``, which sets OMP_WAIT_POLICY=PASSIVE first (bench.report.OMP_NOTE).
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return subprocess.call([sys.executable, "-m", "bench", *sys.argv[2:]], env=env, cwd=os.getcwd())
    load_bench_package()
    if args.readme is not None:
        from bench.readme import update_readme

        path = update_readme(Path(args.readme), results_dir=Path(args.out) if args.out else None)
        print(f"updated the Performance block of {path}")
        return 0
    from bench.report import ALL_CASES, RESULTS_DIR, run_report

    cases = ALL_CASES if args.cases is None else tuple(c.strip() for c in args.cases.split(",") if c.strip())
    variants = tuple(v.strip() for v in args.variants.split(","))
    from acf_fast import VARIANTS

    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"--variants: unknown {bad}; expected any of {', '.join(VARIANTS)}")
    run_report(device=args.device, quick=args.quick, case_names=cases, variants=variants,
               out_dir=Path(args.out) if args.out else RESULTS_DIR, plots=not args.no_plots,
               progress=not args.no_progress, similarity_sizes=_sizes(args.sizes) if args.sizes else None)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run the benchmark report (similarity backends, re-ranker, metrics, training step)",
        description="Time every case side by side on this machine and write bench/results/<device>-<date>.json, "
                    "a markdown table and PNG plots. Default CPU run: minutes; --quick: under two minutes.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: a sanity run under two minutes")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--cases", default=None,
                   help="comma-separated subset of similarity,rerank,metrics,train,energy (default: all)")
    p.add_argument("--variants", default="paper,acf-code", help="comma-separated variants (default: paper,acf-code)")
    p.add_argument("--sizes", default=None, help="similarity sizes as NxM,NxM (default: the device's sweep)")
    p.add_argument("--out", default=None, help="results folder (default: bench/results)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--readme", nargs="?", const="README.md", default=None, metavar="PATH",
                   help="instead of benchmarking, rewrite the Performance block of PATH (default README.md) "
                        "from the newest results file")
    p.set_defaults(func=_run)
