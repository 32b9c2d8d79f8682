"""The fused Triton backend (kernel v2, ``kernels/tiles.py``) beyond the shared contract
of tests/test_backends.py: its kernel paths, tiles, launch, limits, backward and
torch.compile, against the float64 per-pair reference (spec §9).

On CPU every kernel runs through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton), so shapes stay tiny (D = 32 with
2 heads, D = 64 with 4 heads); the tile tests shrink the tiles (``cols``/``rows``) so
that several image and text tiles, several buckets, the persistent loop over tiles and
the chunked global score all run with a handful of items. ``--device cuda`` runs the
same tests on a GPU, plus the ``gpu``-marked ones: fp16 / bf16, full-size shapes, the
fp32 (f16x3) and tf32 paths and torch.compile.
"""
import dataclasses
import math
import zlib

import pytest
import torch

from acf_fast import acf_similarity
from acf_fast.kernels import pair_v1, tiles
from acf_fast.kernels import similarity as ks
from acf_fast.validate import check_similarity_inputs
from inputs import ALL_WEIGHTS, checked, launch_tile_plan, make_case, reference, score, tile_plan
from tolerances import assert_grad_close, assert_scores_close

# ------------------------------------------------------------------ forward vs reference

FORWARD_CASES = [
    # id, (N, M, K, L), variant, weights, masks, (D, H): kernel paths beyond tests/test_backends.py
    ("local-only", (3, 4, 6, 5), "local", ("z_x", "z_y", "z_o"), True, (32, 2)),
    ("zx-xw-no-zo", (3, 4, 6, 5), "paper", ("z_x", "x_w", "gate"), True, (32, 2)),  # block-diagonal Γ + pairwise global
    ("zo-only", (2, 5, 6, 7), "local", ("z_o",), True, (32, 2)),  # O != Q, full Γ, shared q/k
    ("zy-only", (2, 5, 6, 7), "local", ("z_y",), True, (32, 2)),  # Q != Kk, O is Q
    ("D=64,H=8", (3, 4, 5, 6), "paper", ALL_WEIGHTS, True, (64, 8)),  # head width 8, padded to 16 in the tiles
    ("D=64,H=8,acf", (3, 4, 5, 6), "acf-code", None, True, (64, 8)),
]


@pytest.mark.parametrize("name,shape,variant,wnames,masks,DH", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_matches_float64reference(name, shape, variant, wnames, masks, DH, device):
    N, M, K, L = shape
    case = make_case(N, M, K, L, D=DH[0], H=DH[1], variant=variant, weights=wnames or (), masks=masks,
                     seed=zlib.crc32(name.encode()) % 1000, device=device)
    S = score(case, "triton")
    assert S.shape == (N, M) and S.dtype == torch.float32
    ref = reference(case)
    assert ref.std() > 1e-3  # scores vary across the grid: the comparison can fail
    assert_scores_close(S, ref, torch.float32, name)


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
    # COCO's 36 regions: laid out as 40 (4 masked rows each), 3 images in a 128-row tile
    ("acf-code-K36", "acf-code", None, (4, 5, 36, 20), (32, 2), (128, 32), tiles.BUCKETS),
    # 8 texts of bucket 16 in a 128-column tile: the batched p·Γw (tiles.batched_gw); bucket 32 beside it
    ("acf-code-8-texts", "acf-code", None, (5, 19, 5, 20), (32, 2), (16, 128), tiles.BUCKETS),
    # COCO's phase B: 36 regions x 8 heads, Γv of 320 columns in 5 chunks; texts of 32 tokens x 8 heads, 2 chunks
    ("paper-K36-H8", "paper", ALL_WEIGHTS, (4, 5, 36, 32), (64, 8), (128, 32), tiles.BUCKETS),
]


def test_block_diagonal_tiles_batch_p_gamma_w_only_with_a_text_per_warp():
    """tiles.batched_gw: one small dot per text for the block-diagonal tile at 8 texts of 16
    tokens (COCO's bucket 16), fp32 and bf16, the tile-wide dot elsewhere (fewer texts than
    warps, full Γ, dots under 16)."""
    def meta(LB, dot_prec="f16x3", full=False, cols=128):
        return tiles.tile_constexprs(8, 128, 40, LB, full=full, shared_qk=True, o_is_q=True, pairwise=False,
                                     embed=True, HKP=320, dot_prec=dot_prec, cols=cols)

    assert meta(16)["BATCHED_GW"] and meta(16, "tf32")["BATCHED_GW"] and meta(16)["GT"] == 8
    assert not meta(32)["BATCHED_GW"] and not meta(16, full=True)["BATCHED_GW"]
    assert not meta(8, cols=64)["BATCHED_GW"]


def test_unbatched_block_diagonal_tiles_split_p_gamma_w_into_column_halves():
    """tiles.half_gw: p·Γw as two products of the tile's column halves (zero between them in
    the block-diagonal Γw) where no text straddles them: COCO's bucket 32 (4 texts of 32) and
    the interpreter tiles of TILE_CASES with two texts per tile (acf-code, acf-one-bucket, ...);
    not with one text per tile, nor batched, nor for full Γ."""
    def meta(LB, full=False, cols=128):
        return tiles.tile_constexprs(8, 128, 40, LB, full=full, shared_qk=True, o_is_q=True, pairwise=False,
                                     embed=True, HKP=320, dot_prec="tf32", cols=cols)

    assert meta(32)["HALF_GW"] and meta(64)["HALF_GW"] and meta(16, cols=32)["HALF_GW"]
    assert not meta(16)["HALF_GW"]  # batched
    assert not meta(128)["HALF_GW"] and not meta(32, cols=32)["HALF_GW"]  # one text per tile
    assert not meta(32, full=True)["HALF_GW"]


def test_image_rows_pad_to_16_byte_rows_only_when_the_tile_keeps_its_shape():
    assert [tiles.image_rows(k) for k in (36, 40, 7, 43, 42, 3, 128)] == [40, 40, 8, 48, 42, 3, 128]
    assert tiles.image_tile_shape(40) == tiles.image_tile_shape(36) == (3, 128)
    # full Γ: only where H·K keeps its whole 64-column chunks of Γv (8·36 and 8·40 both take 320)
    assert [tiles.image_rows(k, full_heads=h) for k, h in ((36, 8), (20, 3), (20, 2), (5, 8))] == [40, 20, 24, 8]


def test_full_gamma_images_padded_to_40_rows_keep_their_blocks():
    """The paper layout of 36-region images pads each head's rows to 40: Γv row h·40 + k is
    the precompute's row h·36 + k, zero in the padding, and the padded rows are masked."""
    case = make_case(2, 3, 36, 5, D=32, H=8, variant="paper", seed=5)
    plan, _ = tile_plan(case)
    img = plan.images
    assert img.K == 40 and img.gam.shape == (2, 320, 320)
    from acf_fast.precompute import precompute_items
    v_mask, _, weights, _ = checked(case)
    side = precompute_items(case["V"], v_mask, weights, 8, role="image", pairwise_global=False)
    g = tiles.split16_planes(side.gram, img.split.sigma_gam)[0].view(2, 8, 36, 8, 36)
    got = img.gam.view(2, 8, 40, 8, 40)
    assert torch.equal(got[:, :, :36, :, :36], g)
    assert not got[:, :, 36:].any() and not got[:, :, :, :, 36:].any()
    assert not img.mask.view(2, 40)[:, 36:].any()


@pytest.mark.parametrize("name,variant,wnames,shape,DH,tile,buckets", TILE_CASES, ids=[c[0] for c in TILE_CASES])
def test_tiles_againstreference(name, variant, wnames, shape, DH, tile, buckets, device, monkeypatch):
    """Several image and text tiles (N, M not multiples of them), lengths across bucket
    edges, a one-region image, the persistent loop (more tiles than programs) and a
    global score chunked into several launches; every element of a poisoned output."""
    monkeypatch.setattr(tiles, "BUCKETS", buckets)
    N, M, K, L = shape
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    case = make_case(N, M, K, L, D=DH[0], H=DH[1], variant=variant, weights=wnames or (), seed=N + M,
                     device=device)
    case = _hard_masks(case, gen)
    plan, _ = tile_plan(case)
    assert len(plan.buckets) == (1 if len(buckets) == 2 else len({tiles.bucket_of(n, buckets) for n in
                                                                   case["w_mask"].sum(1).tolist()}))
    out = torch.full((N, M), float("nan"), device=device)
    launch_tile_plan(case, out, plan, rows=tile[0], cols=tile[1], global_pairs=2 * tile[1])
    assert torch.isfinite(out).all(), "some S[i, j] was never written"
    assert_scores_close(out, reference(case), torch.float32, name)


ONE_PASS_CASES = [TILE_CASES[0], TILE_CASES[1], TILE_CASES[4]]  # block-diagonal, full Γ, block-diagonal + pairwise


@pytest.mark.parametrize("name,variant,wnames,shape,DH,tile,buckets", ONE_PASS_CASES, ids=[c[0] for c in ONE_PASS_CASES])
def test_tiles_in_one_pass_over_the_heads(name, variant, wnames, shape, DH, tile, buckets, device, monkeypatch):
    """SPLIT=False, the autotuner's other choice on a GPU (both directions in one loop over
    the heads; the interpreter's config splits): the same cases against the reference."""
    monkeypatch.setattr(tiles, "BUCKETS", buckets)
    N, M, K, L = shape
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    case = _hard_masks(make_case(N, M, K, L, D=DH[0], H=DH[1], variant=variant, weights=wnames or (), seed=N + M,
                                 device=device), gen)
    out = torch.full((N, M), float("nan"), device=device)
    launch_tile_plan(case, out, rows=tile[0], cols=tile[1], global_pairs=2 * tile[1], tuned=False, split=False)
    assert torch.isfinite(out).all(), "some S[i, j] was never written"
    assert_scores_close(out, reference(case), torch.float32, name + " one pass")


def test_split16_planes_keep_22_bits_at_any_magnitude():
    """The host split of fp32 tiles into fp16 pairs (hi + lo/2048, scaled by a power of two):
    finite at magnitudes fp16 cannot hold, ~2^-22 relative where fp16 has normals, and
    below them an absolute error far under the largest value's precision."""
    gen = torch.Generator().manual_seed(5)
    assert tiles.split16_scale(0.0) == 1.0
    cap = 2.0**tiles.F16X3_MAX_EXP  # the kernel's fp32 scalars stay normal
    assert tiles.split16_scale(1e-40) == cap and tiles.split16_scale(1e40) == 1 / cap
    for mag in (1e-9, 1e-3, 1.0, 7e4, 1e12):
        x = torch.randn(64, 33, generator=gen) * mag
        x[0, :4] = torch.tensor([0.0, mag * 1e-9, -mag * 1e-12, mag * 3e-6])
        for p4 in (False, True):
            sigma = tiles.split16_scale(float(x.abs().max()), power_of_four=p4)
            e = math.log2(sigma)
            assert e == round(e) and (not p4 or round(e) % 2 == 0), sigma
            top = float(x.abs().max()) * sigma
            assert tiles.F16X3_MAX / (4 if p4 else 2) < top <= tiles.F16X3_MAX
            planes = tiles.split16_planes(x, sigma)
            assert planes.dtype == torch.float16 and planes.shape == (2, *x.shape) and planes.is_contiguous()
            want = x.double() * sigma
            err = (planes[0].double() + planes[1].double() / 2048 - want).abs()
            assert bool((err <= torch.clamp(want.abs() * 2**-21, min=2**-34)).all()), (mag, p4, err.max().item())


def test_fp32_tiles_refuse_features_their_fp16_pairs_cannot_hold(device):
    """acf_similarity divides huge features down first (with_magnitude_scaling); a direct
    caller of the tiles gets a clear error instead of fp16 infinities."""
    case = make_case(3, 4, 6, 5, D=32, H=2, variant="acf-code", seed=3, device=device)
    with pytest.raises(ValueError, match="too large for the fp32 tiles' fp16 pairs"):
        tile_plan(dict(case, V=case["V"] * 1e17))


F16X3_CASES = [TILE_CASES[5], TILE_CASES[1], TILE_CASES[4]]  # acf-code K = 36, full Γ + pairwise, block-diagonal + pairwise


@pytest.mark.parametrize("mags", [(1.0, 1.0), (3e3, 1e-2), (1e-3, 40.0), (1e-6, 1e-6)])
@pytest.mark.parametrize("name,variant,wnames,shape,DH,tile,buckets", F16X3_CASES, ids=[c[0] for c in F16X3_CASES])
def test_fp32_tiles_run_f16x3_at_22_bits(name, variant, wnames, shape, DH, tile, buckets, mags, device, monkeypatch):
    """fp32 tiles are held as fp16 pairs and every product is three fp16 products (f16x3):
    here ≤ ~1e-7 from float64. fp16 products alone (5e-5) or two of the three (3e-5) stay
    within the 1e-4 contract at these sizes, so the bound is 1e-6. Magnitudes fp16 cannot
    hold (Γ of ×3e3 features, ×1e-6 ones) check the scaling, the pairwise global score
    that κ and λ come back unscaled."""
    monkeypatch.setattr(tiles, "BUCKETS", buckets)
    N, M, K, L = shape
    case = make_case(N, M, K, L, D=DH[0], H=DH[1], variant=variant, weights=wnames or (), seed=11, device=device)
    case = dict(case, V=case["V"] * mags[0], W=case["W"] * mags[1])
    plan, _ = tile_plan(case)
    assert plan.split16 and plan.images.Q.dtype == plan.buckets[0].gam.dtype == torch.float16
    out = torch.full((N, M), float("nan"), device=device)
    launch_tile_plan(case, out, plan, rows=tile[0], cols=tile[1], global_pairs=2 * tile[1])
    ref = reference(case)
    assert ref.std() > 1e-2
    err = (out.double().cpu() - ref.double().cpu()).abs().max().item()
    assert err <= 1e-6, f"{name}: f16x3 at magnitudes {mags}: max |ΔS| = {err:.2e}"


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_every_element_written_and_nothing_else(variant, device, monkeypatch):
    """Poisoned output inside a larger poisoned buffer: each S[i, j] written exactly where
    it belongs (strided view), with the per-item precompute run 2 items at a time."""
    monkeypatch.setattr(tiles, "PREP_CHUNK", 2)
    N, M = 5, 7
    case = make_case(N, M, 6, 5, variant=variant, seed=3, device=device)
    buf = torch.full((N + 2, M + 3), float("nan"), dtype=torch.float32, device=device)
    out = buf[1 : N + 1, 2 : M + 2]
    launch_tile_plan(case, out, rows=16, cols=16)
    assert torch.isfinite(out).all(), "some S[i, j] was never written"
    border = buf.clone()
    border[1 : N + 1, 2 : M + 2] = float("nan")
    assert torch.isnan(border).all(), "the kernel wrote outside S"
    assert_scores_close(out, reference(case), torch.float32, "poisoned launch")


def _plan_in_chunks(case, chunk: int):
    """An fp32 plan of ``case`` prepared ``chunk`` items at a time; not split into fp16 pairs, so
    that plans can be compared element by element (a last-bit difference of two BLAS calls
    may round an fp16 hi plane the other way)."""
    v_mask, w_mask, weights, _ = checked(case)
    return tiles.plan_tiles(case["V"], v_mask, case["W"], w_mask, heads=case["heads"], weights=weights,
                            G=case.get("G"), st=torch.float32, chunk=chunk, split16=False)


def _global_rows(img) -> torch.Tensor:
    """The images' Pv rows of the global score as the kernel reads them (hi + lo/2048 planes, unscaled)."""
    pv, planes = img.pglob["pv"].double(), img.pglob["pv"].shape[1]
    x = pv[:, 0] + (pv[:, 1] / 2048 if planes == 2 else 0)
    return x * img.pglob["unscale"].double()[:, None, None]


@pytest.mark.parametrize("K", [4, 5])  # 5 regions: 8 rows per image in the tile layout (tiles.image_rows)
@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_chunked_prepare_equals_one_shot(variant, K, device):
    """plan_tiles prepares the items ``chunk`` at a time (COCO's 5,000 images: 5 chunks): the
    chunks put together must be the one-shot plan, its rows per image in the tile layout and
    the global score's rows (paper) included, and score the same."""
    case = make_case(5, 7, K, 9, variant=variant, seed=9, device=device)
    one, two = _plan_in_chunks(case, tiles.PREP_CHUNK), _plan_in_chunks(case, 2)
    assert one.images.n == two.images.n == 5 and one.images.K == two.images.K == (8 if K == 5 else K)
    assert [b.LB for b in one.buckets] == [b.LB for b in two.buckets]
    pairs = [(one.images, two.images)] + list(zip(one.buckets, two.buckets))
    for a, b in pairs:
        for name in ("Q", "Kk", "O", "mask", "norm", "gam") + (("gx",) if a is one.images else ()):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:  # BLAS may round differently for a different batch size
                assert x.shape == y.shape and torch.allclose(x.double(), y.double(), rtol=1e-5, atol=1e-6), name
        assert (a.Kk is a.Q) == (b.Kk is b.Q) and (a.O is a.Q) == (b.O is b.Q)
    assert (one.images.pglob is None) == (two.images.pglob is None) == (variant != "paper")
    if variant == "paper":
        assert torch.allclose(_global_rows(one.images), _global_rows(two.images), rtol=1e-5, atol=1e-6)
    got = [torch.full((5, 7), float("nan"), device=device) for _ in range(2)]
    for plan, out in zip((one, two), got):
        launch_tile_plan(case, out, plan=plan)
    assert_scores_close(got[1], reference(case), torch.float32, f"{variant} K={K}, planned 2 images at a time")
    assert (got[0] - got[1]).abs().max().item() <= 1e-5


def test_token_order_within_a_text_changes_nothing(device):
    """The tiles move each text's valid tokens to the front: S must not depend on where
    a text's holes are (ACF has no positional term after the encoder)."""
    case = make_case(3, 4, 5, 9, variant="paper", seed=17, device=device)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(9, generator=gen)
    moved = dict(case, W=case["W"][:, perm], w_mask=case["w_mask"][:, perm])
    a, b = score(case, "triton"), score(moved, "triton")
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


def test_pair_kernel_v1_still_matchesreference(device):
    """Kernel v1 stays until v2 is measured on a GPU beside it (bench/gpu_check.py): its
    figures are only worth comparing while it is right."""
    for variant in ("paper", "acf-code"):
        case = make_case(2, 3, 5, 4, variant=variant, seed=4, device=device)
        v_mask, w_mask, weights, scale = checked(case)
        img, txt = pair_v1.prepare_sides(case["V"], v_mask, case["W"], w_mask, heads=case["heads"], weights=weights,
                                         G=case.get("G"))
        out = torch.full((2, 3), float("nan"), device=device)
        pair_v1.launch_similarity(img, txt, out, scale=scale, u1=case["u1"], u2=case["u2"],
                                  global_emb=case.get("global_emb"))
        assert_scores_close(out, reference(case), torch.float32, f"kernel v1 {variant}")


# ------------------------------------------------------------------ gradients

GRAD_CASES = [("paper", (3, 3, 5, 4)), ("acf-code", (3, 3, 5, 4))]


@pytest.mark.parametrize("variant,shape", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_backward_recomputes_with_the_torch_backend_and_matches_float64_eager(variant, shape, device):
    """The triton backend's backward is a blockwise recompute with the torch backend
    (``TritonSimilarityFunction.backward``): this checks that recompute, driven by the
    kernel's forward, against float64 autograd of the eager form (spec §9). No Triton
    backward kernel exists to test."""
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
    S = score(c32, "triton")
    g32 = torch.autograd.grad(S, p32, grad_out.to(S.device, torch.float32))
    c64, p64 = leaves(case, torch.float64)
    S64 = score(c64, "eager")
    g64 = torch.autograd.grad(S64, p64, grad_out.to(S64.device))
    assert len(g32) == len(g64) >= 4
    for a, b in zip(g32, g64):
        assert_grad_close(a, b, torch.float32, f"a {tuple(b.shape)} input")


def test_fp16_storage(device):
    """fp16 storage, fp32 accumulation (the interpreter's fp16 tl.dot is exact IEEE,
    so this also runs on CPU; bf16 arithmetic is not, so bf16 is GPU-only)."""
    case = make_case(3, 4, 7, 6, variant="paper", seed=2, device=device, dtype=torch.float16)
    S = score(case, "triton")
    assert S.dtype == torch.float32
    assert_scores_close(S, reference(case), torch.float16, "fp16 storage")


def test_fp16_storage_batched_gamma_w(device):
    """fp16 storage (the bf16 path's dots) with 8 texts of bucket 16 in a tile: the batched
    p·Γw (tiles.batched_gw) in the storage dtype; fp32 tiles take it as f16x3 (TILE_CASES)."""
    case = _two_buckets(make_case(6, 19, 5, 24, D=32, H=2, variant="acf-code", seed=6, device=device,
                                  dtype=torch.float16))
    plan, _ = tile_plan(case, torch.float16)
    assert [b.LB for b in plan.buckets] == [16, 32]
    assert tiles.tile_meta(plan, plan.buckets[0], dot_prec="tf32", embed=True)["BATCHED_GW"]
    assert_scores_close(score(case, "triton"), reference(case), torch.float16, "fp16 batched p Gamma_w")


def test_pairwise_global_score_in_fp16_storage(device):
    """The pairwise global score's per-pair means as dots (fp16/bf16 storage; the fp32 tiles
    sum them masked), weighted 0.95 in S so that they show: u2 = 0.8 left them a fifth of S,
    where an error of 0.05 in every mean stayed inside fp16's bound."""
    case = dict(make_case(5, 9, 7, 20, variant="paper", seed=4, device=device, dtype=torch.float16), u2=0.05)
    assert case["G"] is not None and case["weights"].get("z_o") is not None
    assert_scores_close(score(case, "triton"), reference(case), torch.float16, "fp16 pairwise global")


def test_fp16_storage_full_gamma_forms_in_chunks(device):
    """fp16 storage (the bf16 path's dots) at COCO's phase-B shape: 36 regions x 8 heads (Γv
    in 5 chunks of 64 columns, its upper triangle of chunks: tiles._gamma_form's loops) and
    texts of 32 tokens x 8 heads (Γw in 4 chunks, looped; bucket 16's in 2, unrolled), in full
    128 x 128 tiles. These random scores stay within ±0.1, so fp16's bound (for scores of order 1) applies to S
    divided by its largest magnitude: halving the off-diagonal chunks' weight (9.8e-4 here,
    3.5e-5 when right) fails it, as it would not against the plain bound."""
    case = _hard_masks(make_case(4, 5, 36, 32, D=64, H=8, variant="paper", seed=9, device=device, dtype=torch.float16),
                       torch.Generator().manual_seed(9))
    plan, _ = tile_plan(case, torch.float16)
    metas = [tiles.tile_meta(plan, b, dot_prec="tf32", embed=False) for b in plan.buckets]
    assert [m["HKP"] // m["QCV"] for m in metas] == [5, 5]
    assert [m["H"] * m["LB"] // m["QCW"] for m in metas] == [2, 4]
    ref = reference(case)
    top = ref.abs().max()
    assert_scores_close(score(case, "triton") / top, ref / top, torch.float16, "fp16 full Gamma in chunks, S / max|S|")


# ------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_low_precision_storage(dtype, variant, device):
    case = make_case(9, 23, 36, 29, D=256, H=8, variant=variant, seed=7, device=device, dtype=dtype)
    # float64 reference of the same (rounded) inputs
    assert_scores_close(score(case, "triton"), reference(case), dtype, f"{dtype} {variant}")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["paper", "acf-code"])
@pytest.mark.parametrize("D,H,K,L", [(1024, 8, 36, 32), (512, 4, 64, 128), (256, 8, 17, 3)])
def test_full_size_fp32(variant, D, H, K, L, device):
    case = make_case(5, 11, K, L, D=D, H=H, variant=variant, seed=D + K, device=device)
    assert_scores_close(score(case, "triton"), reference(case), torch.float32, f"{variant} D={D} K={K} L={L}")


@pytest.mark.gpu
def test_tf32_path(device):
    case = make_case(7, 13, 36, 24, D=512, H=8, variant="paper", seed=2, device=device)
    c = dict(case)
    v_mask, w_mask, weights, scale = check_similarity_inputs(
        c["V"], c["v_mask"], c["W"], c["w_mask"], heads=8, scale=None, u1=0.6, u2=0.8,
        weights=c["weights"], G=c["G"], global_emb=None)
    S = ks.triton_similarity(c["V"], v_mask, c["W"], w_mask, heads=8, scale=scale, u1=0.6, u2=0.8,
                             weights=weights, G=c["G"], global_emb=None, allow_tf32=True)
    assert_scores_close(S, reference(case), torch.bfloat16, "tf32 dots")  # one tf32 product per dot: the low-precision bound


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_torch_compile_traces_the_op(variant, device):
    """fullgraph=True: a graph break anywhere, the registered op included, fails.

    What is compiled is the op's launcher (``launch_similarity`` ->
    ``torch.ops.acf_fast.fused_similarity``, an opaque op with a fake implementation
    for its output shape). ``acf_similarity`` itself is not fullgraph-traceable by
    design: it validates its inputs by reading them (NaN/Inf, an item with no valid
    row: spec §9 wants a clear error before any work), and data-dependent checks end
    a graph. On the CPU the graph runs with the "aot_eager" backend (the op then runs
    in the interpreter); on a GPU with Inductor."""
    import torch._dynamo

    case = make_case(3, 4, 5, 6, D=64, H=4, variant=variant, seed=4, device=device)
    v_mask, w_mask, weights, scale = checked(case)

    def fused(V, W, G, emb):
        return ks.launch_similarity(V, v_mask, W, w_mask, heads=case["heads"], scale=scale, u1=case["u1"],
                                    u2=case["u2"], weights=weights, G=G, global_emb=emb)

    torch._dynamo.reset()
    fn = torch.compile(fused, fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    S = fn(case["V"], case["W"], case.get("G"), case.get("global_emb"))
    assert_scores_close(S, reference(case), torch.float32, "compiled op")


def _launch_arguments(case, st, variant_dtype, **launch_kw):
    """(report signature, launch signature, report attrs, launch attrs) for the tile kernel:
    what bench/kernel_report.py compiles for ``variant_dtype`` against what the JIT makes of
    the arguments launch_tiles passes for ``case`` planned in ``st`` (bound, not run)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from bench import kernel_report
    from bench.offline_compile import _ast_arguments

    kern = tiles._tile_kernel
    calls = []

    class Recorder:  # stands in for the kernel: launch_tiles' arguments, nothing run
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((a, k))

    plan, _ = tile_plan(case, st)
    # nor the pairwise global score after each launch: it would read the κ and b̄ not written
    saved = tiles._tile_kernel, tiles._add_global
    tiles._tile_kernel, tiles._add_global = Recorder(), lambda *a, **k: None
    try:
        launch_tile_plan(case, torch.empty(case["V"].shape[0], case["W"].shape[0], device=case["V"].device), plan=plan,
                tuned=False, **launch_kw)
    finally:
        tiles._tile_kernel, tiles._add_global = saved
    jit = kern if isinstance(kern, JITFunction) else JITFunction(kern.fn, **kern.kwargs)  # interpreted: its options
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    report_sig = kernel_report.v2_requests(*variant_dtype, buckets=(16,))[0]["request"]["signature"]
    out = []
    for args, kw in calls:
        bound, spec, opts = binder(*args, **kw)
        _, sig, _, attrs = jit._pack_args(backend, {"enable_fp_fusion": True}, bound, spec, opts)
        constexprs = {k: v for k, v in kw.items() if k in jit.arg_names}  # (their values do not matter here)
        want_sig, _, want_attrs = _ast_arguments(jit.arg_names, report_sig, constexprs)
        out.append((want_sig, sig, want_attrs, {k: v for k, v in attrs.items() if v}))
    return out


@pytest.mark.parametrize("variant,st", [("acf-code", torch.float32), ("paper", torch.float32),
                                        ("acf-code", torch.bfloat16), ("paper", torch.bfloat16)],
                         ids=["acf-code-fp32", "paper-fp32", "acf-code-bf16", "paper-bf16"])
def test_launch_passes_the_argument_types_the_kernel_report_compiles(variant, st, device):
    """The offline report (bench/kernel_report.py) must build what a launch compiles: the
    same argument types, and 16-divisible integers where the launch's are. An fp32 tile's lo
    planes lie a multiple of 16 elements after their hi planes (tiles.lo_plane_offset), also
    for Γ blocks of an odd size (K = 3 regions: 3 x 3 blocks), so the lo loads are vector
    loads like the hi ones: with offsets of unknown alignment every lo element was a 16-bit
    load (acf-code fp32, bucket 16: 13.8 K warp-instructions per pair, 11.6 K aligned)."""
    case = make_case(3, 5, 3, 6, D=64, H=4, variant=variant, seed=7, device=device)
    runs = _launch_arguments(case, st, ((variant,), ("bf16" if st == torch.bfloat16 else "fp32",)))
    assert runs
    for want_sig, sig, want_attrs, attrs in runs:
        assert {k: v for k, v in sig.items() if v != "constexpr"} == \
            {k: v for k, v in want_sig.items() if v != "constexpr"}
        assert attrs == want_attrs


def test_every_chunk_of_a_launch_compiles_to_the_same_kernel(device):
    """With the pairwise global score the tiles launch per chunk of images; every chunk's
    arguments must specialise like the first one's, or each misaligned chunk compiles (and
    runs) another variant of the kernel: chunks of 4 images of K = 3 regions started their
    int8 region masks 12 bytes into a 16-byte line."""
    case = make_case(37, 5, 3, 6, D=64, H=4, variant="paper", seed=8, device=device)
    pairs_per_chunk = 4 * 5  # asks for chunks of 4 images (one tile) of the 5 texts
    runs = _launch_arguments(case, torch.float32, (("paper",), ("fp32",)), global_pairs=pairs_per_chunk)
    assert len(runs) >= 2
    for want_sig, sig, want_attrs, attrs in runs:
        assert (sig, attrs) == runs[0][1:4:2]


def _two_buckets(case):
    """A case of L = 24 tokens whose text 0 keeps all of them (bucket 32) and the others at
    most 16 (bucket 16), each at least its first."""
    w_mask = case["w_mask"].clone()
    w_mask[1:, 16:] = False
    w_mask[1:, 0] = True
    return dict(case, w_mask=w_mask)


def test_launch_timings_cover_every_pair_once(device):
    """launch_tiles(timings=[...]) appends one record per launch (bucket, chunk of images):
    together they cover every pair once, with their kernel and global-score seconds."""
    case = _two_buckets(make_case(37, 6, 3, 24, D=32, H=2, variant="paper", seed=12, device=device))
    timings = []
    out = torch.full((37, 6), float("nan"), device=device)
    launch_tile_plan(case, out, tuned=False, global_pairs=16 * 5, timings=timings)
    assert_scores_close(out, reference(case), torch.float32, "timed launch")
    assert len(timings) >= 3 and {t["LB"] for t in timings} == {16, 32}
    assert sum(t["pairs"] for t in timings) == 37 * 6
    for t in timings:
        assert t["pairs"] == t["images"] * t["texts"] and t["kernel_s"] > 0 and t["global_s"] > 0


def test_compile_ahead_collects_every_build_and_launches_nothing(device):
    """Inside tiles.compile_ahead() a similarity call launches nothing (S is zero) and leaves
    one request per bucket and autotuning config; after the block calls score again."""
    case = _two_buckets(make_case(4, 12, 5, 24, D=32, H=2, variant="acf-code", seed=11, device=device))
    with tiles.compile_ahead() as ahead:
        S = score(case, "triton")
    assert S.shape == (4, 12) and not S.any()
    configs = len(tiles._prune(tiles._configs(tiles._INTERPRET), {}, **ahead.requests[0][2]))
    assert sorted(kw["LB"] for _, _, kw in ahead.requests) == [16] * configs + [32] * configs
    for grid, args, kw in ahead.requests:
        assert kw["num_warps"] >= 1 and "SPLIT" in kw and "GROUP_I" in kw and grid[0] >= 1
    assert tiles._AHEAD is None
    assert_scores_close(score(case, "triton"), reference(case), torch.float32, "after compile_ahead")
    with pytest.raises(RuntimeError, match="nest"):
        with tiles.compile_ahead():
            with tiles.compile_ahead():
                pass
    assert tiles._AHEAD is None


def test_compile_ahead_warms_every_request_through_the_kernel():
    """CompileAhead.compile hands each request to the kernel's warmup (the JIT's own path:
    the same keys as the launches) with its grid and kwargs, and counts distinct builds."""
    t = torch.zeros(4)
    calls = []

    class Kernel:
        def warmup(self, *args, grid, **kw):
            calls.append((grid, args, kw))

    ahead = tiles.CompileAhead()
    ahead.requests = [((3,), (t, 7), {"LB": 16, "num_warps": 8}), ((5,), (t, 9), {"LB": 16, "num_warps": 8}),
                      ((3,), (t, 7), {"LB": 32, "num_warps": 8})]
    ahead.global_requests = [((2,), (t, 1), {"BM": 16, "DOT_PREC": "tf32"}), ((4,), (t, 3), {"BM": 16, "DOT_PREC": "tf32"})]
    ahead.compile(workers=2, kernel=Kernel(), global_kernel=Kernel())
    assert calls == ahead.requests + ahead.global_requests
    assert ahead.builds == 3 and ahead.workers == 2 and ahead.seconds >= 0


def test_compile_ahead_collects_the_global_score_kernel_of_each_bucket(device):
    """With the pairwise global score (paper) a compile_ahead block also collects one
    request of kernels/pair_global.py per bucket (its first chunk of images: every chunk
    compiles to the same kernel), with its launch's kwargs; nothing runs and S stays zero."""
    from acf_fast.kernels import pair_global

    case = _two_buckets(make_case(9, 12, 5, 24, D=32, H=2, variant="paper", seed=12, device=device))
    plan, _ = tile_plan(case, torch.float32)
    out = torch.full((9, 12), float("nan"), device=device)
    with tiles.compile_ahead() as ahead:
        launch_tile_plan(case, out, plan=plan, global_pairs=4 * 3)  # several chunks of images per bucket
    assert not out.any()
    assert len(ahead.global_requests) == 2 == len(plan.buckets)
    want = pair_global.pair_global_meta(torch.float32)
    for grid, args, kw in ahead.global_requests:
        assert kw == want and grid[0] >= 1 and args[0].shape[0] <= 9


def _spread_heads(x: torch.Tensor, stride: int, planes: int) -> torch.Tensor:
    """x (H, R, DH) contiguous (with ``planes`` = 2, an fp32 tile's fp16 hi plane, its lo
    plane tiles.lo_plane_offset further on) copied into a buffer whose heads lie
    ``stride`` elements apart. On CPU the untouched gaps are never backed by memory (a
    large allocation is mapped lazily)."""
    H, R, DH = x.shape
    n = tiles.lo_plane_offset(x)
    buf = torch.empty((planes - 1) * n + (H - 1) * stride + R * DH, dtype=x.dtype, device=x.device)
    for p in range(planes):
        src = x.as_strided(x.shape, x.stride(), x.storage_offset() + p * n)
        buf.as_strided(x.shape, (stride, DH, 1), p * n).copy_(src)
    return buf.as_strided(x.shape, (stride, DH, 1))


def _spread_side(side, stride: int):
    """A TileImages / TextBucket with its Q/Kk/O spread to head stride ``stride`` (Kk / O
    stay Q itself where they were)."""
    planes = 1 if side.split is None else 2
    q = _spread_heads(side.Q, stride, planes)
    other = lambda t: q if t is side.Q else _spread_heads(t, stride, planes)  # noqa: E731
    return dataclasses.replace(side, Q=q, Kk=other(side.Kk), O=other(side.O))


@pytest.mark.parametrize("side,gap", [("images", "far"), ("texts", "far"), ("texts", "small")])
@pytest.mark.parametrize("st", [torch.float16, torch.float32], ids=["fp16", "fp32-f16x3"])
@pytest.mark.parametrize("variant", ["acf-code", "paper"])
def test_head_offsets_past_two_to_the_31(variant, st, side, gap, device):
    """Features of a large gallery span more than 2^31 elements on one side (H·M·LB·DH at
    D = 1024: ~75 K captions of 32 tokens, ~67 K images of 36 regions), while each head's
    stride still fits in int32. Head h's base offset h·stride must then be int64: here one
    side's heads lie 2^30 elements apart ("far"), so heads 2 and 3 start past 2^31, and the
    launch must give exactly what the contiguous layout gives. "small": text heads spread
    less far, but not contiguous: only the int64 path reads their stride."""
    case = make_case(3, 5, 4, 6, D=64, H=4, variant=variant, seed=31, device=device)
    plan, _ = tile_plan(case, st)
    want = torch.full((3, 5), float("nan"), device=device)
    launch_tile_plan(case, want, plan=plan, rows=16, cols=16)

    def spread(x):
        # "small": a plane and a head apart, so that the lo plane a plane after each head (fp32) is free
        return _spread_side(x, 2**30 if gap == "far" else tiles.lo_plane_offset(x.Q) + x.Q.shape[1] * x.Q.shape[2])

    if side == "images":
        far = dataclasses.replace(plan, images=spread(plan.images))
    else:
        far = dataclasses.replace(plan, buckets=[spread(b) for b in plan.buckets])
    assert tiles.tile_meta(far, far.buckets[0], dot_prec="f16x3", embed=False)["I64_HEADS"]
    assert not tiles.tile_meta(plan, plan.buckets[0], dot_prec="f16x3", embed=False)["I64_HEADS"]
    got = torch.full((3, 5), float("nan"), device=device)
    launch_tile_plan(case, got, plan=far, rows=16, cols=16)
    assert_scores_close(want, reference(case), st, "contiguous heads")
    assert torch.equal(got, want)


def test_image_gram_blocks_past_two_to_the_31_take_int64_offsets(device):
    """The block-diagonal tile offsets the images' Γv blocks in int32 (one less 64-bit pointer
    live through the tile: it spilled). Past 2^31 elements of Γv (n·H·K²: ~16 K images of 128
    regions, whose heads' offsets still fit) the launch must take the int64 path."""
    case = make_case(3, 5, 4, 6, D=64, H=4, variant="acf-code", seed=32, device=device)
    plan, _ = tile_plan(case, torch.float16)
    meta = lambda p: tiles.tile_meta(p, p.buckets[0], dot_prec="f16x3", embed=False)["I64_HEADS"]  # noqa: E731
    n, H, K, _ = plan.images.gam.shape
    big = plan.images.gam[:1, :1, :1, :1].expand(-(-2**31 // (H * K * K)), H, K, K)  # no memory behind it
    assert not meta(plan)
    assert meta(dataclasses.replace(plan, images=dataclasses.replace(plan.images, gam=big)))
    smaller = big[: (2**31 - 1) // (H * K * K)]
    assert not meta(dataclasses.replace(plan, images=dataclasses.replace(plan.images, gam=smaller)))


def test_the_global_score_takes_the_plans_operands(device, monkeypatch):
    """plan_tiles prepares Zw and the images' Pv for the global score's kernel once (the fp32
    split reads their largest magnitudes back to the host): launches over several chunks of
    images and both buckets take the plan's, and make none."""
    from acf_fast.kernels import pair_global

    case = _two_buckets(make_case(9, 12, 5, 24, D=32, H=2, variant="paper", seed=13, device=device))
    plan, _ = tile_plan(case, torch.float32)
    assert plan.glob.operands["dtype"] == torch.float32 and plan.glob.operands["zw"].dtype == torch.float16
    assert plan.images.pglob["pv"].shape == (9, 2, 2 * plan.images.K, 32)  # images, hi/lo planes, H·K, D

    def refuse(*a, **k):
        raise AssertionError("operands made again at a launch")

    monkeypatch.setattr(pair_global, "weight_operands", refuse)
    monkeypatch.setattr(pair_global, "image_operands", refuse)
    out = torch.full((9, 12), float("nan"), device=device)
    launch_tile_plan(case, out, plan=plan, global_pairs=4 * 3)  # several chunks of images per bucket
    assert_scores_close(out, reference(case), torch.float32, "global score with the plan's operands")
