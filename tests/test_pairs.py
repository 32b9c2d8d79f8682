"""``acf_similarity_pairs``: the grid's entries for any (image, text) pair list, every backend.

References: the float64 per-pair loop (``acf_fast.reference``, through tests/inputs.py)
for values, the same backend's grid (``acf_similarity``) for agreement, and float64
autograd of the eager grid for gradients. Tolerances: tests/tolerances.py (spec §9).
The Triton backend runs in the interpreter here (TRITON_INTERPRET=1, tests/conftest.py)
and on a GPU with ``--device cuda``; its cases are tiny (~0.5 s per pair interpreted).
"""
import pytest
import torch

import acf_fast.fused_torch as ft
from acf_fast import acf_similarity_pairs
from acf_fast.kernels import pair_v1
from acf_fast.validate import check_similarity_inputs
from inputs import make_case, reference, score
from tolerances import assert_grad_close, assert_scores_close

ARGS = ("V", "v_mask", "W", "w_mask")


def score_pairs(case: dict, pairs, backend: str, **extra):
    c = dict(case)
    return acf_similarity_pairs(*(c.pop(k) for k in ARGS), pairs, backend=backend, **c, **extra)


def random_pairs(N: int, M: int, P: int, seed: int, device="cpu") -> torch.Tensor:
    """P random (image, text) rows, with the corners (0, 0), (N-1, M-1) and a duplicate."""
    g = torch.Generator().manual_seed(seed)
    p = torch.stack([torch.randint(0, N, (P,), generator=g), torch.randint(0, M, (P,), generator=g)], 1)
    p = torch.cat([p, torch.tensor([[0, 0], [N - 1, M - 1], [N - 1, M - 1]]), p[:1]])
    return p.to(device)


def check_against_grid(case, pairs, backend, dtype=torch.float32, grid_backend=None):
    """Entries within the contract of the float64 reference, and of the backend's own grid."""
    with torch.no_grad():
        s = score_pairs(case, pairs, backend)
        ref = reference(case)[pairs[:, 0].cpu(), pairs[:, 1].cpu()]
        grid = score(case, grid_backend or backend)[pairs[:, 0], pairs[:, 1]]
    assert s.shape == (pairs.shape[0],)
    assert s.dtype == (torch.float64 if dtype == torch.float64 and backend != "triton" else torch.float32)
    assert s.device == pairs.device
    assert_scores_close(s, ref, dtype, f"{backend} pairs vs float64 reference")
    assert_scores_close(s, grid.double(), dtype, f"{backend} pairs vs its grid")
    return s


# ------------------------------------------------------------------ eager and torch


@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("variant", ["paper", "acf-code", "local"])
@pytest.mark.parametrize("masks", [True, False], ids=["ragged", "full"])
def test_pairs_equal_the_grid_entries(backend, variant, masks):
    """Odd sizes (5 images × 7 texts, K = 6, L = 5), ragged masks with holes, every weight."""
    case = make_case(5, 7, 6, 5, D=32, H=2, variant=variant, masks=masks, seed=3)
    check_against_grid(case, random_pairs(5, 7, 19, seed=1), backend)


@pytest.mark.parametrize("backend", ["eager", "torch"])
def test_float64_inputs_give_float64_entries(backend):
    case = make_case(4, 6, 5, 7, D=32, H=4, variant="paper", seed=5, dtype=torch.float64)
    check_against_grid(case, random_pairs(4, 6, 11, seed=2), backend, dtype=torch.float64)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous_inputs(layout):
    case = make_case(4, 5, 6, 5, D=32, H=2, variant="paper", seed=6, layout=layout)
    check_against_grid(case, random_pairs(4, 5, 9, seed=3), "torch")


def test_every_pair_of_the_grid_in_shuffled_order_is_the_grid():
    """All N·M pairs, shuffled and each twice: the result, put back in grid order, is S."""
    case = make_case(6, 5, 4, 6, D=32, H=2, variant="acf-code", seed=7)
    N, M = 6, 5
    grid = torch.cartesian_prod(torch.arange(N), torch.arange(M))
    perm = torch.randperm(2 * N * M, generator=torch.Generator().manual_seed(0))
    pairs = torch.cat([grid, grid])[perm]
    with torch.no_grad():
        s = score_pairs(case, pairs, "torch")
        S = score(case, "torch")
    got = torch.full((N, M), float("nan"))
    got[pairs[:, 0], pairs[:, 1]] = s
    assert_scores_close(got, S.double(), torch.float32, "all pairs")
    first, second = s[perm.argsort()[: N * M]], s[perm.argsort()[N * M:]]
    torch.testing.assert_close(first, second, atol=1e-6, rtol=0)  # duplicates agree


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_torch_blocks_and_calls_do_not_change_the_result(variant, monkeypatch):
    """One image per block, one text per block and per call: many cells, same entries."""
    case = make_case(5, 7, 6, 5, D=32, H=4, variant=variant, seed=8, dtype=torch.float64)
    pairs = random_pairs(5, 7, 25, seed=4)
    whole = score_pairs(case, pairs, "torch")
    monkeypatch.setattr(ft, "CHUNK_BUDGET_BYTES", 1)
    monkeypatch.setattr(ft, "ITEM_BUDGET_BYTES", 1)
    monkeypatch.setattr(ft, "_PAIR_TEXTS", 1)
    monkeypatch.setattr(ft, "_CACHE_BYTES", 1)
    chunked = score_pairs(case, pairs, "torch")
    torch.testing.assert_close(chunked, whole, atol=1e-13, rtol=0)


def test_trailing_padding_is_ignored():
    """Rows no item has valid (padding to a longer batch) change nothing."""
    case = make_case(3, 4, 5, 4, D=32, H=2, variant="paper", seed=9)
    pairs = random_pairs(3, 4, 7, seed=5)
    padded = dict(case)
    padded["V"] = torch.cat([case["V"], torch.randn(3, 3, 32)], 1)
    padded["v_mask"] = torch.cat([case["v_mask"], torch.zeros(3, 3, dtype=torch.bool)], 1)
    padded["W"] = torch.cat([case["W"], torch.randn(4, 6, 32)], 1)
    padded["w_mask"] = torch.cat([case["w_mask"], torch.zeros(4, 6, dtype=torch.bool)], 1)
    torch.testing.assert_close(score_pairs(padded, pairs, "torch"), score_pairs(case, pairs, "torch"),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_torch_gradients_match_float64_eager_autograd(variant):
    """Spec §9: float32 gradients of Σ c_p s_p within 1e-3 of float64 autograd of the eager grid."""
    case = make_case(3, 4, 5, 4, D=32, H=2, variant=variant, seed=10)
    pairs = random_pairs(3, 4, 6, seed=6)
    c = torch.randn(pairs.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def leaves(cs):
        out = {"V": cs["V"], "W": cs["W"]}
        if cs.get("G") is not None:
            out["G"] = cs["G"]
        if cs.get("global_emb") is not None:
            out["Gi"], out["Gt"] = cs["global_emb"]
        out.update(cs.get("weights") or {})
        return out

    got_case = {k: v for k, v in case.items()}
    for t in leaves(got_case).values():
        t.requires_grad_(True)
    (score_pairs(got_case, pairs, "torch").double() * c).sum().backward()
    ref_case = make_case(3, 4, 5, 4, D=32, H=2, variant=variant, seed=10, dtype=torch.float64)
    for t in leaves(ref_case).values():
        t.requires_grad_(True)
    (score(ref_case, "eager")[pairs[:, 0], pairs[:, 1]] * c).sum().backward()
    ref_leaves = leaves(ref_case)
    for name, t in leaves(got_case).items():
        assert_grad_close(t.grad, ref_leaves[name].grad, torch.float32, f"d/d{name}")


def test_torch_is_right_for_huge_finite_features_and_eager_refuses():
    """The pair list rescales huge features as the grid does (same helper)."""
    case = make_case(3, 4, 5, 4, D=32, H=2, variant="acf-code", seed=11)
    pairs = random_pairs(3, 4, 5, seed=7)
    huge = dict(case, V=case["V"] * 1e20)
    want = reference(dict(huge, V=huge["V"].double(), W=huge["W"].double(),
                          global_emb=tuple(t.double() for t in huge["global_emb"])))
    got = score_pairs(huge, pairs, "torch")
    assert_scores_close(got, want[pairs[:, 0], pairs[:, 1]], torch.float32, "V x 1e20")
    with pytest.raises(ValueError, match=r"backend='torch'"):
        score_pairs(huge, pairs, "eager")


def test_auto_is_torch_on_cpu():
    case = make_case(3, 4, 5, 4, D=32, H=2, variant="paper", seed=12)
    pairs = random_pairs(3, 4, 5, seed=8)
    assert torch.equal(score_pairs(case, pairs, "auto"), score_pairs(case, pairs, "torch"))


# ------------------------------------------------------------------ every backend: edge cases and bad input


@pytest.mark.parametrize("backend", ["eager", "torch", "triton"])
def test_empty_pair_list(backend, device):
    case = make_case(3, 4, 5, 4, D=32, H=2, variant="paper", seed=13, device=device)
    s = score_pairs(case, torch.empty(0, 2, dtype=torch.int64, device=device), backend)
    assert s.shape == (0,) and s.dtype == torch.float32 and s.device == device


BAD_PAIRS = [
    ("a list", lambda N, M: [[0, 0]], r"pairs must be a \(P, 2\) int64 torch.Tensor"),
    ("1-D", lambda N, M: torch.tensor([0, 1]), r"pairs must have shape \(P, 2\)"),
    ("3 columns", lambda N, M: torch.zeros(2, 3, dtype=torch.int64), r"pairs must have shape \(P, 2\)"),
    ("float", lambda N, M: torch.zeros(2, 2), r"pairs must hold integer indices"),
    ("bool", lambda N, M: torch.zeros(2, 2, dtype=torch.bool), r"pairs must hold integer indices"),
    ("image = N", lambda N, M: torch.tensor([[0, 0], [N, 0]]), r"pairs\[1, 0\] = 3 is not a valid image index"),
    ("negative image", lambda N, M: torch.tensor([[-1, 0]]), r"pairs\[0, 0\] = -1 is not a valid image index"),
    ("text = M", lambda N, M: torch.tensor([[0, 1], [1, 2], [2, M]]), r"pairs\[2, 1\] = 4 is not a valid text index"),
    ("negative text", lambda N, M: torch.tensor([[0, -3]]), r"pairs\[0, 1\] = -3 is not a valid text index"),
]


@pytest.mark.parametrize("backend", ["eager", "torch", "triton"])
@pytest.mark.parametrize("what,make,match", BAD_PAIRS, ids=[b[0] for b in BAD_PAIRS])
def test_bad_pairs_are_refused_naming_pairs(what, make, match, backend):
    case = make_case(3, 4, 5, 4, D=32, H=2, variant="paper", seed=14)
    with pytest.raises(ValueError, match=match):
        score_pairs(case, make(3, 4), backend)


def test_the_grid_checks_apply_too():
    """Same validation as acf_similarity (one function): a few of its refusals."""
    case = make_case(3, 4, 5, 4, D=32, H=2, variant="paper", seed=15)
    pairs = torch.tensor([[0, 0]])
    with pytest.raises(ValueError, match="heads must be a positive int"):
        score_pairs(dict(case, heads=True), pairs, "torch")
    with pytest.raises(ValueError, match="V contains NaN"):
        score_pairs(dict(case, V=case["V"].clone().fill_(float("nan"))), pairs, "torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        score_pairs(case, pairs, "cuda")
    with pytest.raises(ValueError, match="u2 = 0.8 weights a global score"):
        score_pairs(dict(case, G=None), pairs, "torch")


# ------------------------------------------------------------------ triton (kernel v1's list launch)


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_triton_pairs_equal_the_grid_entries(variant, device):
    """Odd sizes, ragged masks, a duplicate; against the reference and the tile kernel's grid."""
    case = make_case(3, 4, 5, 4, D=32, H=2, variant=variant, seed=16, device=device)
    check_against_grid(case, random_pairs(3, 4, 4, seed=9, device=device), "triton")


def test_triton_list_kernel_writes_every_entry_and_nothing_else(device):
    """The launcher on a poisoned output with a guard element after it."""
    case = make_case(2, 3, 5, 4, D=32, H=2, variant="acf-code", seed=17, device=device)
    v_mask, w_mask, weights, scale = check_similarity_inputs(
        case["V"], case["v_mask"], case["W"], case["w_mask"], heads=2, scale=case["scale"], u1=case["u1"],
        u2=case["u2"], weights=None, G=None, global_emb=case["global_emb"])
    img, txt = pair_v1.prepare_sides(case["V"], v_mask, case["W"], w_mask, heads=2, weights=weights, G=None)
    pairs = torch.tensor([[1, 2], [0, 0], [1, 0]], device=device)
    buf = torch.full((4,), float("nan"), device=device)
    buf[3] = 123.0
    pair_v1.launch_pairs(img, txt, pairs, buf[:3], scale=scale, u1=case["u1"], u2=case["u2"],
                         global_emb=case["global_emb"])
    assert buf[3].item() == 123.0
    assert_scores_close(buf[:3], reference(case)[pairs[:, 0].cpu(), pairs[:, 1].cpu()], torch.float32, "list kernel")


def test_triton_refuses_what_kernel_v1_cannot_take_and_gradients(device):
    case = make_case(2, 2, 5, 4, D=24, H=2, variant="acf-code", seed=18, device=device)  # head width 12
    pairs = torch.tensor([[0, 1]], device=device)
    with pytest.raises(ValueError, match="head width"):
        score_pairs(case, pairs, "triton")
    case = make_case(2, 2, 5, 4, D=32, H=2, variant="acf-code", seed=18, device=device)
    case["V"].requires_grad_(True)
    with pytest.raises(ValueError, match="forward only"):
        score_pairs(case, pairs, "triton")
    with torch.no_grad():
        score_pairs(case, pairs, "triton")



def test_torch_threads_do_not_change_the_result():
    """On a CPU the pair calls are spread over Python threads (one per torch thread)."""
    case = make_case(6, 9, 5, 6, D=32, H=2, variant="paper", seed=19)
    pairs = random_pairs(6, 9, 30, seed=10)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = score_pairs(case, pairs, "torch")
        torch.set_num_threads(3)
        three = score_pairs(case, pairs, "torch")
        assert torch.get_num_threads() == 3  # restored after the call
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(three, one, atol=1e-6, rtol=0)
