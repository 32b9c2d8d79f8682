"""The one input factory of the similarity tests: ``acf_similarity``'s arguments for a
seeded random case, and the two ways to score it (a backend, the float64 reference).

    case = make_case(N, M, K, L, D=32, H=2, variant="paper", seed=0)
    S = score(case, "torch")          # acf_similarity(**case, backend="torch")
    S64 = reference(case)             # acf_fast.reference, float64, per pair

Features are unit rows (as the encoders give); masks are ragged with holes, not
prefixes (every item keeps at least one valid row, item 0 all of them); weights are
generic random matrices (entries ~ N(0, 2.25 / D): attention neither flat nor
one-hot). ``layout`` makes every tensor argument non-contiguous: "strided" (every
other element of a buffer twice as wide, so even the innermost stride is 2) or
"transposed" (items and rows swapped in memory).
"""
from __future__ import annotations

import math

import torch

from acf_fast import acf_similarity
from acf_fast.reference import reference_similarity

MATRIX_WEIGHTS = ("z_x", "z_y", "z_o", "x_w", "x_v", "x_g")
ALL_WEIGHTS = MATRIX_WEIGHTS + ("gate",)
VARIANTS = ("paper", "acf-code", "local")
LAYOUTS = ("contiguous", "strided", "transposed")


def unit(*shape, gen) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


def ragged_mask(n: int, t: int, gen, p_drop: float = 0.35) -> torch.Tensor:
    """(n, t) bool with random holes, at least one True per row, row 0 all True."""
    m = torch.rand(n, t, generator=gen) > p_drop
    m[torch.arange(n), torch.randint(0, t, (n,), generator=gen)] = True
    m[0] = True
    return m


def relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous layout (see the module docstring)."""
    if layout == "contiguous" or x.dim() == 0:
        return x.contiguous()
    if layout == "strided":
        buf = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        buf[..., ::2] = x
        out = buf[..., ::2]
    elif layout == "transposed":
        out = x.transpose(0, 1).contiguous().transpose(0, 1) if x.dim() >= 2 else x
        if out.is_contiguous():  # 1-D, or a size-1 dim makes the swap a no-op
            return relayout(x, "strided")
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return out


def make_case(N: int, M: int, K: int, L: int, *, D: int = 32, H: int = 2, variant: str = "paper",
              weights=ALL_WEIGHTS, masks: bool = True, seed: int = 0, dtype=torch.float32, device="cpu",
              layout: str = "contiguous") -> dict:
    """Keyword arguments of ``acf_similarity`` (backend aside) for one random case.

    variant: "paper" (the weights named in ``weights``, pairwise global G, u1 0.6,
    u2 0.8, scale 1/sqrt(d)), "acf-code" (no weights, scale (4, 9), embeddings global
    (Gi, Gt) of width 24, u1 0.5, u2 0.8) or "local" (paper weights, no global, u2 1).
    Floating tensors are stored in ``dtype`` on ``device``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    gen = torch.Generator().manual_seed(seed)
    case = dict(V=unit(N, K, D, gen=gen), v_mask=ragged_mask(N, K, gen) if masks else None,
                W=unit(M, L, D, gen=gen), w_mask=ragged_mask(M, L, gen) if masks else None, heads=H)
    if variant == "acf-code":
        case.update(scale=(4.0, 9.0), u1=0.5, u2=0.8, weights=None,
                    global_emb=(unit(N, 24, gen=gen), unit(M, 24, gen=gen)))
    else:
        wts = {name: torch.randn(D, generator=gen, dtype=torch.float64) if name == "gate"
               else torch.randn(D, D, generator=gen, dtype=torch.float64) * (1.5 / math.sqrt(D))
               for name in weights}
        case.update(scale=None, u1=0.6, weights=wts)
        if variant == "paper":
            case.update(u2=0.8, G=unit(N, D, gen=gen))
        else:
            case.update(u2=1.0)
    dev = torch.device(device)

    def place(x):
        if x is None:
            return None
        if isinstance(x, tuple):
            return tuple(place(t) for t in x)
        if isinstance(x, dict):
            return {k: place(v) for k, v in x.items()}
        if isinstance(x, torch.Tensor):
            x = x.to(dev, dtype) if x.is_floating_point() else x.to(dev)
            return relayout(x, layout)
        return x

    return {k: place(v) for k, v in case.items()}


def score(case: dict, backend: str, **extra) -> torch.Tensor:
    c = dict(case)
    return acf_similarity(c.pop("V"), c.pop("v_mask"), c.pop("W"), c.pop("w_mask"), backend=backend, **c, **extra)


def reference(case: dict) -> torch.Tensor:
    """S (N, M) float64 by the per-pair reference, on the case's (rounded) values."""
    c = dict(case)
    return reference_similarity(c.pop("V"), c.pop("v_mask"), c.pop("W"), c.pop("w_mask"), **c)


def checked(case: dict):
    """check_similarity_inputs on a case: (v_mask, w_mask, weights, scale)."""
    from acf_fast.validate import check_similarity_inputs

    return check_similarity_inputs(
        case["V"], case["v_mask"], case["W"], case["w_mask"], heads=case["heads"], scale=case["scale"],
        u1=case["u1"], u2=case["u2"], weights=case.get("weights"), G=case.get("G"), global_emb=case.get("global_emb"))


def tile_plan(case: dict, st=torch.float32, **kw):
    """The Triton tiles' plan of a case (kernels/tiles.plan_tiles, ``kw`` to it) and its checked scale."""
    from acf_fast.kernels import tiles

    v_mask, w_mask, weights, scale = checked(case)
    plan = tiles.plan_tiles(case["V"], v_mask, case["W"], w_mask, heads=case["heads"], weights=weights,
                            G=case.get("G"), st=st, **kw)
    return plan, scale


def launch_tile_plan(case: dict, out: torch.Tensor, plan=None, **kw) -> torch.Tensor:
    """kernels/tiles.launch_tiles of a case into ``out`` (its fp32 plan unless ``plan`` is given);
    ``kw`` go to launch_tiles."""
    from acf_fast.kernels import tiles

    if plan is None:
        plan, scale = tile_plan(case)
    else:
        scale = checked(case)[3]
    ge = case.get("global_emb")
    return tiles.launch_tiles(plan, out, scale=scale, u1=case["u1"], u2=case["u2"],
                              gi=None if ge is None else ge[0].float().contiguous(),
                              gt=None if ge is None else ge[1].float().contiguous(), **kw)


def authors_case(N: int, M: int, K: int, L: int, D: int, seed: int):
    """Inputs in the authors' release layout: V (N, K, D) all regions valid, W (M, L, D)
    unnormalised (as their code leaves it), captions valid in a prefix of ``lens`` rows
    (caption 0 full length). Returns (V, W, w_mask, lens)."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(N, K, D, generator=g)
    W = torch.randn(M, L, D, generator=g)
    lens = torch.randint(1, L + 1, (M,), generator=g)
    lens[0] = L
    w_mask = torch.arange(L)[None, :] < lens[:, None]
    return V, W, w_mask, lens
