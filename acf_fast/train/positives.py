"""Asymmetry-II positives (spec §6): new texts generated from the raw caption.

    long   the caption followed by another caption of the same image
    short  the first half of the caption's words (at least one word; authors)
    both   per sample, long or short (the default mixture)

Positives need the text encoder. With a frozen encoder they are built ONCE for
the whole training split (one long partner per caption drawn from a seeded
generator, the short form being deterministic) and encoded once through the same
on-disk encode cache as the captions (``acf_fast.data.encode_split``), so a rerun
or another ablation row reuses them. The per-sample long/short choice of ``both``
is drawn in the training loop from the step generator.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np

POSITIVE_KINDS = ("long", "short", "both")


def short_positive(caption: str) -> str:
    """First half of the words (floor, at least one word)."""
    words = caption.split()
    if not words:
        return caption
    return " ".join(words[: max(1, len(words) // 2)])


def long_partners(txt2img: Sequence[int], seed: int) -> np.ndarray:
    """For each caption t, another caption of its image (int64 (M,)).

    Drawn uniformly among the image's other captions with a seeded numpy
    generator; a caption whose image has no other caption is paired with itself
    (the positive then repeats the caption) [choice]."""
    txt2img = np.asarray(txt2img, dtype=np.int64)
    rng = np.random.default_rng(seed)
    order = np.argsort(txt2img, kind="stable")
    bounds = np.flatnonzero(np.diff(txt2img[order])) + 1
    partners = np.arange(len(txt2img), dtype=np.int64)
    for group in np.split(order, bounds):
        if len(group) < 2:
            continue
        for i, t in enumerate(group):
            j = rng.integers(len(group) - 1)
            partners[t] = group[j + (j >= i)]
    return partners


def long_positives(captions: Sequence[str], partners: np.ndarray) -> List[str]:
    return [f"{captions[t].rstrip()} {captions[int(p)].strip()}" for t, p in enumerate(partners)]


def build_positive_texts(captions: Sequence[str], txt2img: Sequence[int], seed: int) -> dict:
    """{"long": [...], "short": [...]} one positive of each kind per caption."""
    if len(captions) != len(txt2img):
        raise ValueError(f"captions ({len(captions)}) and txt2img ({len(txt2img)}) must have the same length")
    return {
        "long": long_positives(captions, long_partners(txt2img, seed)),
        "short": [short_positive(c) for c in captions],
    }
