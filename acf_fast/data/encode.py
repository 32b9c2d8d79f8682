"""Caption encoding with the text encoder, cached to ``{split}_words.safetensors``.

The cache holds tensors ``words`` (M, L, Db) float32 or float16 and ``mask`` (M, L)
bool, and metadata: the encoder's name (folder + content hash), the SHA-256 of the
captions, ``max_length`` and the count. ``encode_split`` skips the work when all
of these match, so each caption is encoded once; a changed caption file or another
encoder makes it encode again. ``load_encoded`` refuses a stale or corrupt cache.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..atomic import atomic_path
from .checks import read_lines

log = logging.getLogger(__name__)

CACHE_VERSION = "1"


def captions_hash(captions) -> str:
    h = hashlib.sha256()
    for c in captions:
        h.update(c.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def cache_path(folder, split: str) -> Path:
    return Path(folder) / f"{split}_words.safetensors"


def _read_captions(folder: Path, split: str):
    caps = folder / f"{split}_caps.txt"
    if not caps.is_file():
        raise FileNotFoundError(f"{caps} is missing (split {split!r} of {folder})")
    captions = read_lines(caps, "captions")
    if not captions:
        raise ValueError(f"{caps}: has no captions")
    return captions


def read_cache_metadata(path: Path) -> Optional[dict]:
    """The metadata of a cache file, or None if it is missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # a truncated or foreign file: treat as absent, it gets rewritten
        return None


def encode_split(
    folder,
    split: str,
    encoder=None,
    batch_size: int = 256,
    max_length: int = 40,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Encode ``{split}_caps.txt`` once; write ``{split}_words.safetensors`` atomically.

    Args:
        encoder: a ``TextEncoder``, or None / a local folder path to load one.
        dtype: storage dtype of ``words``: torch.float32 or torch.float16.
        force: encode even if the cache is up to date.

    Returns:
        The cache path (already up to date, or freshly written).
    """
    from safetensors.torch import save_file

    from ..text_encoder import TextEncoder, load_text_encoder

    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    folder = Path(folder)
    captions = _read_captions(folder, split)
    if not isinstance(encoder, TextEncoder):
        encoder = load_text_encoder(encoder)
    want = {
        "cache_version": CACHE_VERSION,
        "encoder": encoder.name,
        "captions_sha256": captions_hash(captions),
        "count": str(len(captions)),
        "max_length": str(int(max_length)),
        "dtype": str(dtype).replace("torch.", ""),
    }
    path = cache_path(folder, split)
    have = read_cache_metadata(path)
    if not force and have is not None and all(have.get(k) == v for k, v in want.items()):
        log.info("%s is up to date; not re-encoding", path)
        return path
    words, mask = encoder.encode(captions, batch_size=batch_size, max_length=max_length, progress=progress)
    with atomic_path(path) as tmp:
        save_file({"words": words.to(dtype).contiguous(), "mask": mask.contiguous()}, str(tmp),
                  metadata={**want, "format": "pt"})
    return path


def load_encoded(folder, split: str, check_captions: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load cached caption features.

    Returns:
        words (M, L, Db) float32, mask (M, L) bool.

    Raises:
        FileNotFoundError: no cache (run ``acf-fast data encode``).
        ValueError: naming the file, if it is corrupt, inconsistent, or stale (the
            captions changed since it was written).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    path = cache_path(folder, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run `acf-fast data encode {folder} --split {split}` first")
    meta = read_cache_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise ValueError(f"{path}: corrupt or truncated caption cache ({err}); delete it and re-encode") from None
    if meta is None or "words" not in tensors or "mask" not in tensors:
        raise ValueError(f"{path}: not an acf-fast caption cache (needs tensors 'words' and 'mask' and metadata)")
    words, mask = tensors["words"], tensors["mask"]
    if words.dim() != 3 or mask.dim() != 2 or tuple(mask.shape) != tuple(words.shape[:2]):
        raise ValueError(f"{path}: words {tuple(words.shape)} and mask {tuple(mask.shape)} must be (M, L, Db) and (M, L)")
    if mask.dtype != torch.bool or not words.is_floating_point():
        raise ValueError(f"{path}: words must be float and mask bool, got {words.dtype} and {mask.dtype}")
    if not bool(mask.any(1).all()):
        raise ValueError(f"{path}: a caption has no valid token")
    words = words.float()
    if not bool(torch.isfinite(words).all()):
        raise ValueError(f"{path}: word features contain NaN or Inf")
    if check_captions:
        captions = _read_captions(folder, split)
        if meta.get("count") != str(len(captions)) or meta.get("captions_sha256") != captions_hash(captions):
            raise ValueError(
                f"{path}: stale cache, {folder / (split + '_caps.txt')} changed since it was encoded; "
                f"run `acf-fast data encode {folder} --split {split}`"
            )
    if words.shape[0] != int(meta.get("count", words.shape[0])):
        raise ValueError(f"{path}: holds {words.shape[0]} captions but its metadata says {meta.get('count')}")
    return words, mask
