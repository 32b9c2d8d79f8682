"""A resumable cache of a large float32 matrix computed in chunks of rows.

Each chunk of rows [a, b) is saved as ``{work}/chunks/rows_{a}_{b}.npy`` (written
atomically, so a chunk file is either complete or absent). ``{work}/manifest.json``
holds a fingerprint of everything that decides the values (the caller's dict plus
the shape and the chunking). A rerun with the same fingerprint reuses every saved
chunk and computes only the missing ones; any change discards the saved chunks.

    cache = ChunkCache(work, {"checkpoint": digest, ...}, shape=(N, M), chunk_rows=256)
    S, info = cache.fill(lambda a, b: scores_of_rows(a, b))
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch

from .atomic import atomic_save_npy, atomic_write_json

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK_RE = re.compile(r"^rows_(\d+)_(\d+)\.npy$")


class ChunkCache:
    """Row chunks of an (N, M) float32 matrix saved under ``work``.

    Args:
        work: folder for the manifest and ``chunks/`` (created).
        fingerprint: JSON-able dict of everything the values depend on.
        shape: (N, M) of the whole matrix.
        chunk_rows: rows per saved chunk (part of the fingerprint).
    """

    def __init__(self, work, fingerprint: dict, shape: Tuple[int, int], chunk_rows: int = 256):
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        self.work = Path(work)
        self.folder = self.work / "chunks"
        self.shape = (int(shape[0]), int(shape[1]))
        self.chunk_rows = chunk_rows
        self.fingerprint = dict(fingerprint, chunk_rows=chunk_rows, format=FORMAT, shape=list(self.shape))
        digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()
        self.folder.mkdir(parents=True, exist_ok=True)
        old = _read_manifest(self.work / MANIFEST)
        if old is None or old.get("fingerprint_hash") != digest:
            self._clear()  # stale: another model, data, precision or chunking
            atomic_write_json(self.work / MANIFEST, {"fingerprint_hash": digest, "fingerprint": self.fingerprint})

    def ranges(self) -> Iterator[Tuple[int, int]]:
        N = self.shape[0]
        for a in range(0, N, self.chunk_rows):
            yield a, min(N, a + self.chunk_rows)

    def path(self, a: int, b: int) -> Path:
        return self.folder / f"rows_{a}_{b}.npy"

    def load(self, a: int, b: int) -> Optional[np.ndarray]:
        """The saved rows [a, b), or None when absent, unreadable, misshapen or not finite."""
        try:
            arr = np.load(self.path(a, b), allow_pickle=False)
        except (OSError, ValueError):
            return None
        if arr.shape != (b - a, self.shape[1]) or arr.dtype != np.float32 or not np.isfinite(arr).all():
            return None
        return arr

    def save(self, a: int, b: int, rows) -> np.ndarray:
        """Check rows [a, b) ((b - a, M) tensor or array, finite) and save them as float32."""
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().to("cpu", torch.float32).numpy()
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.shape != (b - a, self.shape[1]):
            raise ValueError(f"rows [{a}, {b}) have shape {rows.shape}, expected {(b - a, self.shape[1])}")
        if not np.isfinite(rows).all():
            raise ValueError(f"rows [{a}, {b}) contain NaN or Inf; not saved")
        atomic_save_npy(self.path(a, b), rows)
        return rows

    def fill(self, compute: Callable[[int, int], object], *, progress: bool = True, desc: str = "scoring",
             on_chunk: Optional[Callable[[int, int], None]] = None):
        """The whole matrix: saved chunks are read, missing ones computed by
        ``compute(a, b)`` and saved (then ``on_chunk(a, b)`` is called).

        Returns (array (N, M) float32, info {"chunks", "reused", "computed", "work"}).
        """
        from tqdm.auto import tqdm

        out = np.empty(self.shape, dtype=np.float32)
        info = {"chunks": 0, "reused": 0, "computed": 0, "work": str(self.work)}
        with tqdm(total=self.shape[0], unit="row", desc=desc, disable=not progress) as bar:
            for a, b in self.ranges():
                info["chunks"] += 1
                rows = self.load(a, b)
                if rows is None:
                    rows = self.save(a, b, compute(a, b))
                    info["computed"] += 1
                    if on_chunk is not None:
                        on_chunk(a, b)
                else:
                    info["reused"] += 1
                out[a:b] = rows
                bar.update(b - a)
        return out, info

    def _clear(self) -> None:
        for p in self.folder.iterdir():
            if _CHUNK_RE.match(p.name) or p.name.endswith(".tmp") or p.name.endswith(".tmp.npy"):
                p.unlink()


def _read_manifest(path: Path) -> Optional[dict]:
    try:
        m = json.loads(path.read_bytes())
        return m if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None  # absent or unreadable: start afresh
