"""The triton path of the re-ranker and the text neighbours (acf_fast.kernels.ranking)
gives the ids of the torch path and of the per-query reference loops, bit for bit.

On CPU the kernels run in the interpreter (tests/conftest.py), with tiles shrunk so
that k̂ and the queries of one line exceed a block, on sizes no block divides, with
planted ties: few distinct values, -0.0 beside +0.0, subnormals beside zero. With
``--device cuda`` the GPU results are compared with the CPU at a larger size, and the
CUDA graph with the eager call.
"""
import numpy as np
import pytest
import torch

from acf_fast import ranking
from acf_fast import rerank as rr
from acf_fast.evaluate import recall_metrics
from acf_fast.kernels import ranking as kernels
from acf_fast.reference_ranking import cosine_neighbors_loop, rerank_i2t_loop, rerank_t2i_loop


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(kernels, "POSITIONS_BLOCK", 8)  # line items per step
    monkeypatch.setattr(kernels, "POSITIONS_QB_MAX", 4)  # queries per chunk
    monkeypatch.setattr(kernels, "BOUNDARY_BLOCK", 4)


def tied_S(N, M, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    S = torch.round(torch.randn(N, M, generator=g) * 2) / 2  # few distinct values: ties at every boundary
    S[0, : M // 3] = -0.0
    S[1, ::3] = 1e-40  # a subnormal is above +0.0, not equal to it
    S[1, 1::3] = 0.0
    S[2] = 0.5  # a constant row: every boundary tied
    return S.to(dtype)


CASES = [  # N, M, k_i2t, k_t2i, n, dtype
    (9, 19, 7, 6, None, torch.float32),
    (9, 19, 7, 6, None, torch.float16),
    (9, 19, 7, 6, None, torch.bfloat16),
    (9, 19, 7, 6, 2, torch.float32),
    (6, 11, 11, 6, None, torch.float32),  # k = the whole line
    (6, 11, 1, 1, None, torch.float32),
]


@pytest.mark.parametrize("N,M,k_i2t,k_t2i,n,dtype", CASES)
def test_heads_equal_torch_path_and_loop(N, M, k_i2t, k_t2i, n, dtype, small_tiles):
    S = tied_S(N, M, seed=N * M + k_i2t, dtype=dtype)
    nb = rr.text_neighbors("siblings", 3, txt2img=torch.arange(M) % N)
    hi, ht = rr.rerank(S, nb, k_i2t, k_t2i, n, backend="triton")
    hi_t, ht_t = rr.rerank(S, nb, k_i2t, k_t2i, n, backend="torch")
    assert torch.equal(hi, hi_t) and torch.equal(ht, ht_t)
    assert np.array_equal(hi.numpy(), rerank_i2t_loop(S, k_i2t, n))
    assert np.array_equal(ht.numpy(), rerank_t2i_loop(S, nb, k_t2i, n))
    if dtype == torch.float32 and n is None:
        assert torch.equal(rr.rerank_i2t(S, k_i2t, n, backend="triton"), hi)
        assert torch.equal(rr.rerank_t2i(S, nb, k_t2i, n, backend="triton"), ht)


def test_topk_boundary_many_equal_values(small_tiles):
    """A boundary tied across several blocks, values above it in later blocks."""
    X = torch.zeros(3, 37)
    X[0, 30:] = 1.0  # 7 above, k = 12: 5 zeros from the front
    X[1, ::2] = -0.0
    X[2, 5] = 2.0
    for k in (1, 12, 36):
        want = ranking.topk_lines(X, k)[1]
        assert torch.equal(ranking.topk_exact(X, k), want)
    assert ranking.topk_exact(X, 12)[0].tolist() == [30, 31, 32, 33, 34, 35, 36, 0, 1, 2, 3, 4]


def test_positions_many_queries_per_line(small_tiles):
    """More queries per line than a chunk, repeats, every item of a line queried."""
    X = tied_S(5, 19, seed=3)
    g = torch.Generator().manual_seed(4)
    lines = torch.cat([torch.zeros(19, dtype=torch.long), torch.randint(0, 5, (40,), generator=g)])
    items = torch.cat([torch.arange(19), torch.randint(0, 19, (40,), generator=g)])
    got = ranking.positions_exact(X, lines, items)
    want = [sum(1 for j in range(19) if X[l, j] > X[l, i] or (X[l, j] == X[l, i] and j < i)) + 1
            for l, i in zip(lines.tolist(), items.tolist())]
    assert got.tolist() == want
    assert torch.equal(got, ranking.positions(X, lines, items, axis=1))


def test_fold_dots_match_fold_sum_bits():
    g = torch.Generator().manual_seed(8)
    X = torch.randn(9, 37, generator=g) * torch.logspace(-3, 3, 37)  # wide exponents: order matters
    rows = torch.tensor([0, 3, 8, 8])
    cand = torch.randint(0, 9, (4, 5), generator=g)
    want = ranking.fold_sum(X[rows, None, :].double() * X[cand].double())
    assert torch.equal(kernels.fold_dots(X, rows, cand, cb=2), want)


@pytest.mark.parametrize("margin", [8, 0])
def test_neighbors_equal_torch_path_and_loop(margin, monkeypatch):
    """fp16 candidates + float64 check vs float32 candidates + check vs the loop;
    margin 0 makes most texts retry with more candidates."""
    monkeypatch.setattr(rr, "NEIGHBOR_MARGIN", margin)
    g = torch.Generator().manual_seed(9)
    V = torch.randn(23, 11, generator=g)
    V[5] = V[7]  # duplicates: exact cosine ties
    V[9] = 3 * V[7]
    V[11] = 0.0  # a zero vector: cosine 0 with everything
    V[12] = 1e-6 * V[3]  # norm products under the 1e-8 clamp
    for k in (1, 4, 23):
        got = rr.text_neighbors("embedding", k, text_vectors=V, backend="triton")
        assert torch.equal(got, rr.text_neighbors("embedding", k, text_vectors=V, backend="torch"))
        assert np.array_equal(got.numpy(), cosine_neighbors_loop(V, k))
    S = tied_S(9, 17, seed=2)
    got = rr.text_neighbors("profile", 5, S=S, backend="triton")
    assert torch.equal(got, rr.text_neighbors("profile", 5, S=S, backend="torch"))
    assert np.array_equal(got.numpy(), cosine_neighbors_loop(S.T, 5))


def test_backend_errors():
    S = tied_S(4, 10, seed=0)
    with pytest.raises(ValueError, match="backend must be"):
        rr.rerank_i2t(S, 2, backend="cuda")
    with pytest.raises(ValueError, match="cannot take"):
        rr.rerank_i2t(S.double(), 2, backend="triton")
    assert torch.equal(rr.rerank_i2t(S.double(), 2), rr.rerank_i2t(S, 2))  # auto: float64 takes the torch path


# ------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_cuda_equals_cpu(device):
    """Both backends on the GPU give the CPU's ids, neighbours and metrics, ties included."""
    S = tied_S(300, 1501, seed=3)
    txt2img = torch.arange(1501) // 5 % 300
    vecs = torch.randn(1501, 1024, generator=torch.Generator().manual_seed(1))
    vecs[7] = vecs[9]
    nb = rr.text_neighbors("embedding", 5, text_vectors=vecs)
    for backend in ("triton", "torch"):
        nb_d = rr.text_neighbors("embedding", 5, text_vectors=vecs.to(device), backend=backend)
        assert torch.equal(nb_d.cpu(), nb)
        assert torch.equal(rr.text_neighbors("profile", 5, S=S.to(device), backend=backend).cpu(),
                           rr.text_neighbors("profile", 5, S=S))
    hi, ht = rr.rerank(S, nb, 15, 20, n=40)
    for dtype in (torch.float32, torch.bfloat16):
        Sd = S.to(device=device, dtype=dtype)  # S's values are exact in bf16
        for backend in ("triton", "torch"):
            hi_d, ht_d = rr.rerank(Sd, nb.to(device), 15, 20, n=40, backend=backend)
            assert torch.equal(hi_d.cpu(), hi) and torch.equal(ht_d.cpu(), ht)
            assert recall_metrics(Sd, txt2img, hi_d, ht_d, backend=backend) == recall_metrics(S, txt2img, hi, ht)


@pytest.mark.gpu
def test_cuda_graph_replays_the_eager_result(device):
    S = tied_S(200, 1003, seed=5).to(device)
    nb = rr.text_neighbors("siblings", 5, txt2img=(torch.arange(1003) // 5 % 200).to(device))
    graph = rr.CapturedRerank(S, nb, 15, 20)
    for seed in (5, 6):
        S.copy_(tied_S(200, 1003, seed=seed).to(device))  # refill the buffer the graph reads
        hi, ht = graph()
        want = rr.rerank(S, nb, 15, 20, backend="triton")
        assert torch.equal(hi, want[0]) and torch.equal(ht, want[1])
    S[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        graph()
