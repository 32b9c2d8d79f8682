"""Content digests of data files: what a cache or a resumed run checks its inputs by.

Size and mtime alone do not identify content: ``cp -p`` and ``touch -r`` give new
content the old times. So every file is hashed (SHA-256, streamed in 8 MiB blocks,
never loaded whole), once per process: the digest is memoised under the file's
(device, inode, size, mtime, ctime). ctime cannot be set by a user, and any write,
``utime`` or rename updates it, so a changed file always misses the memo. A digest
taken less than ``RACY_SECONDS`` after the file's ctime is not memoised (the same
"racy" rule git uses): the kernel's ctime ticks are coarse, so a write in the same
tick as the hash could otherwise keep the old key.

    digest = file_sha256("data/test_ims.npy")      # hex str
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Dict, Tuple

import torch

BLOCK = 8 * 2**20
RACY_SECONDS = 2.0

_memo: Dict[Tuple, str] = {}


def _stat_key(path: Path) -> Tuple:
    st = os.stat(path)
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_sha256(path) -> str:
    """Hex SHA-256 of the file's bytes (memoised while the file is unchanged)."""
    path = Path(path)
    key = _stat_key(path)
    if key in _memo:
        return _memo[key]
    started = time.time_ns()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            h.update(block)
    digest = h.hexdigest()
    if _stat_key(path) == key and key[-1] < started - int(RACY_SECONDS * 1e9):
        _memo[key] = digest
    return digest


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's content as raw bytes (CPU, contiguous): what its digests hash."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensors_sha256(*tensors) -> str:
    """Hex SHA-256 of tensors (None allowed) by dtype, shape and content."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()
