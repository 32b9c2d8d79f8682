"""Chunked, resumable scoring of a data split with a checkpoint (spec §4 at full size).

A COCO-5K S (5,000 x 25,000) is scored in chunks of images; each chunk is saved as
``{work}/chunks/rows_{start}_{stop}.npy`` (float32, written to a temp file in the same
folder and renamed, so a chunk file is either complete or absent). A manifest
``{work}/manifest.json`` holds a fingerprint of everything that decides the scores:
the checkpoint (SHA-256 of its bytes and its size), the split's files in the data
folder (name, size, mtime), the backend, the device type, the chunk size and the
package version. A rerun with the same fingerprint reuses every saved chunk and
computes only the missing ones; any change discards the saved chunks.

    S, info = score_chunks(score_rows, N, M, work, fingerprint, chunk_images=256)
    scored = score_split("run/best.safetensors", "data/", "test", work="eval_work")
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .atomic import atomic_path, atomic_write_text

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK_RE = re.compile(r"^rows_(\d+)_(\d+)\.npy$")


def _atomic_write(path: Path, write: Callable) -> None:
    """Call ``write(file)`` on a temp file in ``path``'s folder, then rename it over ``path``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def save_npy_atomic(path, arr: np.ndarray) -> None:
    # np.save on a file object: on a path it would append ".npy" to the temp name.
    _atomic_write(Path(path), lambda f: np.save(f, arr, allow_pickle=False))


def sha256_file(path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def _read_manifest(path: Path) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            m = json.loads(f.read())
        return m if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None  # absent or unreadable: start afresh


def _clear_chunks(folder: Path) -> None:
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if _CHUNK_RE.match(p.name) or p.name.endswith(".tmp"):
            p.unlink()


def _load_chunk(path: Path, rows: int, M: int) -> Optional[np.ndarray]:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.shape != (rows, M) or arr.dtype != np.float32 or not np.isfinite(arr).all():
        return None
    return arr


def score_chunks(
    score_rows: Callable[[int, int], object],
    N: int,
    M: int,
    work,
    fingerprint: dict,
    chunk_images: int = 256,
    progress: bool = True,
    on_chunk: Optional[Callable[[int, int], None]] = None,
):
    """Assemble S (N, M) float32 from chunks of images, resuming from ``work``.

    Args:
        score_rows: (start, stop) -> scores of images [start, stop) against all M
            texts, (stop - start, M) tensor or array.
        work: folder for the manifest and the chunk files (created).
        fingerprint: JSON-able dict of everything the scores depend on.
        chunk_images: images per saved chunk (part of the fingerprint too).
        on_chunk: called with (start, stop) after each chunk is computed and saved.

    Returns:
        (S np.ndarray (N, M) float32, info {"chunks", "reused", "computed", "work"}).
    """
    if not isinstance(chunk_images, int) or chunk_images < 1:
        raise ValueError(f"chunk_images must be a positive int, got {chunk_images!r}")
    work = Path(work)
    chunks = work / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    fp = dict(fingerprint, chunk_images=chunk_images, format=FORMAT, shape=[N, M])
    digest = _fingerprint_hash(fp)
    old = _read_manifest(work / MANIFEST)
    if old is None or old.get("fingerprint_hash") != digest:
        _clear_chunks(chunks)  # stale: other checkpoint, data, backend or chunking
        write_json_atomic(work / MANIFEST, {"fingerprint_hash": digest, "fingerprint": fp})
    from tqdm.auto import tqdm

    S = np.empty((N, M), dtype=np.float32)
    info = {"chunks": 0, "reused": 0, "computed": 0, "work": str(work)}
    with tqdm(total=N, unit="img", desc="scoring", disable=not progress) as bar:
        for a in range(0, N, chunk_images):
            b = min(N, a + chunk_images)
            path = chunks / f"rows_{a}_{b}.npy"
            info["chunks"] += 1
            arr = _load_chunk(path, b - a, M) if path.exists() else None
            if arr is not None:
                S[a:b] = arr
                info["reused"] += 1
                bar.update(b - a)
                continue
            rows = score_rows(a, b)
            if isinstance(rows, torch.Tensor):
                rows = rows.detach().to("cpu", torch.float32).numpy()
            rows = np.ascontiguousarray(rows, dtype=np.float32)
            if rows.shape != (b - a, M):
                raise ValueError(f"score_rows({a}, {b}) returned shape {rows.shape}, expected {(b - a, M)}")
            if not np.isfinite(rows).all():
                raise ValueError(f"scores of images [{a}, {b}) contain NaN or Inf; not saved")
            save_npy_atomic(path, rows)
            S[a:b] = rows
            info["computed"] += 1
            bar.update(b - a)
            if on_chunk is not None:
                on_chunk(a, b)
    return S, info


@dataclass
class ScoredSplit:
    """S (N, M) float32 CPU tensor, text_vectors (M, D) float32 CPU tensor (the model's
    per-text vectors, for ``embedding`` neighbours), txt2img (M,) int64, scoring info."""

    S: torch.Tensor
    text_vectors: torch.Tensor
    txt2img: np.ndarray
    info: dict = field(default_factory=dict)


def data_fingerprint(folder, split: str) -> list:
    """(name, size, mtime_ns) of every ``{split}_*`` file in the folder (hashing GBs of
    features on every run would cost more than scoring a chunk)."""
    folder = Path(folder)
    out = []
    for p in sorted(folder.glob(f"{split}_*")):
        if p.is_file() and not p.name.endswith(".tmp"):
            st = p.stat()
            out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def score_split(
    checkpoint,
    folder,
    split: str = "test",
    *,
    work=None,
    backend: str = "auto",
    device=None,
    chunk_images: int = 256,
    progress: bool = True,
    on_chunk: Optional[Callable[[int, int], None]] = None,
) -> ScoredSplit:
    """Score a SCAN-layout split with a checkpoint, in resumable chunks.

    Uses ``ACF.load``, ``load_split``, ``load_encoded`` (run ``acf-fast data encode``
    first), ``encode_texts`` once for all captions, then per chunk of images
    ``encode_images`` and ``score`` (``acf_similarity`` with the given backend).
    ``work`` defaults to ``<checkpoint folder>/eval_<split>``.
    """
    import acf_fast
    from .data import load_encoded, load_split
    from .model import ACF

    checkpoint, folder = Path(checkpoint), Path(folder)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist")
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder} is not a folder")
    dev = resolve_device(device)
    work = Path(work) if work is not None else checkpoint.parent / f"eval_{split}"
    fingerprint = {
        "checkpoint": {"sha256": sha256_file(checkpoint), "size": checkpoint.stat().st_size},
        "data": data_fingerprint(folder, split),
        "split": split,
        "backend": backend,
        "device": dev.type,
        "version": getattr(acf_fast, "__version__", "?"),
    }
    data = load_split(folder, split)
    words, word_mask = load_encoded(folder, split)
    M = len(data.captions)
    if words.shape[0] != M:
        raise ValueError(f"{folder}: {words.shape[0]} encoded captions but {M} captions in {split}_caps.txt")
    model = ACF.load(checkpoint, map_location="cpu").to(dev).eval()
    with torch.no_grad():
        word_mask = word_mask.to(dev)
        W = model.encode_texts(words.to(dev), word_mask)
        text_vectors = model.text_vectors(W, word_mask)

    def rows(a: int, b: int) -> torch.Tensor:
        def part(arr):
            # np.array copies out of the read-only memory map (torch wants writable memory).
            return None if arr is None else torch.from_numpy(np.array(arr[a:b])).to(dev)

        with torch.no_grad():
            regions, rmask = part(data.regions), part(data.region_mask)
            V, G = model.encode_images(regions, rmask, part(data.globals))
            return model.score(V, rmask, G, W, word_mask, backend=backend)

    S, info = score_chunks(rows, data.num_images, M, work, fingerprint, chunk_images=chunk_images,
                           progress=progress, on_chunk=on_chunk)
    return ScoredSplit(torch.from_numpy(S), text_vectors.float().cpu(), np.asarray(data.txt2img, dtype=np.int64), info)
