"""``acf_similarity``: the functional interface of spec §3 that every backend implements.

    S = acf_similarity(V, v_mask, W, w_mask, heads=8, scale=(s_i2t, s_t2i),
                       u1=0.5, u2=0.8, weights=None, G=None, global_emb=None,
                       backend="auto")

Backends: ``eager`` (per-pair PyTorch, the baseline), ``torch`` (spec §8 algebra,
batched and chunked: the CPU fast path), ``triton`` (fused kernels), ``auto``
(triton on CUDA tensors, torch on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch

from .validate import check_similarity_inputs

BACKENDS = ("auto", "eager", "torch", "triton")


@dataclass(frozen=True)
class Variant:
    """Hyper-parameters of one model variant (spec §3 table)."""

    name: str
    learned_projections: bool  # z_x, z_y, z_o learned (paper) or identity (acf-code)
    scale: Optional[Tuple[float, float]]  # None = 1/sqrt(d) both ways
    global_mode: str  # "pairwise" or "embeddings"
    u1: float = 0.5
    u2: float = 0.8


VARIANTS = {
    "paper": Variant("paper", True, None, "pairwise"),
    "acf-code": Variant("acf-code", False, (4.0, 9.0), "embeddings"),
}


def acf_similarity(
    V: torch.Tensor,
    v_mask: Optional[torch.Tensor],
    W: torch.Tensor,
    w_mask: Optional[torch.Tensor],
    *,
    heads: int = 8,
    scale: Optional[Tuple[float, float]] = None,
    u1: float = 0.5,
    u2: float = 0.8,
    weights: Optional[Mapping[str, torch.Tensor]] = None,
    G: Optional[torch.Tensor] = None,
    global_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Score every (image, text) pair with ACF (spec §3).

    Args:
        V: (N, K, D) region features; float16, bfloat16, float32 or float64.
        v_mask: (N, K) bool, True at valid regions, or None (all valid).
        W: (M, L, D) word features, same dtype and device as V.
        w_mask: (M, L) bool, True at valid tokens, or None.
        heads: H; D must be divisible by it.
        scale: (s_i2t, s_t2i) softmax scales; None means 1/sqrt(D/H) both ways.
        u1: weight of the region->word term inside the local score (eq. 13).
        u2: weight of the local score against the global one (eq. 15).
        weights: any of z_x z_y z_o x_w x_v x_g (D, D) and gate (D,); a missing
            matrix is the identity, a missing gate is 0 (sigmoid 0.5).
        G: (N, D) global image features -> pairwise global score (paper).
        global_emb: (Gi (N, E), Gt (M, E)) -> global score Gi·Gtᵀ (authors' code).
        backend: "auto", "eager", "torch" or "triton".

    Returns:
        S (N, M), float32 (float64 when V is float64, so the eager form can serve
        as a float64 reference for gradients).
    """
    v_mask, w_mask, backend, kwargs = checked_call(V, v_mask, W, w_mask, heads=heads, scale=scale, u1=u1, u2=u2,
                                                   weights=weights, G=G, global_emb=global_emb, backend=backend)
    if backend == "eager" and V.dtype != torch.float64:
        _check_magnitudes(V, v_mask, W, w_mask, G, backend)
    if backend == "eager":
        from .eager import eager_similarity

        return eager_similarity(V, v_mask, W, w_mask, **kwargs)
    if backend == "torch":
        from .fused_torch import torch_similarity

        return torch_similarity(V, v_mask, W, w_mask, **kwargs)
    from .kernels.similarity import triton_similarity

    return triton_similarity(V, v_mask, W, w_mask, **kwargs)


def checked_call(V, v_mask, W, w_mask, *, heads, scale, u1, u2, weights, G, global_emb, backend):
    """The checks and defaults every scoring entry point (:func:`acf_similarity`,
    ``acf_fast.pairs.acf_similarity_pairs``) starts with: (v_mask, w_mask, the backend with
    "auto" resolved, the backend's keyword arguments), or ValueError naming the argument."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    v_mask, w_mask, weights, scale = check_similarity_inputs(
        V, v_mask, W, w_mask, heads=heads, scale=scale, u1=u1, u2=u2, weights=weights, G=G, global_emb=global_emb
    )
    if backend == "auto":
        backend = "triton" if V.is_cuda else "torch"
    kwargs = dict(heads=heads, scale=scale, u1=float(u1), u2=float(u2), weights=weights, G=G, global_emb=global_emb)
    return v_mask, w_mask, backend, kwargs


# Largest c_v c_w (see fused_torch.magnitude_scales) the eager backend takes in float32
# or lower: its ‖x‖² and Gram forms overflow past ~1e18 (it returned 0 for V x 1e20;
# issue 14). 2^40 leaves a wide margin below that for D and weights; the model's
# features are at most ~10. The torch and Triton backends rescale exactly instead.
MAX_UNSCALED = 2.0 ** 40


def _check_magnitudes(V, v_mask, W, w_mask, G, backend: str) -> None:
    """ValueError when the inputs are too large for ``backend`` to score in float32."""
    from .fused_torch import magnitude_scales

    c_v, c_w = magnitude_scales(V, v_mask, W, w_mask, G)
    if c_v * c_w > MAX_UNSCALED:
        raise ValueError(
            f"V (and G) reach |x| ~ {c_v:.3g} and W |x| ~ {c_w:.3g}: too large for backend={backend!r}, whose float32 "
            f"norms overflow (product above {MAX_UNSCALED:.3g}); use backend='torch', which rescales exactly, or "
            "scale the features down")
