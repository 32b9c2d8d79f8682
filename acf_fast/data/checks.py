"""File checks for the SCAN layout: every problem is a ``ValueError`` naming the file.

``.npy`` headers are read before anything is mapped, so a pickled (object-dtype)
array is refused without unpickling and a truncated file is refused before
``np.memmap`` trips over it. Finiteness is checked in row chunks, so a 1.5 GB
region file is streamed through memory, never loaded whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np

# Rows per finiteness chunk: 256 COCO images (36 x 2048 float32) = 75 MB.
CHUNK_BYTES = 64 * 2**20


def read_npy_header(path: Path) -> Tuple[Tuple[int, ...], np.dtype, bool, int]:
    """Parse a .npy header without loading data.

    Returns (shape, dtype, fortran_order, data_offset). Raises ValueError naming
    ``path`` if it is not a .npy file, holds Python objects, or is truncated.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                shape, fortran, dtype = np.lib.format._read_array_header(f, version)
            offset = f.tell()
    except FileNotFoundError:
        raise
    except Exception as err:  # numpy raises ValueError / OSError / SyntaxError variants
        raise ValueError(f"{path}: not a readable .npy file ({err})") from None
    if dtype.hasobject:
        raise ValueError(
            f"{path}: holds Python objects (dtype {dtype}); pickled arrays are refused "
            "(allow_pickle=False) - save plain numeric arrays"
        )
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = path.stat().st_size
    if have < need:
        raise ValueError(
            f"{path}: truncated .npy file: header says shape {shape} {dtype} "
            f"({need} bytes with header) but the file has {have} bytes"
        )
    return tuple(int(s) for s in shape), dtype, bool(fortran), offset


def open_npy(path: Path, *, ndim: int, kind: str = "f", what: str = "array") -> np.ndarray:
    """Memory-map a checked .npy (``allow_pickle=False``).

    Args:
        ndim: the required number of dimensions.
        kind: numpy dtype kind(s) allowed: "f" float, "b" bool, "bui" bool or int.
        what: a description for messages, e.g. "region features (rows, K, Dv)".
    """
    shape, dtype, _, _ = read_npy_header(path)
    if len(shape) != ndim:
        raise ValueError(f"{path}: {what} must be {ndim}-D, got shape {shape}")
    if dtype.kind not in kind:
        raise ValueError(f"{path}: {what} must have dtype kind {kind!r} (float='f', bool='b', int='i/u'), got {dtype}")
    if any(s == 0 for s in shape):
        raise ValueError(f"{path}: {what} is empty (shape {shape})")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        raise ValueError(f"{path}: cannot be memory-mapped ({err})") from None


# dtypes a loaded array may have, by kind: what torch takes (no float128, no complex).
LOADABLE_FLOATS = ("float16", "float32", "float64")


def load_npy(path: Path, flag: str, *, kind: str, what: str) -> np.ndarray:
    """Load a whole small .npy (``allow_pickle=False``) after checking its header: an
    existing file, not pickled, not truncated, dtype kind in ``kind`` ("f": float16/32/64,
    "iu": integers). Returned in native byte order. Errors name ``flag`` and the file."""
    from ..paths import require_file

    path = require_file(path, flag)
    try:
        shape, dtype, _, _ = read_npy_header(path)
    except ValueError as err:
        raise ValueError(f"{flag} {err}") from None
    if dtype.kind not in kind or (dtype.kind == "f" and dtype.name not in LOADABLE_FLOATS):
        want = "floating-point (float16, float32 or float64)" if kind == "f" else "integer"
        raise ValueError(f"{flag} {path}: {what} must be {want}, got dtype {dtype}")
    arr = np.load(path, allow_pickle=False)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


def check_finite_chunks(arr: np.ndarray, name, chunk_bytes: int = CHUNK_BYTES, progress: bool = False) -> None:
    """Refuse NaN/Inf in ``arr`` (any shape, e.g. a memmap), scanning chunks of rows.

    Raises ValueError naming ``name`` and the first bad row.
    """
    if arr.dtype.kind != "f" or arr.size == 0:
        return
    row_bytes = max(1, arr[0].nbytes) if arr.ndim > 1 else arr.itemsize
    step = max(1, chunk_bytes // row_bytes)
    rows = range(0, arr.shape[0], step)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc=f"check {Path(str(name)).name}", unit="chunk")
    for start in rows:
        block = np.asarray(arr[start : start + step])
        finite = np.isfinite(block)
        if not finite.all():
            bad = ~finite.reshape(block.shape[0], -1).all(axis=1)
            row = start + int(np.argmax(bad))
            raise ValueError(f"{name}: contains NaN or Inf (first at row {row}); the features must be finite")


def read_lines(path: Path, what: str) -> list:
    """Lines of a UTF-8 text file without their newline; refuses undecodable files."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: {what} is not UTF-8 text ({err})") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln.rstrip("\r") for ln in lines]
