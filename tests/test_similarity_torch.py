"""backend="torch" (spec §8 algebra, chunked) and the per-item precompute.

References: the float64 per-pair loop (acf_fast.reference) for values, float64
autograd of the eager backend for gradients, and direct float64 formulas for every
precompute field.
"""
import pytest
import torch

import acf_fast.fused_torch as ft
from acf_fast import acf_similarity
from acf_fast.precompute import precompute_items
from acf_fast.reference import authors_local_score
from test_similarity_eager import MATS, SHAPES, make_case, prefix_case, reference, run


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_matches_reference(variant, shape):
    N, M, K, L, D, H = shape
    kw = make_case(N, M, K, L, D, variant, seed=100 + sum(shape))
    S = run(kw, H, "torch")
    assert S.shape == (N, M) and S.dtype == torch.float32
    assert (S.double() - reference(kw, H)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("present", [("z_x",), ("z_o",), ("z_y", "x_v"), ("z_x", "z_o", "x_w")])
def test_torch_partial_weights(present):
    """Any subset of the weights may be absent (identity): exercises Q is Kk / O is Q / block-diagonal Γ."""
    kw = make_case(4, 5, 6, 5, 64, "paper", seed=len(present) * 7)
    kw["weights"] = {k: kw["weights"][k] for k in present}
    assert (run(kw, 4, "torch").double() - reference(kw, 4)).abs().max().item() <= 1e-4


def test_torch_pairwise_global_with_identity_weights():
    """z_o and x_w / x_v absent with a pairwise global: Pglob is the block-sparse P_blk itself."""
    kw = make_case(3, 4, 5, 6, 64, "paper", seed=9)
    kw["weights"] = {"gate": kw["weights"]["gate"]}
    assert (run(kw, 8, "torch").double() - reference(kw, 8)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_torch_float64_no_masks(variant):
    kw = make_case(3, 4, 5, 6, 64, variant, seed=4, ragged=False, dtype=torch.float64)
    S = run(kw, 4, "torch")
    assert S.dtype == torch.float64
    assert torch.allclose(S, reference(kw, 4), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_half_storage(dtype):
    """Half inputs compute in float32 and return float32; spec §9: within 5e-3 of float64 on the same (rounded) inputs."""
    kw = make_case(3, 5, 6, 5, 64, "paper", seed=12, dtype=dtype)
    S = run(kw, 4, "torch")
    assert S.dtype == torch.float32
    assert (S.double() - reference(kw, 4)).abs().max().item() <= 5e-3


def test_torch_acf_code_local_equals_authors():
    V, W, w_mask, lens = prefix_case(4, 6, 7, 9, 128, seed=21)
    S = acf_similarity(V, None, W, w_mask, heads=8, scale=(4.0, 9.0), u1=0.5, u2=1.0, backend="torch")
    ref = authors_local_score(V, W, lens, heads=8, smooth_i2t=4.0, smooth_t2i=9.0)
    assert (S.double() - ref).abs().max().item() <= 1e-4


def test_auto_is_torch_on_cpu():
    kw = make_case(3, 4, 5, 6, 64, "paper", seed=13)
    assert torch.equal(run(kw, 4, "auto"), run(kw, 4, "torch"))


def tiny_budget(monkeypatch):
    """One pair per chunk, one image per image block, one text per text chunk."""
    monkeypatch.setattr(ft, "CHUNK_BUDGET_BYTES", 1)
    monkeypatch.setattr(ft, "ITEM_BUDGET_BYTES", 1)
    monkeypatch.setattr(ft, "_TEXT_BLOCK", 1)


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_chunking_does_not_change_the_result(variant, monkeypatch):
    kw = make_case(5, 7, 6, 5, 64, variant, seed=31, dtype=torch.float64)
    whole = run(kw, 4, "torch")
    n, m = ft._chunk_shape(5, 7, 6, 5, 64, 4, 8)
    assert (n, m) == (5, min(7, ft._PAIR_TEXTS))  # default: all 5 images in one chunk
    tiny_budget(monkeypatch)
    assert ft._chunk_shape(5, 7, 6, 5, 64, 4, 8) == (1, 1)
    assert ft._image_block(5, 6, 64, 4, 8, True) == 1
    assert ft._text_block(7, 5, 64, 4, 8, True) == 1
    chunked = run(kw, 4, "torch")
    assert torch.allclose(chunked, whole, atol=1e-13, rtol=0)


def test_chunk_shape_respects_budget():
    K, L, D, H = 36, 32, 1024, 8
    for device_type in ("cpu", "cuda"):
        n, m = ft._chunk_shape(5000, 25000, K, L, D, H, 4, device_type)
        assert n * m * ft._PAIR_TENSORS * H * K * L * 4 <= ft.CHUNK_BUDGET_BYTES
        assert n >= 1 and m >= 1
    assert ft._chunk_shape(5000, 25000, K, L, D, H, 4, "cuda")[0] > ft._chunk_shape(5000, 25000, K, L, D, H, 4, "cpu")[0]


def leaves_of(kw):
    out = {"V": kw["V"], "W": kw["W"]}
    if "G" in kw:
        out["G"] = kw["G"]
    if "global_emb" in kw:
        out["Gi"], out["Gt"] = kw["global_emb"]
    for k, v in kw.get("weights", {}).items():
        out[k] = v
    return out


def grads(kw, heads, backend, cotangent):
    for t in leaves_of(kw).values():
        t.requires_grad_(True)
        t.grad = None
    (run(kw, heads, backend) * cotangent.to(kw["V"].dtype)).sum().backward()
    return {k: t.grad.detach().clone() for k, t in leaves_of(kw).items()}


def cast_case(kw, dtype):
    out = dict(kw)
    for k in ("V", "W", "G"):
        if k in out:
            out[k] = out[k].detach().to(dtype)
    if "weights" in out:
        out["weights"] = {k: v.detach().to(dtype) for k, v in out["weights"].items()}
    if "global_emb" in out:
        out["global_emb"] = tuple(g.detach().to(dtype) for g in out["global_emb"])
    return out


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
@pytest.mark.parametrize("chunked", [False, True])
def test_torch_gradients_match_float64_eager(variant, chunked, monkeypatch):
    """Relative error of each gradient = max|g32 − g64| / max|g64| over that tensor, ≤ 1e-3 (spec §9)."""
    kw64 = make_case(3, 5, 5, 4, 32, variant, seed=41, dtype=torch.float64)
    cot = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g64 = grads(cast_case(kw64, torch.float64), 4, "eager", cot)
    if chunked:
        tiny_budget(monkeypatch)
    g32 = grads(cast_case(kw64, torch.float32), 4, "torch", cot)
    assert set(g32) == set(g64)
    if variant == "paper":
        assert set(g32) >= {"V", "W", "G", *MATS, "gate"}
    else:
        assert set(g32) >= {"V", "W", "Gi", "Gt"}
    for name, ref in g64.items():
        scale = ref.abs().max().item()
        assert scale > 0, name
        err = (g32[name].double() - ref).abs().max().item() / scale
        assert err <= 1e-3, f"gradient of {name}: relative error {err:.2e}"


def test_checkpointed_chunks_give_the_same_gradients(monkeypatch):
    kw = make_case(4, 3, 5, 4, 32, "paper", seed=43, dtype=torch.float64)
    cot = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = grads(cast_case(kw, torch.float64), 4, "torch", cot)
    tiny_budget(monkeypatch)
    chunked = grads(cast_case(kw, torch.float64), 4, "torch", cot)
    for name in whole:
        assert torch.allclose(chunked[name], whole[name], atol=1e-12, rtol=0), name


# ---- per-item precompute (spec §8), field by field against direct float64 formulas ----

def _weights(D, seed):
    g = torch.Generator().manual_seed(seed)
    w = {k: torch.randn(D, D, generator=g, dtype=torch.float64) for k in MATS}
    w["gate"] = torch.randn(D, generator=g, dtype=torch.float64)
    return w


@pytest.mark.parametrize("role", ["image", "text"])
def test_precompute_fields_full(role):
    n, T, D, H = 3, 5, 32, 4
    d = D // H
    X = torch.randn(n, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w = _weights(D, 6)
    G = torch.randn(n, D, dtype=torch.float64) if role == "image" else None
    side = precompute_items(X, None, w, H, role=role, G=G, pairwise_global=True)
    assert side.mask.dtype == torch.bool and side.mask.all() and side.mask.shape == (n, T)
    assert not side.block_diagonal and not side.identity_proj
    sig = torch.sigmoid(w["gate"])
    Pblk = torch.zeros(n, H * T, D, dtype=torch.float64)
    for h in range(H):
        cols = slice(h * d, (h + 1) * d)
        torch.testing.assert_close(side.Q[:, h], X @ w["z_x"][:, cols])
        torch.testing.assert_close(side.Kk[:, h], X @ w["z_y"][:, cols])
        torch.testing.assert_close(side.O[:, h], X @ w["z_o"][cols, :].T)
        Pblk[:, h * T:(h + 1) * T] = (X @ w["z_y"][:, cols]) @ w["z_o"][cols, :]
    torch.testing.assert_close(side.norm, X.norm(dim=-1))
    torch.testing.assert_close(side.gram, Pblk @ Pblk.transpose(1, 2))
    if role == "text":
        torch.testing.assert_close(side.Pglob, Pblk @ w["x_w"])
        assert side.gx is None
    else:
        torch.testing.assert_close(side.Pglob, sig * (Pblk @ w["x_v"]))
        torch.testing.assert_close(side.gx, (1 - sig) * (G @ w["x_g"]))


def test_precompute_identity_path_shares_and_is_block_diagonal():
    n, T, D, H = 2, 4, 16, 4
    d = D // H
    X = torch.randn(n, T, D, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True], [False, False, True, False]])
    side = precompute_items(X, mask, None, H, role="text", pairwise_global=True)
    assert side.identity_proj and side.block_diagonal and side.shared_qk and side.o_is_q
    assert side.Kk is side.Q and side.O is side.Q
    assert torch.equal(side.mask, mask)
    assert side.gram.shape == (n, H, T, T)
    # block-diagonal Γ = the diagonal blocks of the full P_blk P_blkᵀ with z_o = identity
    full = precompute_items(X, mask, {"z_o": torch.eye(D, dtype=torch.float64)}, H, role="text", pairwise_global=True)
    assert torch.equal(side.norm, X.norm(dim=-1) * mask)  # padding is zeroed first
    for h in range(H):
        blk = slice(h * T, (h + 1) * T)
        torch.testing.assert_close(side.gram[:, h], full.gram[:, blk, blk])
    torch.testing.assert_close(side.Pglob, full.Pglob)
    sub = side.select(slice(1, 2))
    assert sub.Q is sub.Kk and sub.n == 1 and sub.T == T


def test_precompute_storage_dtype_and_errors():
    X = torch.randn(2, 3, 16)
    side = precompute_items(X, None, _weights(16, 1), 4, role="image", G=torch.randn(2, 16), dtype=torch.bfloat16)
    assert side.Q.dtype == side.gram.dtype == side.Pglob.dtype == side.gx.dtype == torch.bfloat16
    assert side.norm.dtype == torch.float32
    with pytest.raises(ValueError, match="role"):
        precompute_items(X, None, None, 4, role="video")
    with pytest.raises(ValueError, match="G"):
        precompute_items(X, None, None, 4, role="text", G=torch.randn(2, 16))
    with pytest.raises(ValueError, match="G is required"):
        precompute_items(X, None, None, 4, role="image", pairwise_global=True)


def test_huge_padding_does_not_leak():
    """Masked-out rows may hold any finite value: S and its gradients stay finite and unchanged."""
    kw = make_case(3, 4, 5, 6, 64, "paper", seed=51)
    base = run(kw, 4, "torch")
    pad = dict(kw)
    pad["V"] = torch.where(kw["v_mask"][:, :, None], kw["V"], torch.full_like(kw["V"], 1e30))
    pad["W"] = torch.where(kw["w_mask"][:, :, None], kw["W"], torch.full_like(kw["W"], -1e30))
    assert torch.allclose(run(pad, 4, "torch"), base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_worker_threads_give_identical_scores(variant):
    """Blocks spread over Python threads (torch threads > 1, no grad) = the sequential loop, to float32 rounding
    (the blocks differ, so BLAS may sum in another order)."""
    kw = make_case(5, 19, 6, 5, 64, variant, seed=61)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(kw, 4, "torch")
        torch.set_num_threads(3)
        three = run(kw, 4, "torch")
        assert torch.get_num_threads() == 3  # restored after the call
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(one, three, atol=1e-6, rtol=0)
    assert (three.double() - reference(kw, 4)).abs().max().item() <= 1e-4


def test_worker_threads_build_no_graph_for_parameters(monkeypatch):
    """Scoring a model (weights that require grad) under no_grad must not build autograd
    graphs in the pool threads: grad mode is thread-local, and a graph per pair chunk
    kept every chunk's tensors alive (an evaluation of 1000 x 5000 ran out of memory)."""
    kw = make_case(5, 19, 6, 5, 64, "paper", seed=62)
    kw["weights"] = {k: v.clone().requires_grad_(True) for k, v in kw["weights"].items()}
    seen = []
    real = ft._pair_chunk

    def spy(*args):
        out = real(*args)
        seen.append(out.requires_grad)
        return out

    monkeypatch.setattr(ft, "_pair_chunk", spy)
    monkeypatch.setattr(ft, "_TEXT_BLOCK", 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            run(kw, 4, "torch")
    finally:
        torch.set_num_threads(before)
    assert seen and not any(seen)
