"""The spec's notation, one definition each (ACF_SPEC.md, "Notation").

    R(x, y)    = x·y / max(‖x‖‖y‖, 1e-8)      cosine, :func:`cosine`
    l2norm(x)  = x / max(‖x‖, 1e-8)           :func:`l2norm`
    every mean is over VALID rows only         :func:`masked_mean`

The reference, the eager and torch backends and the model use these; the fused
algebra gets ‖x‖² and ‖y‖² from Gram quadratic forms, so the cosine is defined from
its parts (:func:`cosine_from_squares`) and :func:`cosine` is that with the parts
computed directly. (The Triton kernel applies the same clamp in its own code.)
"""
from __future__ import annotations

from typing import Optional

import torch

EPS = 1e-8


def cosine_from_squares(dot: torch.Tensor, sq_x: torch.Tensor, sq_y: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """R from its parts: x·y, ‖x‖², ‖y‖² (broadcastable) -> x·y / max(‖x‖‖y‖, eps).

    The clamp is applied to ‖x‖²‖y‖² at eps², the same bound; below it the
    gradient does not flow into the norms, so a zero row keeps a finite gradient
    (a sqrt of each square would give 0·∞ = NaN there). In float32 ‖x‖‖y‖ must stay
    below ~1e19 for the product of squares to be finite: a caller with larger inputs
    scales x by a and y by b first and passes eps / (a b), which gives the same R
    (the torch backend does, see ``fused_torch.magnitude_scales``). eps² is kept at
    least the dtype's smallest normal number: a rescaled eps² can underflow to 0, and
    a zero row would then give 0 · rsqrt(0) = NaN.
    """
    floor = max(eps * eps, torch.finfo(sq_x.dtype).tiny)
    return dot * torch.rsqrt(torch.clamp(sq_x * sq_y, min=floor))


def cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """R(x, y) along the last dim: x, y (..., D) broadcastable -> (...)."""
    return cosine_from_squares((x * y).sum(-1), (x * x).sum(-1), (y * y).sum(-1))


def l2norm(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / max(‖x‖, 1e-8) along ``dim`` (spec notation), any shape and float dtype.

    Gradient: exact where ‖x‖ > 1e-8; ZERO inside the clamp (zero rows). The clamped
    form x / 1e-8 has a Jacobian of I / 1e-8 there, and a zero row is legitimate input
    (spec §1: a white-background CNN cell or a padded region meets a zero-initialised
    bias): its 1e8 gradient, times the cosine's own 1e8 on the zero row that follows,
    put ~1e15 into region_fc.bias on the first step (issue 12). A zero vector has no
    direction, so it is treated as a constant: the row stays out of learning until
    the bias moves it off zero, which the other rows' gradients do on the first step.
    """
    norm = x.norm(dim=dim, keepdim=True)
    off_zero = norm > EPS
    safe = torch.where(off_zero, norm, torch.ones_like(norm))
    return torch.where(off_zero, x / safe, (x / EPS).detach())


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over dim 1 of the rows where ``mask`` (n, r) bool is True (all rows when None).

    x: (n, r) or (n, r, C) -> (n,) or (n, C). A row with no valid entry gives 0 (its
    count is clamped at 1), never NaN; ``acf_similarity`` refuses such items anyway.
    """
    if mask is None:
        return x.mean(1)
    m = mask.to(x.dtype).reshape(mask.shape + (1,) * (x.dim() - 2))
    return (x * m).sum(1) / torch.clamp(m.sum(1), min=1.0)
