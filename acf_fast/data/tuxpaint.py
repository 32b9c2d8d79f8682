"""The Tux Paint stamps as a real image-caption set, built offline from Debian.

    build_tuxpaint("data/tuxpaint")     # apt-get download + dpkg-deb -x, no install

Debian's ``tuxpaint-stamps-default`` (GPL-2, Bill Kendrick and the Tux Paint
contributors) holds about 950 stamps under ``usr/share/tuxpaint/stamps/``: PNG
cut-outs (many photographic) and SVG drawings, each with a ``NAME.txt`` whose first
line is an English description written by a person ("A red and white anemone
flower."). Each stamp becomes one image with one caption:

- a stamp with both a PNG and an SVG keeps the PNG; ``*_mirror.png`` (no .txt) and
  descriptions without an image are skipped;
- SVGs are rendered with cairosvg to 400 px wide PNGs (transparent background);
  the builder composites every image on white;
- one image per distinct description (compared case-folded, whitespace collapsed,
  trailing full stop dropped; the first stamp by path wins), so no caption is the
  ground truth of two images.

The package is fetched into a temporary folder that is deleted afterwards; only
features, captions and ids land in ``out``, with the package's copyright file
beside them. The images are never stored in the repository.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from ..atomic import atomic_write_text
from .images import build_image_set, clean_caption

PACKAGE = "tuxpaint-stamps-default"
STAMPS = Path("usr/share/tuxpaint/stamps")
COPYRIGHT = Path("usr/share/doc") / PACKAGE / "copyright"
LICENCE = "GPL-2 (tuxpaint-stamps, Bill Kendrick and contributors; Debian package tuxpaint-stamps-default)"
DEFAULT_SPLIT_SIZES = "0.7,0.1,0.2"
SVG_WIDTH = 400


def _run(cmd: List[str], what: str, cwd=None) -> str:
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"{what} needs `{cmd[0]}` (Debian/Ubuntu), which is not on this machine")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed: `{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def download_package(folder: Path) -> Path:
    """``apt-get download tuxpaint-stamps-default`` into ``folder``; the .deb path."""
    _run(["apt-get", "download", PACKAGE], f"downloading {PACKAGE} (run `apt-get update` once if apt has no lists)",
         cwd=folder)
    debs = sorted(folder.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {PACKAGE} left no .deb in {folder}")
    return debs[-1]


def description_key(text: str) -> str:
    """Descriptions that differ only in case, spacing or a trailing full stop are one."""
    return clean_caption(text).casefold().rstrip(".").strip()


def find_stamps(root: Path) -> Tuple[List[Tuple[Path, str, str]], dict]:
    """[(image path, description, name relative to ``root``)] one per distinct
    description, sorted by name; and counts {"stamps", "png", "svg", "duplicates"}."""
    found = []
    for txt in sorted(root.rglob("*.txt")):
        png, svg = txt.with_suffix(".png"), txt.with_suffix(".svg")
        image = png if png.is_file() else svg if svg.is_file() else None
        if image is None:
            continue
        first = txt.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
        desc = clean_caption(first)
        if desc:
            found.append((image, desc, image.relative_to(root).as_posix()))
    kept, seen = [], set()
    for image, desc, name in found:
        key = description_key(desc)
        if key not in seen:
            seen.add(key)
            kept.append((image, desc, name))
    counts = {"stamps": len(found), "png": sum(p.suffix == ".png" for p, _, _ in kept),
              "svg": sum(p.suffix == ".svg" for p, _, _ in kept), "duplicates": len(found) - len(kept)}
    return kept, counts


def render_svg(svg: Path, png: Path, width: int = SVG_WIDTH) -> None:
    """Rasterise with cairosvg (``unsafe``: some stamps declare XML entities)."""
    import cairosvg

    png.parent.mkdir(parents=True, exist_ok=True)
    cairosvg.svg2png(url=str(svg), write_to=str(png), output_width=width, unsafe=True)


def write_pairs(stamps, folder: Path, progress: bool = True) -> Path:
    """Render / copy each stamp under ``folder`` and write ``folder/pairs.tsv``."""
    from tqdm.auto import tqdm

    lines = []
    for image, desc, name in tqdm(stamps, desc="render stamps", unit="img", disable=not progress):
        if image.suffix == ".svg":
            name = name + ".png"  # e.g. animals/birds/owl.svg.png: the id still says it was an SVG
            render_svg(image, folder / name)
        else:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, folder / name)
        lines.append(f"{name}\t{desc}")
    tsv = folder / "pairs.tsv"
    tsv.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return tsv


def build_tuxpaint(out, *, deb: Optional[str] = None, split_sizes: str = DEFAULT_SPLIT_SIZES, seed: int = 0,
                   grid: int = 6, limit: Optional[int] = None, progress: bool = True) -> dict:
    """Fetch (or take ``deb``), extract to a temp folder, keep one stamp per distinct
    description (the first ``limit`` only, if given: for quick trials), and build the
    SCAN layout in ``out`` with :func:`acf_fast.data.images.build_image_set`.

    Returns {"splits": {split: {"images", "captions"}}, "counts": {...}, "package": deb name}.
    """
    out = Path(out)
    if deb is not None and not Path(deb).is_file():
        raise FileNotFoundError(f"--deb {deb} does not exist")
    with tempfile.TemporaryDirectory(prefix="acf-tuxpaint-") as tmp:
        tmp = Path(tmp)
        deb_path = Path(deb) if deb is not None else download_package(tmp)
        version = _run(["dpkg-deb", "-f", str(deb_path), "Version"], f"reading {deb_path.name}").strip()
        _run(["dpkg-deb", "-x", str(deb_path), str(tmp / "pkg")], f"extracting {deb_path.name}")
        root = tmp / "pkg" / STAMPS
        if not root.is_dir():
            raise RuntimeError(f"{deb_path.name} holds no {STAMPS}/; is it {PACKAGE}?")
        stamps, counts = find_stamps(root)
        if limit is not None:
            stamps = stamps[:limit]
        tsv = write_pairs(stamps, tmp / "images", progress)
        source = {"package": PACKAGE, "version": version, "licence": LICENCE, "stamps_found": counts["stamps"],
                  "duplicate_descriptions_dropped": counts["duplicates"], "kept": len(stamps),
                  "kept_png": sum(p.suffix == ".png" for p, _, _ in stamps),
                  "kept_svg": sum(p.suffix == ".svg" for p, _, _ in stamps), "svg_width_px": SVG_WIDTH}
        splits = build_image_set(tsv, out, split_sizes=split_sizes, seed=seed, grid=grid, progress=progress,
                                 source=source)
        if (tmp / "pkg" / COPYRIGHT).is_file():
            atomic_write_text(out / "COPYRIGHT-tuxpaint-stamps", (tmp / "pkg" / COPYRIGHT).read_text(encoding="utf-8"))
    return {"splits": splits, "source": source}

