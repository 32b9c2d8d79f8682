"""``acf-fast demo``: the main job end to end on the embedded synthetic set.

1. synthesise the set (spec §7) in the SCAN layout (skipped when already there),
2. encode its captions with MiniLM (cached),
3. score the test split with an UNTRAINED model (the chance baseline),
4. train from scratch (spec §6 objective, frozen encoder, cached features),
5. score the test split with the best checkpoint,
6. evaluate both with and without ACF-R+ re-ranking (neighbour modes
   ``embedding`` and ``profile`` are honest; ``siblings`` reads the labels and is
   reported as an oracle), print the table, write results.json and results.png.

CPU preset: 1,000 test images × 5,000 captions, 500 training images, a small
model (D = 128, H = 2), 1 epoch, K = 16 regions per image (see CPU_KNOBS). With
a GPU the test split is COCO-5K-sized (5,000 × 25,000), K = 36, D = 1024, H = 8,
and the training set larger.
"""
from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

from ..machine import machine_record

# CPU / GPU presets: (train images, dev images, test images, epochs) and model.
CPU_SIZES = dict(train=500, dev=100, test=1000, epochs=1)
GPU_SIZES = dict(train=20000, dev=1000, test=5000, epochs=10)
CPU_MODEL = dict(embed_dim=128, heads=2)
GPU_MODEL = dict(embed_dim=1024, heads=8)
# Synthetic-set knobs (SynthConfig). [departure] On the CPU the demo set has K = 16
# regions per image instead of spec §7's 36: the torch backend's per-pair work grows
# with H·K·L (softmaxes, norms) and K(HL)² + L(HK)², and scoring the 1K test twice
# (untrained, trained) at K = 36 alone overruns the 10-minute budget on 2 cores.
# The GPU demo keeps 36.
CPU_KNOBS = dict(regions=16, objects_per_image=(2, 4), regions_per_object=(2, 3), min_valid_regions=10)
GPU_KNOBS: dict = {}


def _synth_up_to_date(folder: Path, seed: int, sizes: dict, knobs: dict) -> bool:
    meta = folder / "synthetic.json"
    if not meta.is_file():
        return False
    try:
        m = json.loads(meta.read_text())
    except ValueError:
        return False
    if m.get("seed") != seed or m.get("sizes") != sizes:
        return False
    cfg = m.get("config", {})
    if any(cfg.get(k) != (list(v) if isinstance(v, tuple) else v) for k, v in knobs.items()):
        return False
    return all((folder / f"{s}_{f}").is_file() for s in sizes for f in ("ims.npy", "caps.txt"))


def _table(rows) -> str:
    w = max([10] + [len(r["model"]) for r in rows])
    head = f"{'model':<{w}} {'re-ranking':<40} {'I2T R@1':>8} {'R@5':>6} {'R@10':>6} {'T2I R@1':>8} {'R@5':>6} {'R@10':>6} {'rsum':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        m = r["metrics"]
        lines.append(f"{r['model']:<{w}} {r['rerank']:<40} {m['i2t']['r1']:8.1f} {m['i2t']['r5']:6.1f} "
                     f"{m['i2t']['r10']:6.1f} {m['t2i']['r1']:8.1f} {m['t2i']['r5']:6.1f} {m['t2i']['r10']:6.1f} "
                     f"{m['rsum']:7.1f}")
    return "\n".join(lines)


def evaluate_all(S, txt2img, text_vectors, protocol: str, label: str, **rerank_opts) -> list:
    """Plain and re-ranked metrics of one S: a list of table rows. ``rerank_opts``:
    k_i2t, k_t2i, kprime, n of ``evaluate_protocol`` (its defaults otherwise)."""
    from ..evaluate import evaluate_protocol

    rows = []
    plain = evaluate_protocol(S, protocol, txt2img)
    rows.append({"model": label, "rerank": "none", "metrics": plain["plain"]})
    for mode, tag in (("embedding", "honest"), ("profile", "honest"), ("siblings", "ORACLE: reads labels")):
        res = evaluate_protocol(S, protocol, txt2img, rerank=True, neighbors=mode, text_vectors=text_vectors,
                                **rerank_opts)
        rows.append({"model": label, "rerank": f"ACF-R+ {mode} ({tag})", "metrics": res["reranked"],
                     "settings": res["rerank"]})
    return rows


def _plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..atomic import atomic_write

    keys = [("i2t", "r1"), ("i2t", "r5"), ("i2t", "r10"), ("t2i", "r1"), ("t2i", "r5"), ("t2i", "r10")]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(rows)
    x = np.arange(len(keys))
    for i, r in enumerate(rows):
        vals = [r["metrics"][d][k] for d, k in keys]
        hatch = "//" if "ORACLE" in r["rerank"] else None
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, label=f"{r['model']}, {r['rerank']}", hatch=hatch)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{d.upper()} R@{k[1:]}" for d, k in keys])
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.set_title("\n".join(textwrap.wrap(title, 150)), fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def run(args) -> int:
    import torch

    from ..data import encode_split, load_encoded, load_split, write_synthetic
    from ..machine import resolve_device
    from ..scoring import check_precision, score_split
    from ..text_encoder import load_text_encoder
    from ..train.config import TrainConfig
    from ..train.trainer import build_model, train

    t_start = time.time()
    timings = {}
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    gpu = device.type == "cuda"
    preset = dict(GPU_SIZES if gpu else CPU_SIZES)
    knobs = dict(GPU_KNOBS if gpu else CPU_KNOBS)
    for k, v in (GPU_MODEL if gpu else CPU_MODEL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("train", "dev", "test", "epochs"):
        v = getattr(args, f"{k}_images" if k != "epochs" else "epochs")
        if v is not None:
            preset[k] = v
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    sizes = {"train": preset["train"], "dev": preset["dev"], "test": preset["test"]}
    print(f"acf-fast demo on {'GPU ' + torch.cuda.get_device_name(device) if gpu else 'CPU'}: "
          f"synthetic set train {sizes['train']} / dev {sizes['dev']} / test {sizes['test']} images "
          f"(5 captions each), model {args.variant} D={args.embed_dim} H={args.heads}, {preset['epochs']} epochs, "
          f"batch {args.batch_size}, scored in {args.precision}")

    t = time.time()
    if _synth_up_to_date(data, args.seed, sizes, knobs):
        print(f"[1/5] synthetic set in {data} is up to date")
    else:
        print(f"[1/5] synthesising the embedded set into {data}")
        write_synthetic(data, seed=args.seed, splits=("train", "dev", "test"), sizes=sizes, **knobs)
    timings["synthesise"] = time.time() - t

    t = time.time()
    print("[2/5] encoding captions with MiniLM (cached)")
    encoder = load_text_encoder(args.encoder, device=device)
    for split in ("train", "dev", "test"):
        encode_split(data, split, encoder)
    timings["encode"] = time.time() - t

    test = load_split(data, "test")
    words, _ = load_encoded(data, "test")
    n_img, n_cap = test.num_images, test.num_captions
    protocol = "coco5k" if (n_img, n_cap) == (5000, 25000) else "any"
    size_note = f"{n_img:,} images x {n_cap:,} captions"
    scoring = dict(backend=args.backend, device=args.device, precision=args.precision, progress=True)

    cfg = TrainConfig(data=str(data), out=str(out / "run"), epochs=preset["epochs"], batch_size=args.batch_size,
                      lr=args.lr, schedule=args.schedule, variant=args.variant, embed_dim=args.embed_dim,
                      heads=args.heads, seed=args.seed, device=args.device, backend=args.backend,
                      dev_images=preset["dev"], progress=True)
    t = time.time()
    print(f"[3/5] scoring the test split ({size_note}) with an untrained model")
    region_dim = test.regions.shape[2]
    untrained = build_model(cfg, region_dim, test.globals.shape[1] if test.globals is not None else region_dim,
                            words.shape[2])
    before = score_split(untrained, data, "test", work=out / "eval_untrained", **scoring)
    timings["score_untrained"] = time.time() - t

    t = time.time()
    print(f"[4/5] training from scratch -> {cfg.out}")
    run_dir = train(cfg, overwrite=True)  # the demo's own folder: a rerun trains afresh
    timings["train"] = time.time() - t

    t = time.time()
    print(f"[5/5] scoring the test split ({size_note}) with the best checkpoint")
    after = score_split(Path(run_dir) / "best.safetensors", data, "test", **scoring)
    timings["score_trained"] = time.time() - t

    t = time.time()
    rows = (evaluate_all(before.S, before.txt2img, before.text_vectors, protocol, "untrained")
            + evaluate_all(after.S, after.txt2img, after.text_vectors, protocol, "trained"))
    timings["evaluate"] = time.time() - t
    timings["total"] = time.time() - t_start
    chance = {"i2t_r1": 100.0 * 5 / n_cap, "t2i_r1": 100.0 / n_img}
    title = (f"ACF demo, synthetic test {size_note}; model {args.variant} D={args.embed_dim} H={args.heads}, "
             f"{preset['epochs']} epochs on {sizes['train']} images")
    print()
    print(title)
    print(_table(rows))
    print(f"chance: I2T R@1 ~ {chance['i2t_r1']:.2f}, T2I R@1 ~ {chance['t2i_r1']:.2f}; the siblings row reads the "
          "ground-truth captions of each query (as the authors' t2i_rerank does) and is an oracle, not a result")
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    result = {
        "title": title, "test": {"images": n_img, "captions": n_cap, "protocol": protocol},
        "precision": args.precision, "scoring": {"untrained": before.info, "trained": after.info},
        "sizes": sizes, "synth_knobs": knobs, "epochs": preset["epochs"], "config": cfg.to_dict(), "rows": rows, "chance": chance,
        "timings_s": timings, "device": str(device),
        "machine": machine_record(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_results(out, result, rows, title)
    return 0


def write_results(out: Path, result: dict, rows: list, title: str) -> None:
    """OUT/results.json (``result``) and OUT/results.png (the recall bars of ``rows``), atomically."""
    from ..atomic import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result, indent=1)
    _plot(rows, out / "results.png", title)
    print(f"wrote {out / 'results.json'} and {out / 'results.png'}")


def register(subparsers) -> None:
    from .train import add_model_args

    p = subparsers.add_parser(
        "demo", help="end to end: synthesise, encode, train from scratch, evaluate with re-ranking",
        description="The main job on the embedded synthetic set: synthesise it, encode the captions with "
                    "MiniLM, evaluate an untrained model, train one from scratch, evaluate it with and without "
                    "ACF-R+ re-ranking (honest and oracle neighbour modes labelled), print the table and "
                    "write results.json and results.png. CPU: 1K test, ~10 minutes on 2 cores; GPU: 5K test.",
    )
    p.add_argument("--out", default="demo_out", help="output folder (data/, run/, results.json, results.png)")
    p.add_argument("--data", default=None, help="data folder (default: OUT/data)")
    p.add_argument("--train-images", type=int, default=None, help=f"training images (CPU {CPU_SIZES['train']}, GPU {GPU_SIZES['train']})")
    p.add_argument("--dev-images", type=int, default=None, help=f"dev images (CPU {CPU_SIZES['dev']})")
    p.add_argument("--test-images", type=int, default=None, help=f"test images (CPU {CPU_SIZES['test']}, GPU {GPU_SIZES['test']})")
    p.add_argument("--encoder", default=None, help="local BERT folder (default: bundled MiniLM)")
    add_model_args(p)
    p.set_defaults(epochs=None, embed_dim=None, heads=None, func=run)
