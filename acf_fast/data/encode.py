"""Caption encoding with the text encoder, cached to ``{split}_words.safetensors``.

The cache holds tensors ``words`` (M, L, Db) float32 or float16 and ``mask`` (M, L)
bool, and metadata: the encoder's name (folder + content hash), the SHA-256 of the
captions, ``max_length`` and the count. ``encode_split`` skips the work when all
of these match, so each caption is encoded once; a changed caption file or another
encoder makes it encode again. ``load_encoded`` refuses a stale or corrupt cache.

Shuffled captions (the token-shuffle negative of spec §6 with a frozen encoder):
``encode_split(..., shuffle_seed=s)`` shuffles each caption's inner wordpieces BEFORE
the encoder (``text_encoder.shuffle_wordpieces``, one seeded draw per caption), encodes
that once and caches it as ``{split}_shuffled_words.safetensors``, with the shuffled
``ids`` (M, L) int64 and ``changed`` (M,) bool (False: nothing could move, the text is
its own shuffle). Its mask equals the captions' (a permutation keeps the length).
Shuffling the cached features instead would change nothing: ACF has no positional
term after the encoder, so its score is a function of the SET of word rows.
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


def cache_path(folder, split: str, shuffled: bool = False) -> Path:
    return Path(folder) / f"{split}_{'shuffled_' if shuffled else ''}words.safetensors"


def _wanted(captions, encoder_name: str, max_length: int, shuffle_seed: Optional[int]) -> dict:
    """The metadata entries that decide whether a cache is up to date."""
    want = {
        "cache_version": CACHE_VERSION,
        "encoder": encoder_name,
        "captions_sha256": captions_hash(captions),
        "count": str(len(captions)),
        "max_length": str(int(max_length)),
    }
    if shuffle_seed is not None:
        want["shuffle_seed"] = str(int(shuffle_seed))
    return want


def cache_is_fresh(folder, split: str, captions, encoder_name: Optional[str], max_length: int,
                   shuffle_seed: Optional[int] = None) -> bool:
    """True when ``{split}``'s cache (the shuffled one with ``shuffle_seed``) holds exactly
    these captions encoded by ``encoder_name`` at ``max_length`` (any storage dtype):
    callers can then skip even loading the encoder."""
    if encoder_name is None:
        return False
    have = read_cache_metadata(cache_path(folder, split, shuffle_seed is not None)) or {}
    return all(have.get(k) == v for k, v in _wanted(captions, encoder_name, max_length, shuffle_seed).items())


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
    shuffle_seed: Optional[int] = None,
) -> Path:
    """Encode ``{split}_caps.txt`` once; write ``{split}_words.safetensors`` atomically.

    Args:
        encoder: a ``TextEncoder``, or None / a local folder path to load one.
        dtype: storage dtype of ``words``: torch.float32 or torch.float16.
        force: encode even if the cache is up to date.
        shuffle_seed: encode the captions with their inner wordpieces shuffled (seeded)
            instead, into ``{split}_shuffled_words.safetensors`` (see the module docstring).

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
    want = {**_wanted(captions, encoder.name, max_length, shuffle_seed), "dtype": str(dtype).replace("torch.", "")}
    path = cache_path(folder, split, shuffle_seed is not None)
    have = read_cache_metadata(path)
    if not force and have is not None and all(have.get(k) == v for k, v in want.items()):
        log.info("%s is up to date; not re-encoding", path)
        return path
    extra = {}
    if shuffle_seed is None:
        words, mask = encoder.encode(captions, batch_size=batch_size, max_length=max_length, progress=progress)
    else:
        from ..text_encoder import shuffle_wordpieces

        gen = torch.Generator().manual_seed(int(shuffle_seed))
        ids, changed = zip(*(shuffle_wordpieces(x, gen) for x in encoder.tokenize(captions, max_length)))
        words, mask = encoder.encode_ids(ids, batch_size=batch_size, progress=progress)
        padded = torch.zeros(mask.shape, dtype=torch.int64)
        for t, x in enumerate(ids):
            padded[t, : len(x)] = torch.tensor(x, dtype=torch.int64)
        extra = {"ids": padded, "changed": torch.tensor(changed, dtype=torch.bool)}
    with atomic_path(path) as tmp:
        save_file({"words": words.to(dtype).contiguous(), "mask": mask.contiguous(), **extra}, str(tmp),
                  metadata={**want, "format": "pt"})
    return path


def load_encoded(folder, split: str, check_captions: bool = True,
                 dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load cached caption features.

    Args:
        dtype: of the returned words (float32; float16 keeps a float16 cache's memory).

    Returns:
        words (M, L, Db) of ``dtype``, mask (M, L) bool.

    Raises:
        FileNotFoundError: no cache (run ``acf-fast data encode``).
        ValueError: naming the file, if it is corrupt, inconsistent, or stale (the
            captions changed since it was written).
    """
    tensors = _load_cache(Path(folder), split, check_captions, dtype, shuffled=False)
    return tensors["words"], tensors["mask"]


def load_shuffled(folder, split: str, check_captions: bool = True,
                  dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load the shuffled-caption cache of ``encode_split(..., shuffle_seed=...)``:
    (words (M, L, Db) of ``dtype``, mask (M, L) bool, changed (M,) bool). Errors as
    ``load_encoded``."""
    tensors = _load_cache(Path(folder), split, check_captions, dtype, shuffled=True)
    changed = tensors.get("changed")
    if changed is None or changed.dtype != torch.bool or tuple(changed.shape) != tuple(tensors["mask"].shape[:1]):
        raise ValueError(f"{cache_path(folder, split, True)}: needs a bool tensor 'changed' with one entry per caption")
    return tensors["words"], tensors["mask"], changed


def _load_cache(folder: Path, split: str, check_captions: bool, dtype: torch.dtype, shuffled: bool) -> dict:
    from safetensors.torch import load_file

    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    path = cache_path(folder, split, shuffled)
    if not path.is_file():
        how = f"encode_split(folder, {split!r}, shuffle_seed=...)" if shuffled else \
            f"`acf-fast data encode {folder} --split {split}`"
        raise FileNotFoundError(f"{path} is missing; run {how} first")
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
    words = words.to(dtype)
    if not bool(torch.isfinite(words).all()):
        raise ValueError(f"{path}: word features contain NaN or Inf")
    if check_captions:
        captions = _read_captions(folder, split)
        if meta.get("count") != str(len(captions)) or meta.get("captions_sha256") != captions_hash(captions):
            raise ValueError(
                f"{path}: stale cache, {folder / (split + '_caps.txt')} changed since it was encoded; "
                f"run `acf-fast data encode {folder} --split {split}`"
            )
    if str(words.shape[0]) != str(meta.get("count", words.shape[0])):
        raise ValueError(f"{path}: holds {words.shape[0]} captions but its metadata says {meta.get('count')!r}")
    return {**tensors, "words": words}
