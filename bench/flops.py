"""Operation counts of spec §8, written next to the benchmarks (as the Triton tutorial does).

Per (image, text) pair, with K valid regions, L valid words, width D, H heads,
multiply-adds of the restructured (fused) computation:

    paper    ≈ 4·K·L·D + K·(H·L)² + L·(H·K)² + (H·K + H·L)·D
               (logits + numerators of both directions, the two Gram-matrix
                quadratic forms ‖w*_i‖² = a Γw aᵀ and ‖v*_j‖², the global D-vectors)
    acf-code ≈ 2·K·L·D + K·H·L² + L·H·K²
               (z_o = identity: Γ is block diagonal, H blocks of L×L / K×K)

FLOPs = 2 × MACs. At K=36, L=32, D=1024, H=8 this gives 10.3 M / 3.0 M MACs per pair
(spec §8). Per-item work (the projections V z_x, …, done once per item) is not
counted: it is O((N+M)·D²), negligible next to the N·M pair terms at retrieval
sizes, and the eager baseline does it per pair, which is the point of fusing.

We count the USEFUL work: each pair with its own valid K_i and L_j, not the padded
tile sizes a kernel may actually process. Because the per-pair count is a
polynomial in K and L, the sum over all N·M pairs needs only power sums of the
K_i and L_j (no N×M array, so the COCO 5K × 25K grid costs nothing to count).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

VARIANT_NAMES = ("paper", "acf-code")


def pair_macs(K: float, L: float, D: int, H: int, variant: str) -> float:
    """Multiply-adds of one (image, text) pair, spec §8 (see module docstring)."""
    if variant == "paper":
        return 4 * K * L * D + K * (H * L) ** 2 + L * (H * K) ** 2 + (H * K + H * L) * D
    if variant == "acf-code":
        return 2 * K * L * D + K * H * L**2 + L * H * K**2
    raise ValueError(f"variant must be one of {VARIANT_NAMES}, got {variant!r}")


def pair_flops(K: float, L: float, D: int, H: int, variant: str) -> float:
    """FLOPs of one pair = 2 × ``pair_macs``."""
    return 2.0 * pair_macs(K, L, D, H, variant)


def grid_flops(k_valid: Sequence[int], l_valid: Sequence[int], D: int, H: int, variant: str) -> float:
    """FLOPs of scoring every image against every text.

    Args:
        k_valid: (N,) valid regions per image.
        l_valid: (M,) valid words per text.
        D, H: width and heads.
        variant: "paper" or "acf-code".

    Returns:
        Σ_i Σ_j pair_flops(K_i, L_j), computed from power sums (exact, float64).
    """
    k = np.asarray(k_valid, dtype=np.float64)
    l = np.asarray(l_valid, dtype=np.float64)
    if k.ndim != 1 or l.ndim != 1 or not k.size or not l.size:
        raise ValueError("k_valid and l_valid must be non-empty 1-D sequences of counts")
    N, M = k.size, l.size
    k1, k2, l1, l2 = k.sum(), (k**2).sum(), l.sum(), (l**2).sum()
    if variant == "paper":
        macs = 4 * D * k1 * l1 + H**2 * k1 * l2 + H**2 * k2 * l1 + H * D * (M * k1 + N * l1)
    elif variant == "acf-code":
        macs = 2 * D * k1 * l1 + H * k1 * l2 + H * k2 * l1
    else:
        raise ValueError(f"variant must be one of {VARIANT_NAMES}, got {variant!r}")
    return 2.0 * float(macs)


def matmul_flops(m: int, n: int, k: int) -> float:
    """FLOPs of an (m, k) @ (k, n) matrix product: 2·m·n·k."""
    return 2.0 * m * n * k


def tflops(flops: float, seconds: float) -> float:
    """Achieved TFLOP/s; NaN when the time is missing or zero."""
    if not seconds or seconds <= 0 or not np.isfinite(seconds):
        return float("nan")
    return flops / seconds / 1e12
