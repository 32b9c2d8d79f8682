"""``acf-fast ablation``: the rows of the paper's Table 2 on the synthetic set, each
trained with several seeds and reported as mean ± standard deviation.

Rows: full model, w/o positives, w/o negatives, w/o both, w/o CMF (the paper
variant's global score made partner-free, spec §6 [choice]), triplet loss (VSE++ max
violation). Every (row, seed) is one ``acf-fast train ... --seed S --eval-test test``
command, printed and stored with its numbers, so each number can be reproduced by
running that command alone on the same data folder. A finished (row, seed) whose
stored config matches is reused, so an interrupted ablation resumes where it stopped.

The table says which orderings an ablation table claims (the full model above each
removal, contrastive above triplet) are separated here by more than three standard
deviations, which are within noise, and which are reversed. Results: markdown + JSON
under bench/results/, naming the machine, its load at the start and end, the date,
the seeds and the commands.
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import time
from pathlib import Path
from typing import Dict, List, Sequence

from ..machine import machine_record

ROWS = (
    ("full", []),
    ("w/o positives", ["--no-positives"]),
    ("w/o negatives", ["--no-negatives"]),
    ("w/o both", ["--no-positives", "--no-negatives"]),
    ("w/o CMF", ["--no-cmf"]),
    ("triplet loss", ["--loss", "triplet"]),
)
# (better row, worse row): the orderings an ablation table claims.
ORDERINGS = (
    ("full", "w/o positives"),
    ("full", "w/o negatives"),
    ("full", "w/o both"),
    ("w/o positives", "w/o both"),
    ("w/o negatives", "w/o both"),
    ("full", "w/o CMF"),
    ("full", "triplet loss"),
)
METRICS = (("i2t", "r1"), ("i2t", "r5"), ("i2t", "r10"), ("t2i", "r1"), ("t2i", "r5"), ("t2i", "r10"))
SEPARATION = 3.0  # a difference counts when it exceeds this many standard deviations
# CPU preset, sized on this project's 2-core machine: the encoding of the positives and
# shuffles grows with the training captions (every long (caption, partner) pair and its
# shuffle: 8 encodings per caption), the cells with epochs x train; the 500-image test
# costs ~40 s per cell. Two cells at a time took 8 min for 4 cells at load ~7, so the
# 18 cells take ~35 min there and about half that on a quiet machine.
CPU_SIZES = dict(train=300, dev=100, test=500, epochs=4)
GPU_SIZES = dict(train=20000, dev=1000, test=5000, epochs=10)
CPU_MODEL = dict(embed_dim=32, heads=2, batch_size=32)
GPU_MODEL = dict(embed_dim=1024, heads=8, batch_size=64)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(runs: List[dict]) -> Dict[str, dict]:
    """Per row: mean ± std over its seeds of rsum, each R@K and the train seconds."""
    out = {}
    for name, _ in ROWS:
        mine = [r for r in runs if r["row"] == name]
        if not mine:
            continue
        s = {"rsum": mean_std([r["test"]["rsum"] for r in mine]),
             "seconds": mean_std([r["seconds"] for r in mine]), "seeds": [r["seed"] for r in mine]}
        for d, k in METRICS:
            s[f"{d}_{k}"] = mean_std([r["test"][d][k] for r in mine])
        out[name] = s
    return out


def compare(summary: Dict[str, dict], runs: List[dict]) -> List[dict]:
    """Each claimed ordering (a above b in rsum): the difference of means, the larger of
    the two standard deviations, and a verdict: "reproduced" (difference > 3 std),
    "reversed" (< -3 std) or "not separated". Also the per-seed differences a - b
    (same seed: same initial weights of the shared layers and the same data order), and
    in how many seeds a is above b."""
    rsum = {(r["row"], r["seed"]): r["test"]["rsum"] for r in runs}
    out = []
    for a, b in ORDERINGS:
        if a not in summary or b not in summary:
            continue
        paired = [rsum[a, s] - rsum[b, s] for s in summary[a]["seeds"] if (b, s) in rsum]
        ra, rb = summary[a]["rsum"], summary[b]["rsum"]
        diff = ra["mean"] - rb["mean"]
        std = max(ra["std"], rb["std"])
        if std == 0.0:
            verdict = "one seed: no std"
        elif diff > SEPARATION * std:
            verdict = "reproduced"
        elif diff < -SEPARATION * std:
            verdict = "reversed"
        else:
            verdict = "not separated"
        out.append({"better": a, "worse": b, "diff": diff, "max_std": std,
                    "diff_over_std": diff / std if std else None, "verdict": verdict,
                    "per_seed": mean_std(paired) if paired else None, "seeds_above": sum(d > 0 for d in paired),
                    "seeds_compared": len(paired)})
    return out


def _pm(s: dict, digits: int = 1) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    sz = result["sizes"]
    load = result["load"]
    lines = [
        "# Ablation (the rows of the paper's Table 2) on the synthetic set, mean ± std over seeds",
        "",
        f"- machine: {m['node']} ({m['processor']}, {m['cpus']} CPUs" + (f", GPU {m['gpu']}" if m["gpu"] else "")
        + f"), torch {m['torch']}; started {result['date']}",
        f"- wall time {result['wall_seconds'] / 60:.1f} min (encoding {result['prepare_seconds'] / 60:.1f} min, "
        f"training + testing {result['runs_seconds'] / 60:.1f} min); load average (1 min) at start "
        f"{load['start'][0]:.2f}, at end {load['end'][0]:.2f} on {m['cpus']} CPUs",
        f"- data: synthetic (spec §7), data seed {result['data_seed']}, knobs {result['knobs']}: train {sz['train']} / "
        f"dev {sz['dev']} / test {sz['test']} images, 5 captions each; test = {sz['test']} images x "
        f"{5 * sz['test']} captions, protocol 'any' (all at once), no re-ranking, scored in "
        f"{result.get('precision', 'fp32')}; the best dev-rsum checkpoint is tested",
        f"- model and training: {result['common']}",
        f"- training seeds: {', '.join(map(str, result['seeds']))} (model init, data order, samples); "
        "each cell is mean ± sample std (n - 1) over them",
        "- w/o CMF: S_global = R(G, l2norm(mean of the valid w_j)), partner-free, the local score kept "
        "(spec §6 [choice]); the paper's exact reading of the row is not public",
        "",
        "| row | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | rsum | s per cell |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in result["summary"].items():
        cells = " | ".join(_pm(s[f"{d}_{k}"]) for d, k in METRICS)
        lines.append(f"| {name} | {cells} | {_pm(s['rsum'])} | {s['seconds']['mean']:.0f} |")
    lines += ["", f"Orderings an ablation table claims, tested on rsum (separated = the difference of means "
                  f"exceeds {SEPARATION:g} x the larger std):", "",
              "| claim | Δ rsum | larger std | Δ / std | here | Δ per seed (same seed) | seeds where it holds |",
              "|---|---:|---:|---:|---|---:|---:|"]
    for c in result["comparisons"]:
        ratio = "—" if c["diff_over_std"] is None else f"{c['diff_over_std']:.1f}"
        per_seed = "—" if c["per_seed"] is None else _pm(c["per_seed"])
        lines.append(f"| {c['better']} > {c['worse']} | {c['diff']:+.1f} | {c['max_std']:.1f} | {ratio} | "
                     f"{c['verdict']} | {per_seed} | {c['seeds_above']} / {c['seeds_compared']} |")
    lines += ["", "Per-seed rsum:", "", "| row | " + " | ".join(f"seed {s}" for s in result["seeds"]) + " |",
              "|---|" + "---:|" * len(result["seeds"])]
    for name, _ in ROWS:
        vals = {r["seed"]: r["test"]["rsum"] for r in result["runs"] if r["row"] == name}
        if vals:
            lines.append(f"| {name} | " + " | ".join(f"{vals[s]:.1f}" if s in vals else "—" for s in result["seeds"])
                         + " |")
    lines += ["", "Commands (each reproduces its cell; the data folder is made by the first lines):", "", "```"]
    lines += result["setup_commands"] + [r["command"] for r in result["runs"]]
    lines += ["```", ""]
    return "\n".join(lines)


def _finished(run_dir: Path, argv: List[str]):
    """The seconds a finished run of exactly this command took, or None (not run, other
    command, or no test metrics)."""
    try:
        done = json.loads((run_dir / "ablation_run.json").read_text())
    except (OSError, ValueError):
        return None
    if done.get("argv") != argv or not (run_dir / "test_metrics.json").is_file():
        return None
    return done.get("seconds")


def run_cells(cells: List[dict], jobs: int, threads: int, progress: bool) -> None:
    """Run every cell not finished before, ``jobs`` at a time, each ``acf-fast train`` in
    its own process with ``threads`` torch threads (output in ``<run>/ablation_log.txt``).

    [choice] One thread per process: at these sizes the ops are small, and two-thread
    regions on a shared 2-core machine stall whenever another process holds a core
    (a full step took 3 s with 2 threads and 0.75 s with 1 at load ~7)."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from ..atomic import atomic_write_json

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    todo = [c for c in cells if _finished(c["run_dir"], c["argv"]) is None]
    for c in cells:
        if c not in todo:
            print(f"{c['row']}, seed {c['seed']}: done before, reusing {c['run_dir']}")
    bar = tqdm(total=len(todo), desc="ablation cells", unit="run", disable=not progress)

    def one(c):
        c["run_dir"].mkdir(parents=True, exist_ok=True)
        t = time.time()
        with open(c["run_dir"] / "ablation_log.txt", "w", encoding="utf-8") as log:
            # --overwrite: a cell not finished before (interrupted, or another command) starts afresh
            argv = [sys.executable, "-m", "acf_fast"] + c["argv"] + ["--quiet", "--overwrite"]
            code = subprocess.call(argv, stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
        if code:
            raise RuntimeError(f"{c['row']}, seed {c['seed']} failed (exit {code}, see "
                               f"{c['run_dir'] / 'ablation_log.txt'}): {c['command']}")
        seconds = round(time.time() - t, 1)
        atomic_write_json(c["run_dir"] / "ablation_run.json", {"argv": c["argv"], "seconds": seconds})
        bar.write(f"{c['row']}, seed {c['seed']}: {seconds:.0f} s")
        bar.update(1)

    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for f in [pool.submit(one, c) for c in todo]:
                f.result()
    finally:
        bar.close()


def run(args) -> int:
    import torch

    from ..atomic import atomic_write_json, atomic_write_text
    from ..data import encode_split, write_synthetic
    from ..machine import resolve_device
    from ..scoring import check_precision
    from ..text_encoder import load_text_encoder
    from ..train.batches import TrainData
    from ..train.config import TrainConfig
    from .demo import CPU_KNOBS, GPU_KNOBS, _synth_up_to_date

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [0, 1, 2]
    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers, got {args.seeds!r}")
    names = [n for n, _ in ROWS]
    only = set(args.rows.split(",")) if args.rows else None
    if only and not only <= {_slug(n) for n in names}:
        raise ValueError(f"--rows: unknown {sorted(only - {_slug(n) for n in names})}; "
                         f"choose from {','.join(_slug(n) for n in names)}")
    if args.jobs < 1 or args.threads < 1:
        raise ValueError(f"--jobs and --threads must be >= 1, got {args.jobs} and {args.threads}")
    if args.variant != "paper" and (only is None or "w-o-cmf" in only):
        raise ValueError("--variant acf-code has no cross-modal fusion, so the w/o CMF row is undefined: "
                         "use --variant paper or leave w-o-cmf out of --rows")
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    gpu = device.type == "cuda"
    torch.set_num_threads(args.threads)  # the encoding here, as in each cell (see run_cells)
    preset = dict(GPU_SIZES if gpu else CPU_SIZES)
    for k in ("train", "dev", "test"):
        if getattr(args, f"{k}_images") is not None:
            preset[k] = getattr(args, f"{k}_images")
    if args.epochs is not None:
        preset["epochs"] = args.epochs
    for k, v in (GPU_MODEL if gpu else CPU_MODEL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    knobs = dict(GPU_KNOBS if gpu else CPU_KNOBS)
    sizes = {k: preset[k] for k in ("train", "dev", "test")}
    work = Path(args.work)
    data = work / "data"
    t_start, load_start = time.time(), os.getloadavg()
    date = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"ablation: {len(seeds)} seeds x {len(only or names)} rows; load average {load_start[0]:.2f} "
          f"on {os.cpu_count()} CPUs")
    enc_arg = [] if args.encoder is None else ["--encoder", args.encoder]
    knob_args = " ".join(f"--knob {shlex.quote(f'{k}={v}')}" for k, v in knobs.items())
    setup = [
        f"acf-fast data synth --out {data} --seed {args.seed} --train {sizes['train']} --dev {sizes['dev']} "
        f"--test {sizes['test']} {knob_args}".rstrip(),
        f"acf-fast data encode {data} --split train --split dev --split test" + "".join(f" {a}" for a in enc_arg),
    ]
    if not _synth_up_to_date(data, args.seed, sizes, knobs):
        write_synthetic(data, seed=args.seed, splits=("train", "dev", "test"), sizes=sizes, **knobs)
    encoder = {}

    def get_encoder():
        if "e" not in encoder:
            encoder["e"] = load_text_encoder(args.encoder, device=device)
        return encoder["e"]

    for split in ("train", "dev", "test"):
        encode_split(data, split, get_encoder(), progress=not args.quiet)
    # The positives and shuffled texts, encoded once for every row and seed.
    TrainData(TrainConfig(data=str(data), out=str(work), encoder=args.encoder, batch_size=args.batch_size,
                          progress=not args.quiet), get_encoder, print)
    prepare_seconds = time.time() - t_start
    common = ["--epochs", str(preset["epochs"]), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--schedule", args.schedule, "--variant", args.variant, "--embed-dim", str(args.embed_dim),
              "--heads", str(args.heads), "--dev-images", str(preset["dev"]), "--device", args.device,
              "--backend", args.backend, "--precision", args.precision] + enc_arg
    for name in ("u1", "u2"):
        if getattr(args, name) is not None:
            common += [f"--{name}", str(getattr(args, name))]
    cells = []
    for seed in seeds:
        for name, switches in ROWS:
            if only and _slug(name) not in only:
                continue
            run_dir = work / f"{_slug(name)}-s{seed}"
            argv = (["train", "--data", str(data), "--out", str(run_dir)] + common + ["--seed", str(seed)] + switches
                    + ["--eval-test", "test"])
            cells.append({"row": name, "seed": seed, "switches": switches, "run_dir": run_dir, "argv": argv,
                          "command": "acf-fast " + " ".join(shlex.quote(a) for a in argv)})
    t_runs = time.time()
    run_cells(cells, jobs=args.jobs, threads=args.threads, progress=not args.quiet)
    runs = [{"row": c["row"], "seed": c["seed"], "switches": c["switches"], "command": c["command"],
             "test": json.loads((c["run_dir"] / "test_metrics.json").read_text()),
             "seconds": _finished(c["run_dir"], c["argv"])} for c in cells]
    summary = summarise(runs)
    result = {"date": date, "machine": machine_record(device), "data_seed": args.seed, "seeds": seeds,
              "sizes": sizes, "epochs": preset["epochs"], "knobs": knobs, "precision": args.precision,
              "common": f"{args.variant} D={args.embed_dim} H={args.heads}, {preset['epochs']} epochs, batch "
                        f"{args.batch_size}, lr {args.lr} ({args.schedule} schedule), frozen "
                        f"{'MiniLM' if args.encoder is None else args.encoder}, backend {args.backend}; "
                        f"{args.jobs} cells at a time, {args.threads} torch thread(s) each",
              "setup_commands": setup, "runs": runs, "summary": summary, "comparisons": compare(summary, runs),
              "prepare_seconds": round(prepare_seconds, 1), "runs_seconds": round(time.time() - t_runs, 1),
              "wall_seconds": round(time.time() - t_start, 1),
              "load": {"start": list(load_start), "end": list(os.getloadavg()), "cpus": os.cpu_count()}}
    out = Path(args.results)
    stem = f"ablation-{_slug(result['machine']['node'])}-{time.strftime('%Y%m%d')}"
    atomic_write_json(out / f"{stem}.json", result, indent=1)
    md = markdown(result)
    atomic_write_text(out / f"{stem}.md", md)
    print("\n" + md)
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}")
    return 0


def register(subparsers) -> None:
    from .train import add_model_args, add_score_weight_args

    p = subparsers.add_parser(
        "ablation", help="Table 2 ablation rows on the synthetic set, mean ± std over seeds -> bench/results/",
        description="Train and test the rows of the paper's Table 2 (full, w/o positives, w/o negatives, w/o "
                    "both, w/o CMF, triplet) on the synthetic set, each with several training seeds, and write a "
                    "markdown table (mean ± std) and JSON naming the machine, its load and the seeds. Each cell's "
                    "command is printed and stored; a finished cell is reused when rerun. --seed is the synthetic "
                    "data set's seed, --seeds the training seeds.",
    )
    p.add_argument("--work", default="ablation_out", help="folder for the data and the runs")
    p.add_argument("--results", default="bench/results", help="where the markdown and JSON go")
    p.add_argument("--rows", default=None,
                   help="comma-separated subset of rows: " + ",".join(_slug(n) for n, _ in ROWS))
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (default 0,1,2)")
    p.add_argument("--train-images", type=int, default=None, help=f"training images (CPU {CPU_SIZES['train']})")
    p.add_argument("--dev-images", type=int, default=None, help=f"dev images (CPU {CPU_SIZES['dev']})")
    p.add_argument("--test-images", type=int, default=None, help=f"test images (CPU {CPU_SIZES['test']})")
    p.add_argument("--encoder", default=None, help="local BERT folder (default: the bundled MiniLM)")
    p.add_argument("--jobs", type=int, default=2, help="cells trained at once, each its own process (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(p)
    add_score_weight_args(p)
    p.set_defaults(epochs=None, embed_dim=None, heads=None, batch_size=None, func=run)
