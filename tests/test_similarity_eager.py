"""backend="eager" against the float64 per-pair reference (spec §3, §9).

The reference (acf_fast.reference) is an independent loop over pairs and heads on
the valid rows only; the eager backend is batched over images with masks, so the two
share no code path beyond torch itself.
"""
import pytest
import torch

from acf_fast import acf_similarity
from acf_fast.reference import authors_local_score, reference_similarity

MATS = ("z_x", "z_y", "z_o", "x_w", "x_v", "x_g")


def make_case(N, M, K, L, D, variant, seed, ragged=True, dtype=torch.float32):
    """Random inputs of one variant: dict of acf_similarity arguments (features l2-normalised like the encoders)."""
    g = torch.Generator().manual_seed(seed)
    V = torch.nn.functional.normalize(torch.randn(N, K, D, generator=g, dtype=torch.float64), dim=-1)
    W = torch.nn.functional.normalize(torch.randn(M, L, D, generator=g, dtype=torch.float64), dim=-1)
    v_mask = w_mask = None
    if ragged:
        # valid counts 1..K (and 1..L), positions scattered, not prefixes
        v_mask = torch.rand(N, K, generator=g) < torch.rand(N, 1, generator=g)
        v_mask[torch.arange(N), torch.randint(0, K, (N,), generator=g)] = True
        w_mask = torch.rand(M, L, generator=g) < torch.rand(M, 1, generator=g)
        w_mask[torch.arange(M), torch.randint(0, L, (M,), generator=g)] = True
    kw = dict(V=V.to(dtype), v_mask=v_mask, W=W.to(dtype), w_mask=w_mask)
    if variant == "paper":
        kw["weights"] = {k: (torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5 + torch.eye(D, dtype=torch.float64)).to(dtype) for k in MATS}
        kw["weights"]["gate"] = torch.randn(D, generator=g, dtype=torch.float64).to(dtype)
        kw["G"] = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
        kw["u1"], kw["u2"] = 0.6, 0.8
    else:
        kw["scale"] = (4.0, 9.0)
        E = 24
        kw["global_emb"] = (torch.randn(N, E, generator=g, dtype=torch.float64).to(dtype) / E ** 0.5,
                            torch.randn(M, E, generator=g, dtype=torch.float64).to(dtype) / E ** 0.5)
        kw["u1"], kw["u2"] = 0.5, 0.8
    return kw


def run(kw, heads, backend):
    kw = dict(kw)
    return acf_similarity(kw.pop("V"), kw.pop("v_mask"), kw.pop("W"), kw.pop("w_mask"), heads=heads, backend=backend, **kw)


def reference(kw, heads):
    kw = dict(kw)
    return reference_similarity(kw.pop("V"), kw.pop("v_mask"), kw.pop("W"), kw.pop("w_mask"), heads=heads, **kw)


SHAPES = [  # N, M, K, L, D, heads
    (5, 7, 6, 5, 64, 4),
    (3, 11, 9, 7, 256, 8),
    (4, 3, 1, 6, 64, 8),   # K = 1
    (3, 5, 7, 1, 64, 4),   # L = 1
]


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_eager_matches_reference(variant, shape):
    N, M, K, L, D, H = shape
    kw = make_case(N, M, K, L, D, variant, seed=sum(shape))
    S = run(kw, H, "eager")
    assert S.shape == (N, M) and S.dtype == torch.float32
    ref = reference(kw, H)
    assert (S.double() - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_eager_without_masks_and_float64(variant):
    kw = make_case(3, 4, 5, 6, 64, variant, seed=3, ragged=False, dtype=torch.float64)
    S = run(kw, 4, "eager")
    assert S.dtype == torch.float64
    assert torch.allclose(S, reference(kw, 4), atol=1e-12, rtol=0)


def test_eager_local_only_without_global():
    kw = make_case(3, 4, 5, 6, 64, "paper", seed=5)
    kw.pop("G")
    kw["u2"] = 1.0
    assert (run(kw, 4, "eager").double() - reference(kw, 4)).abs().max().item() <= 1e-4


def prefix_case(N, M, K, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(N, K, D, generator=g)
    W = torch.randn(M, L, D, generator=g)  # authors' code leaves W unnormalised
    lens = torch.randint(1, L + 1, (M,), generator=g)
    lens[0] = L
    w_mask = torch.arange(L)[None, :] < lens[:, None]
    return V, W, w_mask, lens


@pytest.mark.parametrize("backend", ["eager"])
def test_acf_code_local_equals_authors(backend):
    V, W, w_mask, lens = prefix_case(4, 6, 7, 9, 128, seed=11)
    S = acf_similarity(V, torch.ones(4, 7, dtype=torch.bool), W, w_mask, heads=8, scale=(4.0, 9.0), u1=0.5, u2=1.0, backend=backend)
    ref = authors_local_score(V, W, lens, heads=8, smooth_i2t=4.0, smooth_t2i=9.0)
    assert (S.double() - ref).abs().max().item() <= 1e-4


def test_eager_is_differentiable_in_every_input():
    kw = make_case(3, 4, 5, 4, 32, "paper", seed=2, dtype=torch.float64)
    leaves = [kw["V"], kw["W"], kw["G"], *kw["weights"].values()]
    for t in leaves:
        t.requires_grad_(True)
    run(kw, 4, "eager").sum().backward()
    for t in leaves:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().max() > 0


def test_eager_huge_padding_does_not_leak():
    """Masked-out rows may hold any finite value; S is unchanged and finite."""
    kw = make_case(3, 4, 5, 6, 64, "paper", seed=52)
    base = run(kw, 4, "eager")
    pad = dict(kw)
    pad["V"] = torch.where(kw["v_mask"][:, :, None], kw["V"], torch.full_like(kw["V"], 1e30))
    pad["W"] = torch.where(kw["w_mask"][:, :, None], kw["W"], torch.full_like(kw["W"], -1e30))
    assert torch.allclose(run(pad, 4, "eager"), base, atol=1e-6, rtol=0)
