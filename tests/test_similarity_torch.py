"""backend="torch" (spec §8 algebra, chunked) and the per-item precompute, beyond the
shared contract of tests/test_backends.py.

References: the float64 per-pair loop (acf_fast.reference) for values, float64
autograd of the eager backend for gradients, and direct float64 formulas for every
precompute field.
"""
import pytest
import torch

import acf_fast.fused_torch as ft
from acf_fast.precompute import precompute_items
from inputs import MATRIX_WEIGHTS as MATS
from inputs import make_case, reference, score
from tolerances import assert_grad_close, assert_scores_close


@pytest.mark.parametrize("present", [("z_x",), ("z_o",), ("z_y", "x_v"), ("z_x", "z_o", "x_w")])
def test_torch_partial_weights(present):
    """Any subset of the weights may be absent (identity): exercises Q is Kk / O is Q / block-diagonal Γ."""
    case = make_case(4, 5, 6, 5, D=64, H=4, variant="paper", weights=present, seed=len(present) * 7)
    assert_scores_close(score(case, "torch"), reference(case), torch.float32, f"weights {present}")


def test_torch_pairwise_global_with_identity_weights():
    """z_o and x_w / x_v absent with a pairwise global: Pglob is the block-sparse P_blk itself."""
    case = make_case(3, 4, 5, 6, D=64, H=8, variant="paper", weights=("gate",), seed=9)
    assert_scores_close(score(case, "torch"), reference(case), torch.float32, "gate only")


def test_auto_is_torch_on_cpu():
    case = make_case(3, 4, 5, 6, D=64, H=4, variant="paper", seed=13)
    assert torch.equal(score(case, "auto"), score(case, "torch"))


def tiny_budget(monkeypatch):
    """One pair per chunk, one image per image block, one text per text chunk."""
    monkeypatch.setattr(ft, "CHUNK_BUDGET_BYTES", 1)
    monkeypatch.setattr(ft, "ITEM_BUDGET_BYTES", 1)
    monkeypatch.setattr(ft, "_TEXT_BLOCK", 1)


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_chunking_does_not_change_the_result(variant, monkeypatch):
    case = make_case(5, 7, 6, 5, D=64, H=4, variant=variant, seed=31, dtype=torch.float64)
    whole = score(case, "torch")
    n, m = ft._chunk_shape(5, 7, 6, 5, 64, 4, 8)
    assert (n, m) == (5, min(7, ft._PAIR_TEXTS))  # default: all 5 images in one chunk
    tiny_budget(monkeypatch)
    assert ft._chunk_shape(5, 7, 6, 5, 64, 4, 8) == (1, 1)
    assert ft._image_block(5, 6, 64, 4, 8, True) == 1
    assert ft._text_block(7, 5, 64, 4, 8, True) == 1
    chunked = score(case, "torch")
    assert torch.allclose(chunked, whole, atol=1e-13, rtol=0)


def test_chunk_shape_respects_budget():
    K, L, D, H = 36, 32, 1024, 8
    for device_type in ("cpu", "cuda"):
        n, m = ft._chunk_shape(5000, 25000, K, L, D, H, 4, device_type)
        assert n * m * ft._PAIR_TENSORS * H * K * L * 4 <= ft.CHUNK_BUDGET_BYTES
        assert n >= 1 and m >= 1
    assert ft._chunk_shape(5000, 25000, K, L, D, H, 4, "cuda")[0] > ft._chunk_shape(5000, 25000, K, L, D, H, 4, "cpu")[0]


def leaves_of(case):
    out = {"V": case["V"], "W": case["W"]}
    if case.get("G") is not None:
        out["G"] = case["G"]
    if case.get("global_emb") is not None:
        out["Gi"], out["Gt"] = case["global_emb"]
    for k, v in (case.get("weights") or {}).items():
        out[k] = v
    return out


def grads(case, backend, cotangent):
    for t in leaves_of(case).values():
        t.requires_grad_(True)
        t.grad = None
    (score(case, backend) * cotangent.to(case["V"].dtype)).sum().backward()
    return {k: t.grad.detach().clone() for k, t in leaves_of(case).items()}


def cast_case(case, dtype):
    out = dict(case)
    for k in ("V", "W", "G"):
        if out.get(k) is not None:
            out[k] = out[k].detach().to(dtype)
    if out.get("weights") is not None:
        out["weights"] = {k: v.detach().to(dtype) for k, v in out["weights"].items()}
    if out.get("global_emb") is not None:
        out["global_emb"] = tuple(g.detach().to(dtype) for g in out["global_emb"])
    return out


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
@pytest.mark.parametrize("chunked", [False, True])
def test_torch_gradients_match_float64_eager(variant, chunked, monkeypatch):
    """Relative error of each gradient = max|g32 − g64| / max|g64| over that tensor (spec §9)."""
    case64 = make_case(3, 5, 5, 4, D=32, H=4, variant=variant, seed=41, dtype=torch.float64, layout="strided")
    cot = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g64 = grads(cast_case(case64, torch.float64), "eager", cot)
    if chunked:
        tiny_budget(monkeypatch)
    g32 = grads(cast_case(case64, torch.float32), "torch", cot)
    assert set(g32) == set(g64)
    if variant == "paper":
        assert set(g32) >= {"V", "W", "G", *MATS, "gate"}
    else:
        assert set(g32) >= {"V", "W", "Gi", "Gt"}
    for name, ref in g64.items():
        assert_grad_close(g32[name], ref, torch.float32, f"gradient of {name}")


def test_checkpointed_chunks_give_the_same_gradients(monkeypatch):
    case = make_case(4, 3, 5, 4, D=32, H=4, variant="paper", seed=43, dtype=torch.float64)
    cot = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = grads(cast_case(case, torch.float64), "torch", cot)
    tiny_budget(monkeypatch)
    chunked = grads(cast_case(case, torch.float64), "torch", cot)
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


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_worker_threads_give_identical_scores(variant):
    """Blocks spread over Python threads (torch threads > 1, no grad) = the sequential loop, to float32 rounding
    (the blocks differ, so BLAS may sum in another order)."""
    case = make_case(5, 19, 6, 5, D=64, H=4, variant=variant, seed=61)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = score(case, "torch")
        torch.set_num_threads(3)
        three = score(case, "torch")
        assert torch.get_num_threads() == 3  # restored after the call
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(one, three, atol=1e-6, rtol=0)
    assert_scores_close(three, reference(case), torch.float32, "threads")


def test_worker_threads_build_no_graph_for_parameters(monkeypatch):
    """Scoring a model (weights that require grad) under no_grad must not build autograd
    graphs in the pool threads: grad mode is thread-local, and a graph per pair chunk
    kept every chunk's tensors alive (an evaluation of 1000 x 5000 ran out of memory)."""
    case = make_case(5, 19, 6, 5, D=64, H=4, variant="paper", seed=62)
    case["weights"] = {k: v.clone().requires_grad_(True) for k, v in case["weights"].items()}
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
            score(case, "torch")
    finally:
        torch.set_num_threads(before)
    assert seen and not any(seen)
