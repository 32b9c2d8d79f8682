"""The fused Triton backend beyond the shared contract of tests/test_backends.py: its
kernel paths, launch, limits, backward and torch.compile.

On CPU every kernel runs through the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton), so shapes stay tiny: D = 32 with
2 heads, or D = 64 with 4 heads (d = 16, the smallest tl.dot tile); each program
instance costs ~50-100 ms there. ``--device cuda`` runs the same tests on
a GPU, plus the ``gpu``-marked ones: fp16 / bf16, full-size shapes, the tf32 path and
torch.compile.
"""
import pytest
import torch

from acf_fast import acf_similarity
from acf_fast.kernels import similarity as ks
from acf_fast.validate import check_similarity_inputs
from inputs import make_case, ragged_mask, reference, score
from tolerances import assert_grad_close, assert_scores_close

# ------------------------------------------------------------------ forward vs reference

WEIGHT_PATHS = [
    # id, (N, M, K, L), variant, weights, (D, H): subsets of the weights take their own kernel paths
    ("local-only", (3, 4, 6, 5), "local", ("z_x", "z_y", "z_o"), (32, 2)),
    ("zx-xw-no-zo", (3, 4, 6, 5), "paper", ("z_x", "x_w", "gate"), (32, 2)),  # block-diagonal Γ + pairwise global
    ("zo-only", (2, 5, 6, 7), "local", ("z_o",), (32, 2)),  # O != Q, full Γ, shared q/k
]


@pytest.mark.parametrize("name,shape,variant,wnames,DH", WEIGHT_PATHS, ids=[c[0] for c in WEIGHT_PATHS])
def test_weight_subsets_match_float64reference(name, shape, variant, wnames, DH, device):
    N, M, K, L = shape
    case = make_case(N, M, K, L, D=DH[0], H=DH[1], variant=variant, weights=wnames, seed=len(name), device=device)
    assert_scores_close(score(case, "triton"), reference(case), torch.float32, name)


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_query_row_blocks_and_d_chunks(variant, device, monkeypatch):
    """Tiny register and shared-memory budgets force several query-row blocks per
    direction, several passes over the Γ factor's columns and several D-chunks in the
    global term (the paths long captions and D = 1024 take on a GPU)."""
    monkeypatch.setattr(ks, "_REG_TILE", 256)
    monkeypatch.setattr(ks, "_SMEM_TILE_BYTES", 1024)
    case = make_case(2, 3, 20, 18, variant=variant, seed=21, device=device)
    assert_scores_close(score(case, "triton"), reference(case), torch.float32, "row blocks and D-chunks")


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_every_element_written_and_nothing_else(variant, device, monkeypatch):
    """Poisoned output inside a larger poisoned buffer: each S[i, j] written exactly where it belongs.

    The per-item precompute runs 2 items at a time here, so the chunked fill of the
    kernel layout is exercised too; N = 5 leaves a last image group of 1 (GROUP_N = 4
    under the interpreter); a grid limit of 7 programs splits the launch into image
    blocks."""
    monkeypatch.setattr(ks, "_PREP_CHUNK", 2)
    monkeypatch.setattr(ks, "_MAX_GRID", 7)
    N, M = 5, 2
    case = make_case(N, M, 6, 5, variant=variant, seed=3, device=device)
    v_mask, w_mask, weights, scale = check_similarity_inputs(
        case["V"], case["v_mask"], case["W"], case["w_mask"], heads=case["heads"], scale=case["scale"], u1=case["u1"],
        u2=case["u2"], weights=case["weights"], G=case.get("G"), global_emb=case.get("global_emb"))
    img, txt = ks.prepare_sides(case["V"], v_mask, case["W"], w_mask, heads=case["heads"], weights=weights,
                                G=case.get("G"))
    buf = torch.full((N + 2, M + 3), float("nan"), dtype=torch.float32, device=device)
    out = buf[1 : N + 1, 2 : M + 2]  # strided view
    ks.launch_similarity(img, txt, out, scale=scale, u1=case["u1"], u2=case["u2"], global_emb=case.get("global_emb"))
    assert torch.isfinite(out).all(), "some S[i, j] was never written"
    border = buf.clone()
    border[1 : N + 1, 2 : M + 2] = float("nan")
    assert torch.isnan(border).all(), "the kernel wrote outside S"
    assert_scores_close(out, reference(case), torch.float32, "poisoned launch")


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_chunked_prepare_equals_one_shot(variant, device, monkeypatch):
    case = make_case(5, 3, 4, 3, variant=variant, seed=9, device=device)
    wts = case["weights"] or {}
    one = ks.prepare_sides(case["V"], case["v_mask"], case["W"], case["w_mask"], heads=case["heads"], weights=wts, G=case.get("G"))
    monkeypatch.setattr(ks, "_PREP_CHUNK", 2)
    two = ks.prepare_sides(case["V"], case["v_mask"], case["W"], case["w_mask"], heads=case["heads"], weights=wts, G=case.get("G"))
    for a, b in zip(one, two):
        for name in ("Q", "Kk", "O", "mask", "norm", "fac", "Pglob", "gx"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:  # BLAS may round differently for a different batch size
                assert x.dtype == y.dtype and torch.allclose(x.double(), y.double(), rtol=1e-5, atol=1e-6), name
        assert (a.Kk is a.Q) == (b.Kk is b.Q) and (a.O is a.Q) == (b.O is b.Q)


def test_launch_refuses_bad_out(device):
    case = make_case(2, 2, 3, 3, variant="acf-code", device=device)
    img, txt = ks.prepare_sides(case["V"], case["v_mask"], case["W"], case["w_mask"], heads=case["heads"], weights={}, G=None)
    with pytest.raises(ValueError, match="out must be"):
        ks.launch_similarity(img, txt, torch.empty(2, 3, device=device), scale=(4.0, 9.0), u1=0.5, u2=1.0)


# ------------------------------------------------------------------ limits


@pytest.mark.parametrize("K,L,match", [(65, 4, "K = 65"), (4, 129, "L = 129")])
def test_refuses_too_long(K, L, match, device):
    V = torch.randn(1, K, 64, device=device)
    W = torch.randn(1, L, 64, device=device)
    with pytest.raises(ValueError, match=match):
        acf_similarity(V, None, W, None, heads=4, u2=1.0, backend="triton")


def test_refuses_head_width_not_power_of_two(device):
    V = torch.randn(1, 3, 48, device=device)
    W = torch.randn(1, 3, 48, device=device)
    with pytest.raises(ValueError, match="head width"):
        acf_similarity(V, None, W, None, heads=1, u2=1.0, backend="triton")


# ------------------------------------------------------------------ pieces


def test_gram_factor_reproduces_gram_on_valid_rows():
    """C Cᵀ = Γ on valid rows, also when Γ is singular (H·T > D) and rows are masked."""
    gen = torch.Generator().manual_seed(1)
    n, H, T, D = 3, 4, 5, 12  # HT = 20 > D = 12: rank-deficient
    P = torch.randn(n, H * T, D, generator=gen, dtype=torch.float64)
    gram = P @ P.transpose(1, 2)
    mask = ragged_mask(n, T, gen)
    C = ks.gram_factor(gram.float(), mask, H).double()
    valid = mask.repeat(1, H)
    keep = valid[:, :, None] & valid[:, None, :]
    err = ((C @ C.transpose(1, 2) - gram) * keep).abs().max().item()
    assert err <= 1e-5 * gram.abs().max().item()


@pytest.mark.skipif(ks._triton_op is None, reason="this torch has no torch.library.triton_op")
def test_registered_as_torch_library_op():
    assert ks._fused_op is not None
    assert hasattr(torch.ops.acf_fast, "fused_similarity")


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
    assert_scores_close(S, reference(case), torch.bfloat16, "tf32 dots")  # tf32: the low-precision bound


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_torch_compile_traces_the_op(variant, device):
    """fullgraph=True: a graph break anywhere, the registered op included, fails.

    What is compiled is the fused forward from prepared sides (``fused_similarity``,
    the ``acf_fast::fused_similarity`` op). ``acf_similarity`` itself is not
    fullgraph-traceable by design: it validates its inputs by reading them (NaN/Inf,
    an item with no valid row: spec §9 wants a clear error before any work), and
    data-dependent checks end a graph. Under TRITON_INTERPRET=1 Dynamo cannot trace a
    Triton kernel at all (its fake-tensor pass reaches the interpreter's data
    pointers), so this runs on a GPU only."""
    case = make_case(4, 6, 8, 7, D=256, H=8, variant=variant, seed=4, device=device)
    v_mask, w_mask, weights, scale = check_similarity_inputs(
        case["V"], case["v_mask"], case["W"], case["w_mask"], heads=case["heads"], scale=case["scale"],
        u1=case["u1"], u2=case["u2"], weights=case["weights"], G=case.get("G"), global_emb=case.get("global_emb"))
    img, txt = ks.prepare_sides(case["V"], v_mask, case["W"], w_mask, heads=case["heads"], weights=weights,
                                G=case.get("G"))
    import torch._dynamo

    torch._dynamo.reset()
    fn = torch.compile(lambda i, t, emb: ks.fused_similarity(i, t, scale=scale, u1=case["u1"], u2=case["u2"],
                                                              global_emb=emb), fullgraph=True)
    assert_scores_close(fn(img, txt, case.get("global_emb")), reference(case), torch.float32, "compiled op")
