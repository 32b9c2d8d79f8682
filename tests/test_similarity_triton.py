"""The fused Triton backend (kernel v2, ``kernels/tiles.py``) against the float64
per-pair reference (spec §9).

On CPU every kernel runs through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton), so shapes stay tiny (D = 32 with
2 heads, D = 64 with 4 heads); the tile tests shrink the tiles (``cols``/``rows``) so
that several image and text tiles, several buckets, the persistent loop over tiles and
the chunked global score all run with a handful of items. ``--device cuda`` runs the
same tests on a GPU, plus the ``gpu``-marked ones: fp16 / bf16, full-size shapes, the
fp32 (tf32x3) and tf32 paths and torch.compile.
"""
import math
import zlib

import pytest
import torch

from acf_fast import acf_similarity
from acf_fast.reference import reference_similarity
from acf_fast.validate import check_similarity_inputs
from acf_fast.kernels import pair_v1, tiles
from acf_fast.kernels import similarity as ks

FP32_ATOL = 1e-4  # spec §9, float32 backends vs float64
LOWP_ATOL = 5e-3  # spec §9, bf16 / fp16 storage with fp32 accumulation
GRAD_RTOL = 1e-3  # spec §9, float32 gradients vs float64 autograd of eager
ALL_WEIGHTS = ("z_x", "z_y", "z_o", "x_w", "x_v", "x_g", "gate")


def _l2(x):
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _ragged(n, t, gen, p_drop=0.35):
    """(n, t) bool: random holes (not a prefix), at least one valid per row, one full row."""
    m = torch.rand(n, t, generator=gen) > p_drop
    m[torch.arange(n), torch.randint(0, t, (n,), generator=gen)] = True
    m[0] = True
    return m


def make_case(N, M, K, L, *, D=32, H=2, variant="paper", weight_names=ALL_WEIGHTS, masks=True, seed=0,
              device="cpu", dtype=torch.float32):
    """Inputs of acf_similarity as a dict (kwargs for acf_similarity / reference_similarity)."""
    gen = torch.Generator().manual_seed(seed)
    V = _l2(torch.randn(N, K, D, generator=gen))
    W = _l2(torch.randn(M, L, D, generator=gen))
    kw = dict(V=V, v_mask=_ragged(N, K, gen) if masks else None, W=W, w_mask=_ragged(M, L, gen) if masks else None,
              heads=H, u1=0.6)
    if variant == "acf-code":
        E = 24
        kw.update(scale=(4.0, 9.0), u2=0.8, weights=None,
                  global_emb=(_l2(torch.randn(N, E, generator=gen)), _l2(torch.randn(M, E, generator=gen))))
    else:
        wts = {}
        for nm in weight_names:
            if nm == "gate":
                wts[nm] = torch.randn(D, generator=gen)
            else:  # near-orthogonal scale so attention is neither flat nor one-hot
                wts[nm] = torch.randn(D, D, generator=gen) / math.sqrt(D) * 1.5
        kw.update(scale=None, weights=wts)
        if variant == "paper":
            kw.update(u2=0.8, G=_l2(torch.randn(N, D, generator=gen)))
        else:  # "local": no global score
            kw.update(u2=1.0)
    dev = torch.device(device)

    def mv(x):
        if x is None:
            return None
        if isinstance(x, tuple):
            return tuple(mv(t) for t in x)
        if isinstance(x, dict):
            return {k: mv(v) for k, v in x.items()}
        if isinstance(x, torch.Tensor):
            return x.to(dev, dtype) if x.is_floating_point() else x.to(dev)
        return x

    return {k: mv(v) for k, v in kw.items()}


def _score(case, backend, **extra):
    c = dict(case)
    return acf_similarity(c.pop("V"), c.pop("v_mask"), c.pop("W"), c.pop("w_mask"), backend=backend, **c, **extra)


def _reference(case):
    c = dict(case)
    return reference_similarity(c.pop("V"), c.pop("v_mask"), c.pop("W"), c.pop("w_mask"), **c)


# ------------------------------------------------------------------ forward vs reference

FORWARD_CASES = [
    # id, (N, M, K, L), variant, weights, masks, (D, H)
    ("acf-code", (3, 4, 7, 6), "acf-code", None, True, (64, 4)),
    ("paper", (3, 4, 7, 6), "paper", ALL_WEIGHTS, True, (64, 4)),
    ("local-only", (3, 4, 6, 5), "local", ("z_x", "z_y", "z_o"), True, (32, 2)),
    ("zx-xw-no-zo", (3, 4, 6, 5), "paper", ("z_x", "x_w", "gate"), True, (32, 2)),  # block-diagonal Γ + pairwise global
    ("zo-only", (2, 5, 6, 7), "local", ("z_o",), True, (32, 2)),  # O != Q, full Γ, shared q/k
    ("zy-only", (2, 5, 6, 7), "local", ("z_y",), True, (32, 2)),  # Q != Kk, O is Q
    ("K=1", (2, 3, 1, 5), "paper", ALL_WEIGHTS, True, (32, 2)),
    ("L=1", (3, 2, 5, 1), "acf-code", None, True, (32, 2)),
    ("no-masks", (3, 3, 4, 3), "acf-code", None, False, (32, 2)),
    ("D=64,H=8", (3, 4, 5, 6), "paper", ALL_WEIGHTS, True, (64, 8)),  # head width 8, padded to 16 in the tiles
    ("D=64,H=8,acf", (3, 4, 5, 6), "acf-code", None, True, (64, 8)),
]


@pytest.mark.parametrize("name,shape,variant,wnames,masks,DH", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_matches_float64_reference(name, shape, variant, wnames, masks, DH, device):
    N, M, K, L = shape
    case = make_case(N, M, K, L, D=DH[0], H=DH[1], variant=variant, weight_names=wnames or (), masks=masks,
                     seed=zlib.crc32(name.encode()) % 1000, device=device)
    S = _score(case, "triton")
    assert S.shape == (N, M) and S.dtype == torch.float32
    ref = _reference(case)
    err = (S.double().cpu() - ref).abs().max().item()
    assert err <= FP32_ATOL, f"{name}: max |ΔS| = {err:.3e}"
    # the comparison can fail: scores vary across the grid
    assert ref.std() > 1e-3


def _plan(case, st=torch.float32):
    v_mask, w_mask, weights, scale = check_similarity_inputs(
        case["V"], case["v_mask"], case["W"], case["w_mask"], heads=case["heads"], scale=case["scale"],
        u1=case["u1"], u2=case["u2"], weights=case.get("weights"), G=case.get("G"), global_emb=case.get("global_emb"))
    plan = tiles.plan_tiles(case["V"], v_mask, case["W"], w_mask, heads=case["heads"], weights=weights,
                            G=case.get("G"), st=st)
    return plan, scale


def _launch(case, out, plan=None, **kw):
    if plan is None:
        plan, scale = _plan(case)
    else:
        scale = _plan(case)[1]
    ge = case.get("global_emb")
    return tiles.launch_tiles(plan, out, scale=scale, u1=case["u1"], u2=case["u2"],
                              gi=None if ge is None else ge[0].float().contiguous(),
                              gt=None if ge is None else ge[1].float().contiguous(), **kw)


def _hard_masks(case, gen):
    """Ragged masks that cross bucket edges: text lengths 1, 16, 17 and 32 (holes, not
    prefixes), an image with a single valid region; every other item random."""
    v_mask, w_mask = case["v_mask"].clone(), case["w_mask"].clone()
    M, L = w_mask.shape
    for t, n in zip(range(M), (1, 16, 17, L, 2)):
        keep = torch.randperm(L, generator=gen)[:n]
        w_mask[t] = False
        w_mask[t, keep] = True
    v_mask[1] = False
    v_mask[1, torch.randint(0, v_mask.shape[1], (1,), generator=gen)] = True
    return dict(case, v_mask=v_mask.to(case["V"].device), w_mask=w_mask.to(case["V"].device))


TILE_CASES = [
    # id, variant, weights, (N, M, K, L), (D, H), (rows, cols), buckets
    ("acf-code", "acf-code", None, (9, 11, 7, 32), (32, 2), (32, 32), tiles.BUCKETS),
    ("paper", "paper", ALL_WEIGHTS, (7, 10, 6, 32), (32, 2), (16, 32), tiles.BUCKETS),
    ("paper-one-bucket", "paper", ALL_WEIGHTS, (5, 6, 5, 32), (32, 2), (16, 32), (32, 128)),  # L = 1 and 32 in one tile
    ("acf-one-bucket", "acf-code", None, (5, 6, 5, 32), (32, 2), (16, 64), (32, 128)),
    ("zx-xw-no-zo", "paper", ("z_x", "x_w", "gate"), (7, 9, 6, 20), (32, 2), (32, 16), tiles.BUCKETS),
]


@pytest.mark.parametrize("name,variant,wnames,shape,DH,tile,buckets", TILE_CASES, ids=[c[0] for c in TILE_CASES])
def test_tiles_against_reference(name, variant, wnames, shape, DH, tile, buckets, device, monkeypatch):
    """Several image and text tiles (N, M not multiples of them), lengths across bucket
    edges, a one-region image, the persistent loop (more tiles than programs) and a
    global score chunked into several launches; every element of a poisoned output."""
    monkeypatch.setattr(tiles, "BUCKETS", buckets)
    N, M, K, L = shape
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    case = make_case(N, M, K, L, D=DH[0], H=DH[1], variant=variant, weight_names=wnames or (), seed=N + M,
                     device=device)
    case = _hard_masks(case, gen)
    plan, _ = _plan(case)
    assert len(plan.buckets) == (1 if len(buckets) == 2 else len({tiles.bucket_of(n, buckets) for n in
                                                                   case["w_mask"].sum(1).tolist()}))
    out = torch.full((N, M), float("nan"), device=device)
    _launch(case, out, plan, rows=tile[0], cols=tile[1], global_pairs=2 * tile[1])
    assert torch.isfinite(out).all(), "some S[i, j] was never written"
    err = (out.double().cpu() - _reference(case)).abs().max().item()
    assert err <= FP32_ATOL, f"{name}: max |ΔS| = {err:.3e}"


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_every_element_written_and_nothing_else(variant, device, monkeypatch):
    """Poisoned output inside a larger poisoned buffer: each S[i, j] written exactly where
    it belongs (strided view), with the per-item precompute run 2 items at a time."""
    monkeypatch.setattr(tiles, "PREP_CHUNK", 2)
    N, M = 5, 7
    case = make_case(N, M, 6, 5, variant=variant, seed=3, device=device)
    buf = torch.full((N + 2, M + 3), float("nan"), dtype=torch.float32, device=device)
    out = buf[1 : N + 1, 2 : M + 2]
    _launch(case, out, rows=16, cols=16)
    assert torch.isfinite(out).all(), "some S[i, j] was never written"
    border = buf.clone()
    border[1 : N + 1, 2 : M + 2] = float("nan")
    assert torch.isnan(border).all(), "the kernel wrote outside S"
    assert (out.double().cpu() - _reference(case)).abs().max().item() <= FP32_ATOL


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_chunked_prepare_equals_one_shot(variant, device, monkeypatch):
    case = make_case(5, 7, 4, 9, variant=variant, seed=9, device=device)
    one, _ = _plan(case)
    monkeypatch.setattr(tiles, "PREP_CHUNK", 2)
    two, _ = _plan(case)
    assert [b.LB for b in one.buckets] == [b.LB for b in two.buckets]
    pairs = [(one.images, two.images)] + list(zip(one.buckets, two.buckets))
    for a, b in pairs:
        for name in ("Q", "Kk", "O", "mask", "norm", "gam"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:  # BLAS may round differently for a different batch size
                assert x.shape == y.shape and torch.allclose(x.double(), y.double(), rtol=1e-5, atol=1e-6), name
        assert (a.Kk is a.Q) == (b.Kk is b.Q) and (a.O is a.Q) == (b.O is b.Q)


def test_token_order_within_a_text_changes_nothing(device):
    """The tiles move each text's valid tokens to the front: S must not depend on where
    a text's holes are (ACF has no positional term after the encoder)."""
    case = make_case(3, 4, 5, 9, variant="paper", seed=17, device=device)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(9, generator=gen)
    moved = dict(case, W=case["W"][:, perm], w_mask=case["w_mask"][:, perm])
    a, b = _score(case, "triton"), _score(moved, "triton")
    assert (a - b).abs().max().item() <= 1e-5


# ------------------------------------------------------------------ limits and API


@pytest.mark.parametrize("K,L,match", [(129, 4, "K = 129"), (4, 129, "L = 129")])
def test_refuses_too_long(K, L, match, device):
    V = torch.randn(1, K, 64, device=device)
    W = torch.randn(1, L, 64, device=device)
    with pytest.raises(ValueError, match=match):
        acf_similarity(V, None, W, None, heads=4, u2=1.0, backend="triton")


def test_registered_as_torch_library_op(device):
    """One launch path: the backend goes through torch.ops.acf_fast.fused_similarity,
    whose fake implementation gives torch.compile the output shape."""
    assert hasattr(torch.ops.acf_fast, "fused_similarity")
    case = make_case(2, 3, 4, 5, variant="acf-code", seed=1, device=device)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        V = mode.from_tensor(case["V"])
        W = mode.from_tensor(case["W"])
        S = ks.launch_similarity(V, None, W, None, heads=2, scale=(4.0, 9.0), u1=0.5, u2=1.0)
    assert tuple(S.shape) == (2, 3) and S.dtype == torch.float32


def test_pair_kernel_v1_still_matches_reference(device):
    """Kernel v1 stays until v2 is measured on a GPU beside it (bench/gpu_check.py): its
    figures are only worth comparing while it is right."""
    for variant in ("paper", "acf-code"):
        case = make_case(2, 3, 5, 4, variant=variant, seed=4, device=device)
        v_mask, w_mask, weights, scale = check_similarity_inputs(
            case["V"], case["v_mask"], case["W"], case["w_mask"], heads=case["heads"], scale=case["scale"],
            u1=case["u1"], u2=case["u2"], weights=case.get("weights"), G=case.get("G"),
            global_emb=case.get("global_emb"))
        img, txt = pair_v1.prepare_sides(case["V"], v_mask, case["W"], w_mask, heads=case["heads"], weights=weights,
                                         G=case.get("G"))
        out = torch.full((2, 3), float("nan"), device=device)
        pair_v1.launch_similarity(img, txt, out, scale=scale, u1=case["u1"], u2=case["u2"],
                                  global_emb=case.get("global_emb"))
        assert (out.double().cpu() - _reference(case)).abs().max().item() <= FP32_ATOL


# ------------------------------------------------------------------ gradients

GRAD_CASES = [("paper", (3, 3, 5, 4)), ("acf-code", (3, 3, 5, 4))]


@pytest.mark.parametrize("variant,shape", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_match_float64_eager(variant, shape, device):
    N, M, K, L = shape
    case = make_case(N, M, K, L, variant=variant, seed=11, device=device)
    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(N, M, generator=gen, dtype=torch.float64)

    def leaves(c, dtype):
        out = {k: v for k, v in c.items()}
        params = []

        def leaf(t):
            x = t.detach().to(dtype).clone().requires_grad_(True)
            params.append(x)
            return x

        out["V"], out["W"] = leaf(c["V"]), leaf(c["W"])
        if c.get("G") is not None:
            out["G"] = leaf(c["G"])
        if c.get("global_emb") is not None:
            out["global_emb"] = tuple(leaf(t) for t in c["global_emb"])
        if c.get("weights"):
            out["weights"] = {k: leaf(v) for k, v in c["weights"].items()}
        return out, params

    c32, p32 = leaves(case, torch.float32)
    S = _score(c32, "triton")
    g32 = torch.autograd.grad(S, p32, grad_out.to(S.device, torch.float32))
    c64, p64 = leaves(case, torch.float64)
    S64 = _score(c64, "eager")
    g64 = torch.autograd.grad(S64, p64, grad_out.to(S64.device))
    assert len(g32) == len(g64) >= 4
    for a, b in zip(g32, g64):
        scale = b.abs().max().item()
        assert scale > 0
        rel = (a.double() - b).abs().max().item() / scale
        assert rel <= GRAD_RTOL, f"relative gradient error {rel:.2e} for a {tuple(b.shape)} input"


def test_fp16_storage(device):
    """fp16 storage, fp32 accumulation (the interpreter's fp16 tl.dot is exact IEEE,
    so this also runs on CPU; bf16 arithmetic is not, so bf16 is GPU-only)."""
    case = make_case(3, 4, 7, 6, variant="paper", seed=2, device=device, dtype=torch.float16)
    S = _score(case, "triton")
    assert S.dtype == torch.float32
    err = (S.double().cpu() - _reference(case)).abs().max().item()
    assert err <= LOWP_ATOL, f"max |ΔS| = {err:.3e}"


# ------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_low_precision_storage(dtype, variant, device):
    case = make_case(9, 23, 36, 29, D=256, H=8, variant=variant, seed=7, device=device, dtype=dtype)
    S = _score(case, "triton")
    ref = _reference(case)  # float64 of the same (rounded) inputs
    err = (S.double().cpu() - ref).abs().max().item()
    assert err <= LOWP_ATOL, f"{dtype} {variant}: max |ΔS| = {err:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["paper", "acf-code"])
@pytest.mark.parametrize("D,H,K,L", [(1024, 8, 36, 32), (512, 4, 64, 128), (256, 8, 17, 3)])
def test_full_size_fp32(variant, D, H, K, L, device):
    case = make_case(5, 11, K, L, D=D, H=H, variant=variant, seed=D + K, device=device)
    S = _score(case, "triton")
    ref = _reference(case)
    assert (S.double().cpu() - ref).abs().max().item() <= FP32_ATOL


@pytest.mark.gpu
def test_tf32_path(device):
    case = make_case(7, 13, 36, 24, D=512, H=8, variant="paper", seed=2, device=device)
    c = dict(case)
    v_mask, w_mask, weights, scale = check_similarity_inputs(
        c["V"], c["v_mask"], c["W"], c["w_mask"], heads=8, scale=None, u1=0.6, u2=0.8,
        weights=c["weights"], G=c["G"], global_emb=None)
    S = ks.triton_similarity(c["V"], v_mask, c["W"], w_mask, heads=8, scale=scale, u1=0.6, u2=0.8,
                             weights=weights, G=c["G"], global_emb=None, allow_tf32=True)
    ref = _reference(case)
    assert (S.double().cpu() - ref).abs().max().item() <= LOWP_ATOL


@pytest.mark.gpu
def test_torch_compile_traces_the_op(device):
    case = make_case(4, 6, 8, 7, D=256, H=8, variant="paper", seed=4, device=device)
    fn = torch.compile(lambda c: _score(c, "triton"), fullgraph=False)
    S = fn(case)
    assert (S.double().cpu() - _reference(case)).abs().max().item() <= FP32_ATOL
