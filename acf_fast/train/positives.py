"""Asymmetry-II positives (spec §6): new texts generated from the raw caption.

    long   the caption followed by another caption of the same image, the partner
           redrawn uniformly at every access (as the authors' code does)
    short  the first half of the caption's words (at least one word; authors)
    both   per sample, long or short (the default mixture)

With a frozen encoder positives are encoded ONCE through the same on-disk cache as
the captions (``acf_fast.data.encode_split``): the short form of every caption, and
the long form for EVERY (caption, partner) pair of an image (``LongPairs``: 4 per
caption with 5 captions per image), so a per-access redraw is a row lookup. Nothing
in them depends on the training seed, so every run and ablation row on a data folder
shares the cache. In the loop (fine-tuned encoder) the texts are built per access.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch

POSITIVE_KINDS = ("long", "short", "both")


def short_positive(caption: str) -> str:
    """First half of the words (floor, at least one word)."""
    words = caption.split()
    if not words:
        return caption
    return " ".join(words[: max(1, len(words) // 2)])


def long_positive(caption: str, partner: str) -> str:
    return f"{caption.rstrip()} {partner.strip()}"


@dataclass(frozen=True)
class LongPairs:
    """Every (caption, partner) pair of the long positive, in caption order.

    pairs (P, 2) int64: [caption t, partner p], p another caption of t's image; a
        caption whose image has no other caption is paired with itself (the positive
        then repeats the caption) [choice].
    start (M,) int64, count (M,) int64: caption t's pairs are rows
        start[t] .. start[t] + count[t] - 1, partners in caption order.
    """

    pairs: np.ndarray
    start: np.ndarray
    count: np.ndarray

    @classmethod
    def build(cls, txt2img: Sequence[int]) -> "LongPairs":
        txt2img = np.asarray(txt2img, dtype=np.int64)
        members = {}
        for t, i in enumerate(txt2img.tolist()):
            members.setdefault(i, []).append(t)
        pairs: List[List[int]] = []
        start = np.zeros(len(txt2img), dtype=np.int64)
        count = np.zeros(len(txt2img), dtype=np.int64)
        for t, i in enumerate(txt2img.tolist()):
            others = [p for p in members[i] if p != t] or [t]
            start[t], count[t] = len(pairs), len(others)
            pairs += [[t, p] for p in others]
        return cls(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), start, count)

    def draw(self, captions: np.ndarray, gen: torch.Generator) -> np.ndarray:
        """One uniformly drawn pair row per caption index (int64 (B,)); B draws from ``gen``."""
        captions = np.asarray(captions, dtype=np.int64)
        u = torch.rand(len(captions), generator=gen, dtype=torch.float64).numpy()
        slot = np.minimum((u * self.count[captions]).astype(np.int64), self.count[captions] - 1)
        return self.start[captions] + slot

    def texts(self, captions: Sequence[str]) -> List[str]:
        """The long positive text of every pair row."""
        return [long_positive(captions[t], captions[p]) for t, p in self.pairs.tolist()]
