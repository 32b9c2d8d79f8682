"""Loader for the SCAN precomputed layout (spec §4), which the synthetic set also uses.

One folder, per split:

    {split}_ims.npy        (N or 5N rows, K, Dv) float   region features (required)
    {split}_caps.txt       one caption per line, M = 5N    (required)
    {split}_txt2img.npy    (M,) int64 image row of each caption (optional)
    {split}_ids.txt        one id per image row or per caption (optional)
    {split}_glob.npy       (N or 5N rows, Dg) float        global features (optional)
    {split}_ims_mask.npy   (N or 5N rows, K) bool          valid regions (optional)

Without ``{split}_txt2img.npy`` every image has 5 captions (COCO, Flickr30K):
caption t belongs to image t // 5, and when the region file has one row per caption
(rows = M, as some SCAN releases do), image i is row 5i: the loader takes a strided
view ``arr[::5]`` of the memory map, so nothing is copied. With it (``acf-fast data
images`` writes one), an image may have any number >= 1 of captions, in any order,
and every per-image file has exactly one row per image.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from .checks import check_finite_chunks, open_npy, read_lines

log = logging.getLogger(__name__)

CAPTIONS_PER_IMAGE = 5
# The files of a split (``{split}_<name>``) that decide what is loaded: a fingerprint of
# a split covers these (derived caches such as the shuffled captions are checked by
# their own keys).
SPLIT_FILES = ("ims.npy", "caps.txt", "txt2img.npy", "ids.txt", "glob.npy", "ims_mask.npy", "words.safetensors")


@dataclass
class Split:
    """One split of a SCAN-layout folder.

    Attributes:
        regions: (N, K, Dv) read-only memory map (float32 for SCAN and the synthetic set).
        region_mask: (N, K) bool, True at valid regions, or None (all valid).
        globals: (N, Dg) float32 array, or None: then the model uses the mean of the valid
            raw regions as the global feature (spec §1 [choice]); ``global_source`` says which.
        captions: M captions.
        txt2img: (M,) int64, the image of each caption: ``{split}_txt2img.npy`` or t // 5.
        name: the split name, folder: the folder.
        ids: image ids (N) if ``{split}_ids.txt`` exists, else None.
        global_source: "file" or "region-mean".
    """

    regions: np.ndarray
    region_mask: Optional[np.ndarray]
    globals: Optional[np.ndarray]
    captions: List[str]
    txt2img: np.ndarray
    name: str
    folder: Path
    ids: Optional[List[str]] = None
    global_source: str = field(default="file")

    @property
    def num_images(self) -> int:
        return int(self.regions.shape[0])

    @property
    def num_captions(self) -> int:
        return len(self.captions)


def _per_image(arr: np.ndarray, rows: int, n_images: int, path: Path, what: str) -> np.ndarray:
    """Reduce an array with one row per image or one per caption to one per image."""
    if arr.shape[0] == n_images:
        return arr
    if arr.shape[0] == rows and rows == n_images * CAPTIONS_PER_IMAGE:
        return arr[::CAPTIONS_PER_IMAGE]
    raise ValueError(
        f"{path}: {what} has {arr.shape[0]} rows but the split has {n_images} images "
        f"({rows} region rows); expected {n_images} or {rows}"
    )


def read_txt2img(path: Path, M: int, n_images: int) -> np.ndarray:
    """The caption -> image map of a split: (M,) int64 in [0, n_images), every image
    with at least one caption. Raises ValueError naming ``path``."""
    arr = open_npy(path, ndim=1, kind="iu", what="caption -> image map (M,)")
    if arr.shape[0] != M:
        raise ValueError(f"{path}: has {arr.shape[0]} entries but the split has {M} captions; expected one image row per caption")
    t2i = np.array(arr, dtype=np.int64)  # a small writable copy, not the memory map
    lo, hi = int(t2i.min()), int(t2i.max())
    if lo < 0 or hi >= n_images:
        raise ValueError(f"{path}: holds image rows in [{lo}, {hi}] but the split has {n_images} images (0..{n_images - 1})")
    counts = np.bincount(t2i, minlength=n_images)
    if (counts == 0).any():
        first = int(np.argmax(counts == 0))
        raise ValueError(f"{path}: image {first} has no caption ({int((counts == 0).sum())} images without any); "
                         "every image needs at least one")
    return t2i


def load_split(folder, split: str, *, check_finite: bool = True, progress: bool = False) -> Split:
    """Load one split of a SCAN-layout folder, memory-mapping the arrays.

    Args:
        folder: the folder holding ``{split}_ims.npy`` and ``{split}_caps.txt``.
        split: e.g. "train", "dev", "test", "testall".
        check_finite: scan every float array for NaN/Inf, chunk by chunk (streams the
            file once; turn off only for files already checked).
        progress: tqdm bar while checking.

    Raises:
        FileNotFoundError: a required file is missing.
        ValueError: naming the file, for a truncated / pickled / wrongly shaped array,
            NaN or Inf, or image and caption counts that do not match.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {folder} does not exist")
    ims_path = folder / f"{split}_ims.npy"
    caps_path = folder / f"{split}_caps.txt"
    for p in (ims_path, caps_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing (split {split!r} of {folder})")

    arr = open_npy(ims_path, ndim=3, kind="f", what="region features (rows, K, Dv)")
    rows, K, _ = arr.shape
    captions = read_lines(caps_path, "captions")
    M = len(captions)
    if M == 0:
        raise ValueError(f"{caps_path}: has no captions")
    empty = [i for i, c in enumerate(captions) if not c.strip()]
    if empty:
        raise ValueError(f"{caps_path}: line {empty[0] + 1} is an empty caption")
    t2i_path = folder / f"{split}_txt2img.npy"
    txt2img = None
    if t2i_path.is_file():
        txt2img = read_txt2img(t2i_path, M, rows)
        n_images = rows
    elif rows == M:
        if M % CAPTIONS_PER_IMAGE:
            raise ValueError(
                f"{ims_path}: has one row per caption ({rows}) but {M} captions is not a "
                f"multiple of {CAPTIONS_PER_IMAGE}"
            )
        n_images = M // CAPTIONS_PER_IMAGE
    elif M == CAPTIONS_PER_IMAGE * rows:
        n_images = rows
    else:
        raise ValueError(
            f"{caps_path}: {M} captions do not match {rows} image rows in {ims_path.name}; "
            f"expected {CAPTIONS_PER_IMAGE} captions per image ({CAPTIONS_PER_IMAGE * rows}) "
            f"or one image row per caption, or a {t2i_path.name} saying which image each caption belongs to"
        )
    regions = _per_image(arr, rows, n_images, ims_path, "region features")
    if check_finite:
        check_finite_chunks(arr if rows == n_images else regions, ims_path, progress=progress)

    region_mask = None
    mask_path = folder / f"{split}_ims_mask.npy"
    if mask_path.is_file():
        m = open_npy(mask_path, ndim=2, kind="bui", what="region mask (rows, K)")
        if m.shape[1] != K:
            raise ValueError(f"{mask_path}: region mask has {m.shape[1]} columns but {ims_path.name} has K = {K} regions")
        m = _per_image(m, rows, n_images, mask_path, "region mask")
        if m.dtype.kind != "b":
            if not np.isin(np.asarray(m), (0, 1)).all():
                raise ValueError(f"{mask_path}: an integer region mask must hold only 0 and 1")
        region_mask = np.ascontiguousarray(m, dtype=bool)
        empty_img = ~region_mask.any(axis=1)
        if empty_img.any():
            raise ValueError(f"{mask_path}: image {int(np.argmax(empty_img))} has no valid region")

    globals_ = None
    source = "region-mean"
    glob_path = folder / f"{split}_glob.npy"
    if glob_path.is_file():
        g = open_npy(glob_path, ndim=2, kind="f", what="global features (rows, Dg)")
        g = _per_image(g, rows, n_images, glob_path, "global features")
        globals_ = np.ascontiguousarray(g, dtype=np.float32)
        if check_finite:
            check_finite_chunks(globals_, glob_path)
        source = "file"
    else:
        log.info("%s: no %s, the global feature will be the mean of the valid regions", folder, glob_path.name)

    ids = None
    ids_path = folder / f"{split}_ids.txt"
    if ids_path.is_file():
        ids = read_lines(ids_path, "ids")
        if len(ids) == n_images:
            pass
        elif t2i_path.is_file():
            raise ValueError(f"{ids_path}: {len(ids)} ids but the split has {n_images} images; with "
                             f"{t2i_path.name} the ids are one per image")
        elif len(ids) in (M, rows):
            ids = ids[::CAPTIONS_PER_IMAGE]
        else:
            raise ValueError(
                f"{ids_path}: {len(ids)} ids but the split has {n_images} images and {M} captions; "
                "expected one id per image or per caption"
            )

    if txt2img is None:
        txt2img = np.arange(M, dtype=np.int64) // CAPTIONS_PER_IMAGE
    return Split(
        regions=regions,
        region_mask=region_mask,
        globals=globals_,
        captions=captions,
        txt2img=txt2img,
        name=split,
        folder=folder,
        ids=ids,
        global_source=source,
    )


def check_folder(folder, splits=None, progress: bool = True) -> dict:
    """Validate every split found in ``folder`` (or the named ones).

    Returns {split: Split}. Raises the loader's errors.
    """
    folder = Path(folder)
    if splits is None:
        splits = sorted(p.name[: -len("_ims.npy")] for p in folder.glob("*_ims.npy"))
        if not splits:
            raise FileNotFoundError(f"{folder} holds no {{split}}_ims.npy file")
    return {s: load_split(folder, s, progress=progress) for s in splits}
