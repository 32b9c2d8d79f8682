"""Asymmetry-I negatives (spec §6): perturb token embeddings of a text batch.

They act on token embeddings: the cached word features Hb (M, L, Db) of a frozen
encoder (the authors' code, default on CPU), or BERT's ``inputs_embeds`` when the
encoder runs in the loop (the paper). Only valid non-special tokens change: the
first valid token ([CLS]) and the last valid token ([SEP]) of each row and the
padding stay as they are. A text with no valid non-special token is returned
unchanged (nothing can be perturbed without touching the specials).

Kinds (``NEGATIVE_KINDS``):
    gaussian        x + N(0, sigma²), sigma = 0.1  [spec choice; authors σ = 1 on W]
    shuffle         the valid non-special token rows permuted
    token_cutoff    one valid non-special token row zeroed
    feature_cutoff  one feature column zeroed on the valid non-special tokens
    cutoff          token_cutoff or feature_cutoff, one of the two per sample
    dropout         element dropout with p = 0.1 on valid non-special tokens,
                    survivors scaled by 1/(1-p) as ``F.dropout`` does
    mixture         one of the four families gaussian / shuffle / cutoff / dropout
                    per sample (the spec's "one of the four"; cutoff then picks
                    token or feature cutoff) [choice]

Note: ACF's score is a function of the SET of word rows (attention and means are
permutation invariant), so ``shuffle`` on cached features of a frozen encoder
yields S(I, T⁻) = S(I, T) up to rounding: a no-op negative (its α is decided by
rounding noise). It only bites in the loop, where BERT's position embeddings
turn a shuffled input into different features.

With cached features the trainer takes a token cut by ``token_cutoff`` out of
the mask (see ``objective.Objective``): a zero feature row maps to W = l2norm(bias),
singular while the bias is near zero. In the loop the zeroed input embedding still
gets BERT's position embeddings, as in the cutoff paper.

Every random draw comes from the caller's ``torch.Generator`` (a CPU generator;
draws are made on the CPU and moved), so a run is reproducible and resumable.
All operations are differentiable with respect to ``x`` (needed in the loop).
"""
from __future__ import annotations

from typing import Optional

import torch

NEGATIVE_KINDS = ("gaussian", "shuffle", "token_cutoff", "feature_cutoff", "cutoff", "dropout", "mixture")
# The CLI's --negatives choices (spec / issue wording).
CLI_NEGATIVE_KINDS = ("gaussian", "shuffle", "cutoff", "dropout", "mixture")
_FAMILIES = ("gaussian", "shuffle", "cutoff", "dropout")

GAUSSIAN_SIGMA = 0.1
DROPOUT_P = 0.1


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


def shuffle(x, inner, gen):
    # Per-row permutation of the inner positions: sort random keys among inner
    # positions only, so outer positions (specials, padding) map to themselves.
    B, L = inner.shape
    keys = _rand((B, L), gen, x.device)
    pos = torch.arange(L, device=x.device).expand(B, L)
    src = pos.clone()
    for b in range(B):  # B is a batch (64): a short loop, kept simple on purpose
        idx = inner[b].nonzero().squeeze(1)
        if idx.numel() > 1:
            src[b, idx] = idx[keys[b, idx].argsort()]
    return torch.gather(x, 1, src[..., None].expand_as(x))


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
    "shuffle": shuffle,
    "token_cutoff": token_cutoff,
    "feature_cutoff": feature_cutoff,
    "cutoff": cutoff,
    "dropout": dropout,
}


def make_negatives(x: torch.Tensor, mask: torch.Tensor, kind: str, gen: torch.Generator,
                   inner: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Perturb token embeddings into negatives.

    Args:
        x: (B, L, D) float token embeddings (cached encoder features or inputs_embeds).
        mask: (B, L) bool, True at valid tokens ([CLS] and [SEP] included).
        kind: one of ``NEGATIVE_KINDS``.
        gen: CPU ``torch.Generator`` supplying every random draw.
        inner: optional precomputed ``perturbable_mask(mask)``.

    Returns:
        (B, L, D) tensor of x's dtype and device; rows outside the valid
        non-special tokens equal x exactly.
    """
    if kind not in NEGATIVE_KINDS:
        raise ValueError(f"negatives kind must be one of {NEGATIVE_KINDS}, got {kind!r}")
    if x.dim() != 3 or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"x must be (B, L, D) and mask (B, L); got {tuple(x.shape)} and {tuple(mask.shape)}")
    if inner is None:
        inner = perturbable_mask(mask)
    if kind != "mixture":
        return _OPS[kind](x, inner, gen)
    choice = (torch.rand(x.shape[0], generator=gen) * len(_FAMILIES)).long().clamp_(max=len(_FAMILIES) - 1)
    out = x
    for f, fam in enumerate(_FAMILIES):
        rows = (choice == f).to(x.device)
        if bool(rows.any()):
            out = torch.where(rows[:, None, None], _OPS[fam](x, inner, gen), out)
    return out
