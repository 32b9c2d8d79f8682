"""``acf-fast ablation``: the shape of the paper's Table 2 on the synthetic set.

Rows: full model, w/o positives, w/o negatives, w/o both, w/o CMF (global score
only, u2 = 0), triplet loss (VSE++ max violation). Every row is one
``acf-fast train ... --eval-test test`` command, printed and stored with its
numbers, so each number can be reproduced by running that command alone (same
data folder, same seed). Results: markdown + JSON under bench/results/, naming
the machine (node, processor, CPU count, GPU) and the date.
"""
from __future__ import annotations

import json
import platform
import shlex
import time
from pathlib import Path

from ..machine import machine_record

ROWS = (
    ("full", []),
    ("w/o positives", ["--no-positives"]),
    ("w/o negatives", ["--no-negatives"]),
    ("w/o both", ["--no-positives", "--no-negatives"]),
    ("w/o CMF", ["--no-cmf"]),
    ("triplet loss", ["--loss", "triplet"]),
)
CPU_SIZES = dict(train=1000, dev=100, test=500, epochs=2)
GPU_SIZES = dict(train=20000, dev=1000, test=5000, epochs=10)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Ablation (shape of the paper's Table 2) on the synthetic set",
        "",
        f"- machine: {m['node']} ({m['processor']}, {m['cpus']} CPUs" + (f", GPU {m['gpu']}" if m["gpu"] else "")
        + f"), torch {m['torch']}; date {result['date']}",
        f"- data: synthetic (spec §7), seed {result['seed']}: train {result['sizes']['train']} / dev "
        f"{result['sizes']['dev']} / test {result['sizes']['test']} images, 5 captions each; "
        f"test = {result['sizes']['test']} images x {5 * result['sizes']['test']} captions, no re-ranking, "
        f"scored in {result['precision']}",
        f"- model: {result['common']}",
        "",
        "| row | I2T R@1 | R@5 | R@10 | T2I R@1 | R@5 | R@10 | rsum | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        t = r["test"]
        lines.append(f"| {r['name']} | {t['i2t']['r1']:.1f} | {t['i2t']['r5']:.1f} | {t['i2t']['r10']:.1f} | "
                     f"{t['t2i']['r1']:.1f} | {t['t2i']['r5']:.1f} | {t['t2i']['r10']:.1f} | {t['rsum']:.1f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "Commands (each reproduces its row; the data folder is made by the first lines):", "", "```"]
    lines += result["setup_commands"]
    lines += [r["command"] for r in result["rows"]]
    lines += ["```", ""]
    return "\n".join(lines)


def run(args) -> int:
    from ..atomic import atomic_write_json, atomic_write_text
    from ..data import encode_split, write_synthetic
    from ..machine import resolve_device
    from ..scoring import check_precision
    from .demo import _synth_up_to_date
    from .train import main_train

    device = resolve_device(args.device)
    check_precision(args.precision, device)
    preset = dict(GPU_SIZES if device.type == "cuda" else CPU_SIZES)
    for k in ("train", "dev", "test"):
        if getattr(args, f"{k}_images") is not None:
            preset[k] = getattr(args, f"{k}_images")
    if args.epochs is not None:
        preset["epochs"] = args.epochs
    sizes = {k: preset[k] for k in ("train", "dev", "test")}
    work = Path(args.work)
    data = work / "data"
    setup = [
        f"acf-fast data synth --out {data} --seed {args.seed} --train {sizes['train']} --dev {sizes['dev']} "
        f"--test {sizes['test']}",
        f"acf-fast data encode {data} --split train --split dev --split test",
    ]
    if not _synth_up_to_date(data, args.seed, sizes, {}):
        write_synthetic(data, seed=args.seed, splits=("train", "dev", "test"), sizes=sizes)
    for split in ("train", "dev", "test"):
        encode_split(data, split)
    common = ["--epochs", str(preset["epochs"]), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
              "--variant", args.variant, "--embed-dim", str(args.embed_dim), "--heads", str(args.heads),
              "--seed", str(args.seed), "--dev-images", str(preset["dev"]), "--device", args.device,
              "--backend", args.backend, "--precision", args.precision]
    rows = []
    only = set(args.rows.split(",")) if args.rows else None
    for name, switches in ROWS:
        slug = _slug(name)
        if only and slug not in only:
            continue
        argv = ["train", "--data", str(data), "--out", str(work / slug)] + common + switches + ["--eval-test", "test"]
        if args.quiet:
            argv.append("--quiet")
        cmd = "acf-fast " + " ".join(shlex.quote(a) for a in argv if a != "--quiet")
        print(f"\n=== {name}: {cmd}")
        t = time.time()
        code = main_train(argv)
        if code:
            raise RuntimeError(f"row {name!r} failed (exit {code}): {cmd}")
        metrics = json.loads((work / slug / "test_metrics.json").read_text())
        rows.append({"name": name, "switches": switches, "command": cmd, "test": metrics,
                     "seconds": round(time.time() - t, 1)})
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_record(device), "seed": args.seed,
              "sizes": sizes, "epochs": preset["epochs"], "precision": args.precision,
              "common": f"{args.variant} D={args.embed_dim} H={args.heads}, {preset['epochs']} epochs, batch "
                        f"{args.batch_size}, lr {args.lr}, frozen MiniLM",
              "setup_commands": setup, "rows": rows}
    out = Path(args.results)
    stem = f"ablation-{_slug(platform.node())}-{time.strftime('%Y%m%d')}"
    atomic_write_json(out / f"{stem}.json", result, indent=1)
    md = _markdown(result)
    atomic_write_text(out / f"{stem}.md", md)
    print("\n" + md)
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}")
    return 0


def register(subparsers) -> None:
    from .train import add_model_args

    p = subparsers.add_parser(
        "ablation", help="Table 2 ablation rows on the synthetic set -> bench/results/ablation-*.md/json",
        description="Train and test the rows of the paper's Table 2 (full, w/o positives, w/o negatives, w/o "
                    "both, w/o CMF, triplet) on the synthetic set with one setting, and write a markdown table "
                    "and JSON naming the machine. Each row's command is printed and stored.",
    )
    p.add_argument("--work", default="ablation_out", help="folder for the data and the runs")
    p.add_argument("--results", default="bench/results", help="where the markdown and JSON go")
    p.add_argument("--rows", default=None,
                   help="comma-separated subset of rows: " + ",".join(_slug(n) for n, _ in ROWS))
    p.add_argument("--train-images", type=int, default=None, help=f"training images (CPU {CPU_SIZES['train']})")
    p.add_argument("--dev-images", type=int, default=None, help=f"dev images (CPU {CPU_SIZES['dev']})")
    p.add_argument("--test-images", type=int, default=None, help=f"test images (CPU {CPU_SIZES['test']})")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_args(p)
    p.set_defaults(epochs=None, embed_dim=256, heads=4, func=run)
