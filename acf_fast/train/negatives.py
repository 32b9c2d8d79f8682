"""Asymmetry-I negatives (spec §6): perturb the token embeddings of a text batch.

Where they act (spec §6), never on the encoder output Hb itself:
    - frozen encoder, cached Hb (the default; the authors' code): on the projected
      word features P = Hb Wt + bt, before any l2norm (``ACF.project_texts``), so a
      cut token is a zero word vector and the noise is on the scale of W;
    - encoder in the loop (``--finetune``; the paper): on BERT's input embeddings.
Only valid non-special tokens change: the first valid token ([CLS]) and the last
valid token ([SEP]) of each row and the padding stay as they are.

Kinds (``NEGATIVE_KINDS``):
    gaussian        x + N(0, sigma²), sigma = 0.1  [spec choice; authors σ = 1 on W]
    shuffle         the inner wordpieces permuted BEFORE the encoder: the caller
                    passes the encoded shuffled texts (``shuffled``), cached once with
                    a frozen encoder (``data.encode_split(shuffle_seed=...)``) or
                    embedded per access in the loop. Permuting rows of cached features
                    would change nothing: ACF's score is a function of the SET of word
                    rows (no positional term after the encoder).
    token_cutoff    one valid non-special token row zeroed
    feature_cutoff  one feature column zeroed on the valid non-special tokens
    cutoff          token_cutoff or feature_cutoff, one of the two per sample
    dropout         element dropout with p = 0.1 on valid non-special tokens,
                    survivors scaled by 1/(1-p) as ``F.dropout`` does
    mixture         one of the four families gaussian / shuffle / cutoff / dropout
                    per sample (the spec's "one of the four"; cutoff then picks
                    token or feature cutoff) [choice]

A text with nothing to perturb (no inner token; for shuffle fewer than two distinct
inner wordpieces) comes back as itself, and ``make_negatives`` reports it in
``changed`` so the loss can leave that copy of the caption out (``loss.py``).

Every random draw comes from the caller's ``torch.Generator`` (a CPU generator;
draws are made on the CPU and moved), so a run is reproducible and resumable.
All operations are differentiable with respect to ``x`` (needed in the loop).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

NEGATIVE_KINDS = ("gaussian", "shuffle", "token_cutoff", "feature_cutoff", "cutoff", "dropout", "mixture")
# The CLI's --negatives choices (spec / issue wording).
CLI_NEGATIVE_KINDS = ("gaussian", "shuffle", "cutoff", "dropout", "mixture")
_FAMILIES = ("gaussian", "shuffle", "cutoff", "dropout")

GAUSSIAN_SIGMA = 0.1
DROPOUT_P = 0.1


def uses_shuffle(kind: Optional[str]) -> bool:
    """True when negatives of ``kind`` need the shuffled texts."""
    return kind in ("shuffle", "mixture")


def perturbable_mask(mask: torch.Tensor) -> torch.Tensor:
    """Valid non-special tokens: mask (B, L) bool -> (B, L) bool.

    [CLS] is the first valid token and [SEP] the last valid token of each row
    (right or left padding alike)."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a (B, L) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
    B, L = mask.shape
    inner = mask.clone()
    has = mask.any(1)
    rows = torch.arange(B, device=mask.device)[has]
    first = mask.int().argmax(1)[has]
    last = (L - 1 - mask.flip(1).int().argmax(1))[has]
    inner[rows, first] = False
    inner[rows, last] = False
    return inner


def _rand(shape, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=gen).to(device)


def _pick_one(inner: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One uniformly chosen True position per row (B,) long; rows without any get 0 (unused)."""
    keys = _rand(inner.shape, gen, inner.device).masked_fill(~inner, -1.0)
    return keys.argmax(1)


def gaussian(x, inner, gen, sigma=GAUSSIAN_SIGMA):
    noise = torch.randn(x.shape, generator=gen).to(device=x.device, dtype=x.dtype)
    return x + sigma * noise * inner[..., None].to(x.dtype)


def token_cutoff(x, inner, gen):
    pick = _pick_one(inner, gen)
    hit = torch.zeros_like(inner)
    has = inner.any(1)
    hit[torch.arange(inner.shape[0], device=x.device)[has], pick[has]] = True
    return x * (~hit)[..., None].to(x.dtype)


def feature_cutoff(x, inner, gen):
    B, L, D = x.shape
    col = (torch.rand(B, generator=gen) * D).long().clamp_(max=D - 1).to(x.device)
    colmask = torch.nn.functional.one_hot(col, D).bool()  # (B, D)
    zero = inner[..., None] & colmask[:, None, :]
    return x * (~zero).to(x.dtype)


def cutoff(x, inner, gen):
    use_token = _rand((x.shape[0],), gen, x.device) < 0.5
    return torch.where(use_token[:, None, None], token_cutoff(x, inner, gen), feature_cutoff(x, inner, gen))


def dropout(x, inner, gen, p=DROPOUT_P):
    keep = (_rand(x.shape, gen, x.device) >= p).to(x.dtype) / (1.0 - p)
    factor = torch.where(inner[..., None], keep, torch.ones_like(keep))
    return x * factor


_OPS = {
    "gaussian": gaussian,
    "token_cutoff": token_cutoff,
    "feature_cutoff": feature_cutoff,
    "cutoff": cutoff,
    "dropout": dropout,
}


def make_negatives(x: torch.Tensor, mask: torch.Tensor, kind: str, gen: torch.Generator,
                   inner: Optional[torch.Tensor] = None, shuffled: Optional[torch.Tensor] = None,
                   shuffled_changed: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Perturb token embeddings into negatives.

    Args:
        x: (B, L, D) float token embeddings (projected features P or inputs_embeds).
        mask: (B, L) bool, True at valid tokens ([CLS] and [SEP] included).
        kind: one of ``NEGATIVE_KINDS``.
        gen: CPU ``torch.Generator`` supplying every random draw.
        inner: optional precomputed ``perturbable_mask(mask)``.
        shuffled: (B, L, D) the same texts with their inner wordpieces shuffled before
            the encoder, in x's space (same mask); required by "shuffle" and "mixture".
        shuffled_changed: (B,) bool, False where the shuffle left the text as it was
            (None: all True).

    Returns:
        (negatives (B, L, D) of x's dtype and device, changed (B,) bool): rows
        outside the valid non-special tokens equal x exactly (the shuffled rows come
        from ``shuffled``); changed is False for a text returned as itself.
    """
    if kind not in NEGATIVE_KINDS:
        raise ValueError(f"negatives kind must be one of {NEGATIVE_KINDS}, got {kind!r}")
    if x.dim() != 3 or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"x must be (B, L, D) and mask (B, L); got {tuple(x.shape)} and {tuple(mask.shape)}")
    B = x.shape[0]
    if uses_shuffle(kind):
        if shuffled is None or tuple(shuffled.shape) != tuple(x.shape):
            raise ValueError(
                f"negatives {kind!r} need shuffled: the texts shuffled BEFORE the encoder, shape {tuple(x.shape)} "
                f"(got {None if shuffled is None else tuple(shuffled.shape)}); shuffling encoded rows is a no-op for ACF")
        if shuffled_changed is None:
            shuffled_changed = torch.ones(B, dtype=torch.bool)
        shuffled_changed = shuffled_changed.to(device=x.device, dtype=torch.bool)
    if inner is None:
        inner = perturbable_mask(mask)
    if kind == "shuffle":
        return shuffled.to(x.dtype), shuffled_changed.clone()
    if kind != "mixture":
        out = _OPS[kind](x, inner, gen)
        return out, (out != x).flatten(1).any(1)
    choice = (torch.rand(B, generator=gen) * len(_FAMILIES)).long().clamp_(max=len(_FAMILIES) - 1).to(x.device)
    out = x
    for f, fam in enumerate(_FAMILIES):
        rows = choice == f
        if bool(rows.any()):
            y = shuffled.to(x.dtype) if fam == "shuffle" else _OPS[fam](x, inner, gen)
            out = torch.where(rows[:, None, None], y, out)
    took_shuffle = choice == _FAMILIES.index("shuffle")
    return out, torch.where(took_shuffle, shuffled_changed, (out != x).flatten(1).any(1))
