"""Scoring a data split with a model: the one evaluation pipeline (spec §4 at full size).

Every S of a split comes from here: ``acf-fast evaluate --data``, ``acf-fast train
--eval-test`` (and so the ablation), the demo, and the trainer's validation
(:func:`score_items` on tensors already in memory). One path means one set of
numerics: the same checkpoint gives the same S whichever command asks.

- Texts are encoded once (``model.encode_texts``), sorted by length and cut into
  chunks, each padded only to its own longest text (the per-pair cost grows with L
  and L²); S's columns are put back in caption order.
- Images go in chunks of ``chunk_images``; with :func:`score_split` each chunk is
  saved by :class:`~acf_fast.chunk_cache.ChunkCache`, so an interrupted run resumes
  where it stopped and a changed model, data file, backend, precision or chunking
  starts afresh.
- ``precision``: "fp32" (default; float32 throughout, the spec §9 1e-4 contract) or
  "bf16" (bf16 autocast on CUDA, fp32 accumulation, the 5e-3 contract). It is one
  explicit option of every command and is recorded with every result.

    scored = score_split("run/best.safetensors", "data/", "test")   # ScoredSplit
    S, text_vectors = score_items(model, regions, rmask, globals, words, wmask)
"""
from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from .chunk_cache import ChunkCache
from .machine import resolve_device
from .paths import require_file, require_folder
from .similarity import BACKENDS

PRECISIONS = ("fp32", "bf16")
DEFAULT_PRECISION = "fp32"


def check_precision(precision: str, device: torch.device) -> None:
    """ValueError unless ``precision`` is one of PRECISIONS and runs on ``device``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and device.type != "cuda":
        raise ValueError(f"precision='bf16' is bf16 autocast on a CUDA device; device is {device}: use 'fp32'")


def _autocast(precision: str):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")


@contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def image_tensors(split, rows, device) -> tuple:
    """(regions (n, K, Dv) float32, region_mask (n, K) bool|None, globals (n, Dg) float32|None)
    on ``device`` for ``rows`` (a slice or an int array; None = all) of a loaded ``Split``."""
    sel = slice(None) if rows is None else rows
    # np.array copies: the memmap is read-only and torch wants writable memory.
    regions = torch.from_numpy(np.array(split.regions[sel], dtype=np.float32)).to(device)
    mask = None if split.region_mask is None else torch.from_numpy(np.array(split.region_mask[sel], dtype=bool)).to(device)
    glob = None if split.globals is None else torch.from_numpy(np.array(split.globals[sel], dtype=np.float32)).to(device)
    return regions, mask, glob


@dataclass
class EncodedTexts:
    """Texts encoded once for scoring against any number of image chunks.

    order: (M,) int64, the length-sorted permutation; chunks: (W (m, L_c, D), mask
    (m, L_c) bool) on the scoring device in that order; vectors: (M, D) float32 CPU,
    the model's per-text vectors in caption order (``embedding`` neighbours).
    """

    order: torch.Tensor
    chunks: List[Tuple[torch.Tensor, torch.Tensor]]
    vectors: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.order.numel())


def default_text_chunk(device: torch.device) -> int:
    # The torch backend's peak memory grows with images x texts per call (about
    # 3 GB for 1,000 x 100 at L = 23, D = 128 on the CPU): keep calls small there.
    return 1024 if device.type == "cuda" else 100


@torch.no_grad()
def encode_texts(model, words: torch.Tensor, word_mask: torch.Tensor, device, *,
                 precision: str = DEFAULT_PRECISION, text_chunk: Optional[int] = None) -> EncodedTexts:
    """Cached text features words (M, L, Db) float / word_mask (M, L) bool (any device)
    -> :class:`EncodedTexts` on ``device``, chunks of ``text_chunk`` texts of similar length."""
    device = torch.device(device)
    text_chunk = text_chunk or default_text_chunk(device)
    order = torch.argsort(word_mask.sum(1).cpu(), stable=True)
    chunks, vectors = [], []
    with _eval_mode(model), _autocast(precision):
        for start in range(0, order.numel(), text_chunk):
            idx = order[start:start + text_chunk]
            m = word_mask[idx.to(word_mask.device)]
            L = int(m.any(0).nonzero().max()) + 1
            w = words[idx.to(words.device), :L].to(device=device, dtype=torch.float32)
            m = m[:, :L].to(device)
            W = model.encode_texts(w, m)
            chunks.append((W, m))
            vectors.append(model.text_vectors(W, m).float().cpu())
    return EncodedTexts(order, chunks, torch.cat(vectors)[torch.argsort(order)])


@torch.no_grad()
def score_images(model, texts: EncodedTexts, regions, region_mask, globals_, *, backend: str = "auto",
                 precision: str = DEFAULT_PRECISION) -> torch.Tensor:
    """S (n, M) float32 CPU, columns in caption order, for images regions (n, K, Dv),
    region_mask (n, K) bool|None, globals_ (n, Dg)|None on the texts' device."""
    with _eval_mode(model), _autocast(precision):
        V, G = model.encode_images(regions, region_mask, globals_)
        cols = [model.score(V, region_mask, G, W, m, backend=backend).float().cpu() for W, m in texts.chunks]
    return torch.cat(cols, dim=1)[:, torch.argsort(texts.order)]


def score_items(model, regions, region_mask, globals_, words, word_mask, *, backend: str = "auto",
                precision: str = DEFAULT_PRECISION, text_chunk: Optional[int] = None):
    """(S (N, M) float32 CPU, text_vectors (M, D) float32 CPU) for images and texts already
    in memory (the images' device scores). The trainer's validation; same numerics as
    :func:`score_split`."""
    check_precision(precision, regions.device)
    texts = encode_texts(model, words, word_mask, regions.device, precision=precision, text_chunk=text_chunk)
    S = score_images(model, texts, regions, region_mask, globals_, backend=backend, precision=precision)
    return S, texts.vectors


def model_fingerprint(model) -> str:
    """SHA-256 of a model's config and every tensor of its state (a checkpoint's identity)."""
    from .file_digest import tensor_bytes

    h = hashlib.sha256(json.dumps(getattr(model, "config", {}), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_bytes(t))  # the same bytes as ever: saved chunk caches keep their keys
    return h.hexdigest()


def data_fingerprint(folder, split: str) -> list:
    """[name, size, sha256] of each file of the split that exists (``data.scan.SPLIT_FILES``):
    the content, not the times (``cp -p`` keeps an mtime over new bytes), hashed once
    per process and file state (:mod:`acf_fast.file_digest`)."""
    from .data.scan import SPLIT_FILES
    from .file_digest import file_sha256

    out = []
    for name in SPLIT_FILES:
        p = Path(folder) / f"{split}_{name}"
        if p.is_file():
            out.append([p.name, p.stat().st_size, file_sha256(p)])
    return out


def scoring_settings(backend: str, precision: str, device: torch.device, text_chunk: int) -> dict:
    """The settings a split's scores depend on, as its fingerprint and the run's info record them."""
    return {"backend": backend, "precision": precision, "device": device.type, "text_chunk": text_chunk}


def split_fingerprint(model, folder, split: str, settings: dict) -> dict:
    """What a split's scores depend on: ``settings`` (backend, precision, ...), the model's
    weights, the split's files and this package's version (the key of saved results)."""
    import acf_fast

    return dict(settings, model=model_fingerprint(model), data=data_fingerprint(folder, split), split=split,
                version=acf_fast.__version__)


def default_work(checkpoint, split: str) -> Path:
    """The chunk folder of a checkpoint when no ``work`` is given:
    ``<checkpoint folder>/eval_<checkpoint name>_<split>`` (best and last of a run apart)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent / f"eval_{checkpoint.stem}_{split}"


def check_model_fits(model, data, words, checkpoint, folder, split: str) -> None:
    """ValueError naming the checkpoint and the data file when their widths differ."""
    cfg, folder = model.config, Path(folder)
    name = checkpoint if checkpoint is not None else "the model"
    checks = [("region_dim", data.regions.shape[2], f"{split}_ims.npy", "region features")]
    if data.globals is not None:
        checks.append(("global_dim", data.globals.shape[1], f"{split}_glob.npy", "global features"))
    elif cfg["global_dim"] != cfg["region_dim"]:
        checks.append(("global_dim", data.regions.shape[2], f"{split}_ims.npy (no {split}_glob.npy: the mean region)",
                       "global features"))
    checks.append(("text_dim", words.shape[2], f"{split}_words.safetensors", "caption features"))
    for key, have, fname, what in checks:
        if cfg[key] != have:
            raise ValueError(f"{name} expects {what} of width {key} = {cfg[key]} but {folder / fname} has width "
                             f"{have}: this checkpoint was not trained on data of this shape")


@dataclass
class OpenedSplit:
    """What every scorer of a split starts from (:func:`open_split`): the model on
    ``device``, its checkpoint path (None for an instance), the split
    (:func:`acf_fast.data.load_split`) and its encoded captions, words (M, L, Db) and
    word_mask (M, L)."""

    model: torch.nn.Module
    checkpoint: Optional[Path]
    data: object
    words: torch.Tensor
    word_mask: torch.Tensor
    device: torch.device


def open_split(model, folder, split: str, *, backend: str, device, precision: str,
               chunk_images: Optional[int] = None) -> OpenedSplit:
    """The checks and loads that :func:`score_split`, ``stream.stream_split`` and
    ``shortlist.shortlist_split`` share: device, precision and backend checked, the model
    loaded (a checkpoint path, ``ACF.save``) or taken (an ACF instance) and moved to the
    device, the split and its encoded captions loaded and checked against each other and
    against the model's widths (and ``chunk_images``, images encoded at a time, when given).
    ValueError naming the file or option otherwise."""
    from .data import load_encoded, load_split
    from .model import ACF

    if chunk_images is not None and (isinstance(chunk_images, bool) or not isinstance(chunk_images, int)
                                     or chunk_images < 1):
        raise ValueError(f"chunk_images must be a positive int, got {chunk_images!r}")
    dev = resolve_device(device)
    check_precision(precision, dev)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    folder = Path(folder)
    require_folder(folder, "--data")
    checkpoint = None
    if isinstance(model, (str, Path)):
        checkpoint = require_file(model, "--checkpoint")
        model = ACF.load(checkpoint, map_location=str(dev))
    model = model.to(dev)
    data = load_split(folder, split)
    words, word_mask = load_encoded(folder, split)
    if words.shape[0] != data.num_captions:
        raise ValueError(f"{folder}: {words.shape[0]} encoded captions but {data.num_captions} captions in "
                         f"{split}_caps.txt")
    check_model_fits(model, data, words, checkpoint, folder, split)
    return OpenedSplit(model, checkpoint, data, words, word_mask, dev)


@dataclass
class ScoredSplit:
    """S (N, M) float32 CPU tensor (None on the ranks other than 0 of a sharded run), text_vectors (M, D) float32 CPU tensor (the model's
    per-text vectors, for ``embedding`` neighbours), txt2img (M,) int64, and info: how
    it was scored (backend, precision, device, chunks reused / computed, work folder)."""

    S: torch.Tensor
    text_vectors: torch.Tensor
    txt2img: np.ndarray
    info: dict = field(default_factory=dict)


def score_split(
    model,
    folder,
    split: str = "test",
    *,
    work=None,
    backend: str = "auto",
    device="auto",
    precision: str = DEFAULT_PRECISION,
    chunk_images: int = 256,
    text_chunk: Optional[int] = None,
    progress: bool = True,
    on_chunk: Optional[Callable[[int, int], None]] = None,
    group=None,
) -> ScoredSplit:
    """Score a SCAN-layout split (captions encoded by ``acf-fast data encode``) in
    resumable chunks of images.

    Args:
        model: a checkpoint path (``ACF.save``) or an ACF instance (moved to ``device``).
        work: folder of the chunk cache; default :func:`default_work`,
            ``<checkpoint folder>/eval_<checkpoint name>_<split>`` (required with an instance).
        backend: ``acf_similarity`` backend. device: "auto", "cpu", "cuda", ...
        precision: one of PRECISIONS (see the module docstring).
        on_chunk: called with (start, stop) after each newly computed chunk is saved.
        group: :class:`acf_fast.sharded.Ranks` of a ``torchrun`` process group (from
            :func:`acf_fast.sharded.ranks`): every rank calls this, scores its share of
            the chunks, and rank 0 alone gets S; the other ranks get ``S = None``.
            None or one rank: this process scores everything.
    """
    if work is None and not isinstance(model, (str, Path)):
        raise ValueError("score_split of a model instance needs work= (the folder of its chunk cache)")
    opened = open_split(model, folder, split, backend=backend, device=device, precision=precision,
                        chunk_images=chunk_images)
    model, data, dev = opened.model, opened.data, opened.device
    words, word_mask, M = opened.words, opened.word_mask, opened.data.num_captions
    work = Path(work) if work is not None else default_work(opened.checkpoint, split)
    text_chunk = text_chunk or default_text_chunk(dev)
    settings = scoring_settings(backend, precision, dev, text_chunk)
    cache = ChunkCache(work, split_fingerprint(model, folder, split, settings), (data.num_images, M),
                       chunk_rows=chunk_images)
    texts = encode_texts(model, words, word_mask, dev, precision=precision, text_chunk=text_chunk)

    def rows(a: int, b: int) -> torch.Tensor:
        regions, rmask, glob = image_tensors(data, slice(a, b), dev)
        return score_images(model, texts, regions, rmask, glob, backend=backend, precision=precision)

    if group is not None and group.enabled:
        from .sharded import fill_sharded

        S, info = fill_sharded(cache, rows, group, progress=progress, desc=f"score {split}", on_chunk=on_chunk)
    else:
        S, info = cache.fill(rows, progress=progress, desc=f"score {split}", on_chunk=on_chunk)
        info["ranks"] = 1
    return ScoredSplit(None if S is None else torch.from_numpy(S), texts.vectors,
                       np.asarray(data.txt2img, dtype=np.int64), dict(info, **settings, split=split))
