"""Input checks (spec §9: bad input is refused, never propagated): the arguments of
``acf_similarity``, and the caption -> image map ``txt2img`` of the evaluator and the
re-ranker (one validator for both).

Every error is a ``ValueError`` that names the argument and says what was expected.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MATRIX_WEIGHTS = ("z_x", "z_y", "z_o", "x_w", "x_v", "x_g")
VECTOR_WEIGHTS = ("gate",)
WEIGHT_NAMES = MATRIX_WEIGHTS + VECTOR_WEIGHTS


def is_real(x) -> bool:
    """A real number: int or float (numpy's too), not a bool, str or None."""
    return not isinstance(x, (bool, np.bool_)) and isinstance(x, (int, float, np.integer, np.floating))


def check_finite(name: str, t: torch.Tensor) -> None:
    """Refuse NaN or Inf anywhere in ``t``."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf; clean the input before scoring")


def check_features(name: str, x, ndim: int = 3) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); need at least one item, row and feature")
    check_finite(name, x)
    return x


def check_mask(name: str, mask, shape, device, what: str) -> Optional[torch.Tensor]:
    """A boolean (items, rows) mask with at least one True per item, or None (all valid)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must have dtype torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the features are on {device}")
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        first = int(empty.nonzero()[0, 0])
        raise ValueError(f"{name}: {what} {first} has no valid entry; every item needs at least one")
    return mask


def check_weights(weights: Optional[Mapping[str, torch.Tensor]], D: int, device) -> dict:
    if weights is None:
        return {}
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a mapping of name -> tensor, got {type(weights).__name__}")
    out = {}
    for key, value in weights.items():
        if key not in WEIGHT_NAMES:
            raise ValueError(f"weights has unknown key {key!r}; expected any of {', '.join(WEIGHT_NAMES)}")
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.dtype not in FLOAT_DTYPES:
            raise ValueError(f"weights[{key!r}] must be a floating torch.Tensor")
        want = (D,) if key in VECTOR_WEIGHTS else (D, D)
        if tuple(value.shape) != want:
            raise ValueError(f"weights[{key!r}] must have shape {want}, got {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"weights[{key!r}] is on {value.device} but the features are on {device}")
        check_finite(f"weights[{key!r}]", value)
        out[key] = value
    return out


def check_similarity_inputs(V, v_mask, W, w_mask, *, heads, scale, u1, u2, weights, G, global_emb):
    """Validate the arguments of ``acf_similarity``; returns normalised (v_mask, w_mask, weights, scale)."""
    check_features("V", V)
    check_features("W", W)
    N, K, D = V.shape
    M, L, Dw = W.shape
    if Dw != D:
        raise ValueError(f"W has width {Dw} but V has width {D}; both must be (.., .., D) with the same D")
    if V.device != W.device:
        raise ValueError(f"V is on {V.device} and W on {W.device}; put them on one device")
    if V.dtype != W.dtype:
        raise ValueError(f"V is {V.dtype} and W is {W.dtype}; give both the same dtype")
    if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if D % heads:
        raise ValueError(f"D = {D} is not divisible by heads = {heads}; the head width D / heads must be whole")
    v_mask = check_mask("v_mask", v_mask, (N, K), V.device, "image")
    w_mask = check_mask("w_mask", w_mask, (M, L), W.device, "text")
    if scale is None:
        s = 1.0 / (D // heads) ** 0.5
        scale = (s, s)
    if not isinstance(scale, (tuple, list)) or len(scale) != 2 or not all(map(is_real, scale)):
        raise ValueError(f"scale must be a pair (s_i2t, s_t2i) of numbers (or None), got {scale!r}")
    scale = (float(scale[0]), float(scale[1]))
    for name, val in (("scale[0]", scale[0]), ("scale[1]", scale[1]), ("u1", u1), ("u2", u2)):
        if not is_real(val) or not np.isfinite(float(val)):
            raise ValueError(f"{name} must be finite (a real number), got {val!r}")
    weights = check_weights(weights, D, V.device)
    if G is not None and global_emb is not None:
        raise ValueError("give G (pairwise global score) or global_emb (embedding global score), not both")
    if G is not None:
        if not isinstance(G, torch.Tensor) or G.dim() != 2 or tuple(G.shape) != (N, D):
            raise ValueError(f"G must be a tensor of shape (N, D) = {(N, D)}, got {getattr(G, 'shape', type(G).__name__)}")
        if G.device != V.device:
            raise ValueError(f"G is on {G.device} but V is on {V.device}")
        check_finite("G", G)
    if global_emb is not None:
        if not isinstance(global_emb, (tuple, list)) or len(global_emb) != 2:
            raise ValueError("global_emb must be a pair (Gi (N, E), Gt (M, E))")
        Gi, Gt = global_emb
        for nm, t, n in (("global_emb[0] (Gi)", Gi, N), ("global_emb[1] (Gt)", Gt, M)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] != n:
                raise ValueError(f"{nm} must be a 2-D tensor with {n} rows, got {getattr(t, 'shape', type(t).__name__)}")
            if t.device != V.device:
                raise ValueError(f"{nm} is on {t.device} but V is on {V.device}")
            check_finite(nm, t)
        if Gi.shape[1] != Gt.shape[1]:
            raise ValueError(f"global_emb widths differ: Gi has {Gi.shape[1]} columns, Gt has {Gt.shape[1]}")
    if G is None and global_emb is None and float(u2) != 1.0:
        raise ValueError(f"u2 = {u2} weights a global score, but neither G nor global_emb was given; pass one or set u2=1")
    return v_mask, w_mask, weights, scale


def check_txt2img(txt2img, N: Optional[int] = None, M: Optional[int] = None, name: str = "txt2img") -> torch.Tensor:
    """The image of each caption, checked: (M,) int64 on ``txt2img``'s device (CPU for arrays and lists).

    Args:
        txt2img: 1-D integer tensor, array or list; None means caption t -> image t // 5
            (COCO, Flickr30K), which needs N and M == 5 N.
        N: the number of images when known: ids must lie in [0, N) and every image needs
            a caption (else its I2T rank is undefined). Without N, ids must be >= 0.
        M: the number of texts when known (the length txt2img must have).
    """
    if txt2img is None:
        if N is None or M is None:
            raise ValueError(f"{name} is needed: one image id per caption")
        if M != 5 * N:
            raise ValueError(
                f"{name} not given and S has {M} texts for {N} images; the default (caption t -> image t // 5) "
                f"needs exactly 5 per image ({5 * N} texts): pass {name}"
            )
        return torch.arange(M) // 5
    if isinstance(txt2img, (list, tuple)):
        txt2img = np.asarray(txt2img)
    if isinstance(txt2img, np.ndarray):
        if not np.issubdtype(txt2img.dtype, np.integer):
            raise ValueError(f"{name} must hold integer image ids, got dtype {txt2img.dtype}")
        txt2img = torch.from_numpy(np.ascontiguousarray(txt2img, dtype=txt2img.dtype.newbyteorder("=")))
    if not isinstance(txt2img, torch.Tensor) or txt2img.dtype.is_floating_point or txt2img.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D array of integer image ids")
    if txt2img.dim() != 1 or (M is not None and txt2img.numel() != M):
        want = f"({M},)" if M is not None else "(M,)"
        raise ValueError(f"{name} must have one image id per text: shape {want}, got {tuple(txt2img.shape)}")
    if txt2img.numel() == 0:
        raise ValueError(f"{name} is empty: need at least one caption")
    txt2img = txt2img.long()
    lo, hi = int(txt2img.min()), int(txt2img.max())
    if N is None and lo < 0:
        raise ValueError(f"{name} holds negative image ids (min {lo})")
    if N is not None:
        if lo < 0 or hi >= N:
            raise ValueError(f"{name} holds image ids in [{lo}, {hi}] but S has {N} images (ids 0..{N - 1})")
        counts = torch.bincount(txt2img, minlength=N)
        if bool((counts == 0).any()):
            first = int((counts == 0).nonzero()[0, 0])
            raise ValueError(f"{name}: image {first} has no caption ({int((counts == 0).sum())} images without any)")
    return txt2img
