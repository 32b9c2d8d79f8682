"""A resumable cache of a large float32 matrix computed in chunks of rows.

Everything that decides the values (the caller's fingerprint dict plus the shape and
the chunking) is hashed into a key, and the chunks live in ``{work}/{key}/``: rows
[a, b) in ``chunks/rows_{a}_{b}.npy`` (written atomically, so a chunk file is either
complete or absent) beside ``manifest.json`` (the fingerprint, for people). A rerun
with the same fingerprint reuses every saved chunk and computes only the missing
ones; another fingerprint gets another key folder, so two evaluations that share a
``work`` folder (two checkpoints, or a model or data changed between runs) never read
each other's chunks, even when they run at the same time.

A cache holds a shared lock (``fcntl.flock``) on its key folder's ``.lock`` from
construction to the end of :meth:`ChunkCache.fill`; a new cache deletes the other key
folders of ``work`` that no cache holds (results of an earlier model or data), so disk
use stays one matrix per evaluation running.

    cache = ChunkCache(work, {"checkpoint": digest, ...}, shape=(N, M), chunk_rows=256)
    S, info = cache.fill(lambda a, b: scores_of_rows(a, b))
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch

from .atomic import atomic_save_npy, atomic_write_json

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT = 2  # 2: one folder per fingerprint key
KEY_CHARS = 16
_KEY_RE = re.compile(rf"^[0-9a-f]{{{KEY_CHARS}}}$")


class KeyFolder:
    """``work/<key>``: the folder of one fingerprint (a JSON-able dict of everything the
    saved results depend on; ``key`` = the first 16 hex digits of its sha256), held
    under a shared lock from construction to :meth:`close`, with ``manifest.json`` (the
    fingerprint, for people). Construction deletes the other key folders of ``work``
    that nobody holds (results of an earlier model, data or setting)."""

    def __init__(self, work, fingerprint: dict):
        self.work = Path(work)
        self.fingerprint = fingerprint
        digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()
        self.key = digest[:KEY_CHARS]
        self.root = self.work / self.key
        self._lock_fd = _hold(self.root, fcntl.LOCK_SH)
        if _read_manifest(self.root / MANIFEST) is None:
            atomic_write_json(self.root / MANIFEST, {"fingerprint_hash": digest, "fingerprint": self.fingerprint})
        self._prune_others()

    def close(self) -> None:
        """Release the lock on the key folder."""
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)  # closing the descriptor drops its flock
            self._lock_fd = None

    def __del__(self):
        self.close()

    def _prune_others(self) -> None:
        """Delete the other key folders of ``work`` that no one holds."""
        for other in self.work.iterdir():
            if other == self.root or not other.is_dir() or not _KEY_RE.match(other.name):
                continue
            try:
                fd = os.open(other / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(other, ignore_errors=True)
            except OSError:
                pass  # held by an evaluation running now
            finally:
                os.close(fd)


class ChunkCache(KeyFolder):
    """Row chunks of an (N, M) float32 matrix saved under ``work/<key>``.

    Args:
        work: folder for the key folders (created).
        fingerprint: JSON-able dict of everything the values depend on.
        shape: (N, M) of the whole matrix.
        chunk_rows: rows per saved chunk (part of the fingerprint).
    """

    def __init__(self, work, fingerprint: dict, shape: Tuple[int, int], chunk_rows: int = 256):
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.chunk_rows = chunk_rows
        super().__init__(work, dict(fingerprint, chunk_rows=chunk_rows, format=FORMAT, shape=list(self.shape)))
        legacy = _read_manifest(self.work / MANIFEST)  # format 1: one folder, work/chunks + work/manifest.json
        if legacy is not None and legacy.get("fingerprint", {}).get("format") == 1:
            shutil.rmtree(self.work / "chunks", ignore_errors=True)
            (self.work / MANIFEST).unlink(missing_ok=True)
        self.folder = self.root / "chunks"
        self.folder.mkdir(exist_ok=True)

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

    def get(self, a: int, b: int, compute: Callable[[int, int], object],
            on_chunk: Optional[Callable[[int, int], None]] = None):
        """Rows [a, b): read when saved, else ``compute(a, b)``, saved, then ``on_chunk(a, b)``.
        Returns (rows (b - a, M) float32 array, whether they were computed)."""
        rows = self.load(a, b)
        if rows is not None:
            return rows, False
        rows = self.save(a, b, compute(a, b))
        if on_chunk is not None:
            on_chunk(a, b)
        return rows, True

    def fill(self, compute: Callable[[int, int], object], *, progress: bool = True, desc: str = "scoring",
             on_chunk: Optional[Callable[[int, int], None]] = None):
        """The whole matrix: saved chunks are read, missing ones computed by
        ``compute(a, b)`` and saved (then ``on_chunk(a, b)`` is called). Releases the
        lock when done (or failed).

        Returns (array (N, M) float32, info {"chunks", "reused", "computed", "work"}),
        "work" the key folder.
        """
        from tqdm.auto import tqdm

        out = np.empty(self.shape, dtype=np.float32)
        info = {"chunks": 0, "reused": 0, "computed": 0, "work": str(self.root)}
        try:
            with tqdm(total=self.shape[0], unit="row", desc=desc, disable=not progress) as bar:
                for a, b in self.ranges():
                    info["chunks"] += 1
                    out[a:b], computed = self.get(a, b, compute, on_chunk)
                    info["computed" if computed else "reused"] += 1
                    bar.update(b - a)
        finally:
            self.close()
        return out, info


def _hold(folder: Path, mode: int) -> int:
    """Create ``folder`` and take ``mode`` (flock) on its lock file; returns the
    descriptor. Retries when a pruner deleted the folder between the open and the lock."""
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, mode)
        try:
            if os.stat(folder / LOCK).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # pruned under us: make it again


def _read_manifest(path: Path) -> Optional[dict]:
    try:
        m = json.loads(path.read_bytes())
        return m if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None  # absent or unreadable: written anew
