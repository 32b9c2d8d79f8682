"""Seeded synthetic inputs for the benchmarks (shapes as in COCO, values random).

Speed does not depend on the values, only on shapes and masks, so the inputs are
random unit vectors; ragged text lengths are drawn uniformly in [l_min, l_max].

    similarity_inputs(N, M, variant)   acf_similarity's arguments for one size
    score_matrix(N, M)                 a retrieval-like S and txt2img (re-ranker, metrics)
    train_batch(B)                     one training batch for ``Objective`` (train step)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from acf_fast import VARIANTS


@dataclass
class SimilarityInputs:
    """Arguments of ``acf_similarity`` for one size and variant.

    V (N, K, D), W (M, L, D) with L = l_max, w_mask (M, L) bool (ragged), v_mask None
    (all K regions valid, as bottom-up features), ``kwargs`` the keyword arguments
    (heads, scale, u1, u2, weights, G or global_emb), ``k_valid`` (N,), ``l_valid`` (M,).
    """

    V: torch.Tensor
    v_mask: Optional[torch.Tensor]
    W: torch.Tensor
    w_mask: torch.Tensor
    kwargs: dict
    k_valid: torch.Tensor
    l_valid: torch.Tensor
    variant: str
    heads: int
    meta: dict = field(default_factory=dict)

    def sliced(self, n: int, m: int) -> "SimilarityInputs":
        """The first n images and m texts (for the eager baseline on a slice)."""
        kw = dict(self.kwargs)
        if kw.get("G") is not None:
            kw["G"] = kw["G"][:n]
        if kw.get("global_emb") is not None:
            Gi, Gt = kw["global_emb"]
            kw["global_emb"] = (Gi[:n], Gt[:m])
        return SimilarityInputs(
            self.V[:n], None if self.v_mask is None else self.v_mask[:n], self.W[:m], self.w_mask[:m], kw,
            self.k_valid[:n], self.l_valid[:m], self.variant, self.heads, dict(self.meta),
        )


def _unit(*shape, generator, device, dtype):
    x = torch.randn(*shape, generator=generator, dtype=torch.float32)
    return torch.nn.functional.normalize(x, dim=-1).to(device=device, dtype=dtype)


def similarity_inputs(N: int, M: int, variant: str = "paper", *, K: int = 36, l_min: int = 12, l_max: int = 32,
                      D: int = 1024, heads: int = 8, device="cpu", dtype=torch.float32, seed: int = 0) -> SimilarityInputs:
    """Random inputs of one benchmark size; weights as a trained model would hand them.

    paper: z_x z_y z_o x_w x_v x_g (D, D) ~ N(0, 1/D) + I (well-conditioned, like a
    trained projection), gate (D,) ~ N(0, 1), G (N, D) unit rows -> pairwise global.
    acf-code: no weights, global_emb = (Gi (N, D), Gt (M, D)) unit rows.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    if not (1 <= l_min <= l_max):
        raise ValueError(f"need 1 <= l_min <= l_max, got l_min={l_min}, l_max={l_max}")
    g = torch.Generator().manual_seed(seed)
    V = _unit(N, K, D, generator=g, device=device, dtype=dtype)
    W = _unit(M, l_max, D, generator=g, device=device, dtype=dtype)
    l_valid = torch.randint(l_min, l_max + 1, (M,), generator=g)
    w_mask = (torch.arange(l_max)[None, :] < l_valid[:, None]).to(device)
    v = VARIANTS[variant]
    kwargs = {"heads": heads, "scale": v.scale, "u1": v.u1, "u2": v.u2}
    if v.learned_projections:
        eye = torch.eye(D)
        weights = {name: (eye + torch.randn(D, D, generator=g) / D**0.5).to(device=device, dtype=dtype)
                   for name in ("z_x", "z_y", "z_o", "x_w", "x_v", "x_g")}
        weights["gate"] = torch.randn(D, generator=g).to(device=device, dtype=dtype)
        kwargs["weights"] = weights
    if v.global_mode == "pairwise":
        kwargs["G"] = _unit(N, D, generator=g, device=device, dtype=dtype)
    else:
        kwargs["global_emb"] = (_unit(N, D, generator=g, device=device, dtype=dtype),
                                _unit(M, D, generator=g, device=device, dtype=dtype))
    return SimilarityInputs(V, None, W, w_mask, kwargs, torch.full((N,), K), l_valid, variant, heads,
                            {"N": N, "M": M, "K": K, "l_min": l_min, "l_max": l_max, "D": D, "H": heads,
                             "dtype": str(dtype).replace("torch.", ""), "seed": seed})


def score_matrix(N: int, M: int, *, per_image: int = 5, device="cpu", seed: int = 0, signal: float = 2.0):
    """A retrieval-like S (N, M) float32 and txt2img (M,) int64 for the re-ranker and metrics.

    Caption t belongs to image t // per_image when M = per_image·N; matched pairs get
    ``signal`` added to a standard normal score so ranks are spread like a real model's.
    """
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(N, M, generator=g)
    txt2img = torch.arange(M) // per_image % N
    S[txt2img, torch.arange(M)] += signal
    return S.to(device), txt2img.to(device)


def train_batch(B: int, *, K: int = 36, words: int = 32, Dv: int = 2048, Db: int = 384, device="cpu",
                seed: int = 0) -> dict:
    """A batch for ``acf_fast.train.objective.Objective`` with cached text features.

    regions (B, K, Dv) with a region_mask (the first B // 5 images have only 2K/3
    valid regions), globals (B, Dv), words (B, words, Db) / mask with lengths uniform
    in [max(3, words // 2), words], positives pos_words / pos_mask up to twice as long
    (a long positive holds two captions), and shuf_words / pos_shuf_words: the cached
    encodings of the shuffled texts that shuffle (and mixture) negatives take, same
    masks. Padded rows are zero, as the cache holds them.
    """
    g = torch.Generator().manual_seed(seed)

    def texts(L: int):
        lengths = torch.randint(max(3, words // 2), L + 1, (B,), generator=g)
        mask = torch.arange(L)[None] < lengths[:, None]
        return torch.randn(B, L, Db, generator=g) * mask[..., None], mask

    region_mask = torch.ones(B, K, dtype=torch.bool)
    region_mask[: B // 5, K * 2 // 3:] = False
    w, m = texts(words)
    pw, pm = texts(2 * words)
    batch = {"regions": torch.randn(B, K, Dv, generator=g), "region_mask": region_mask,
             "globals": torch.randn(B, Dv, generator=g), "words": w, "mask": m, "pos_words": pw, "pos_mask": pm,
             "shuf_words": torch.randn(w.shape, generator=g) * m[..., None],
             "pos_shuf_words": torch.randn(pw.shape, generator=g) * pm[..., None]}
    return {k: v.to(device) for k, v in batch.items()}


def tied_score_matrix(N: int, M: int, *, per_image: int = 5, device="cpu", seed: int = 0, signal: float = 2.0,
                      grid: float = 2.0**-8):
    """:func:`score_matrix` with planted ties: every score rounded to a multiple of ``grid``
    (2^-8: ~2,500 levels, so equal scores inside every list and a tied k-th boundary in
    some of them), generated on ``device`` (so a GPU run does not wait for a CPU RNG).

    Returns S (N, M) float32 and txt2img (M,) int64 on ``device``.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    S = torch.randn(N, M, generator=g, device=device)
    txt2img = torch.arange(M, device=device) // per_image % N
    S[txt2img, torch.arange(M, device=device)] += signal
    return torch.round(S / grid) * grid, txt2img


def text_vectors(M: int, D: int = 1024, *, device="cpu", seed: int = 0, duplicates: float = 0.01) -> torch.Tensor:
    """(M, D) float32 random per-text vectors (the ``embedding`` neighbours' input), a
    fraction ``duplicates`` of them exact copies of another text's vector (cosine ties)."""
    g = torch.Generator(device=device).manual_seed(seed)
    X = torch.randn(M, D, generator=g, device=device)
    n = int(M * duplicates)
    if n:
        src = torch.randint(0, M, (n,), generator=g, device=device)
        dst = torch.randint(0, M, (n,), generator=g, device=device)
        X[dst] = X[src]
    return X
