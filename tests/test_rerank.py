"""ACF-R+ re-ranking (spec §5), torch path, against the per-query reference loops
(acf_fast.reference_ranking: numpy argsort of each list, positions counted per query;
nothing shared with the vectorised code). The triton path: test_rerank_triton.py."""
import numpy as np
import pytest
import torch

from acf_fast import ranking
from acf_fast.reference_ranking import cosine_neighbors_loop, rerank_i2t_loop, rerank_t2i_loop, siblings_loop
from acf_fast.rerank import rerank, rerank_i2t, rerank_t2i, text_neighbors


def loop_i2t(S, k, n):
    return torch.from_numpy(rerank_i2t_loop(S.double(), k, n))


def loop_t2i(S, nb, k, n):
    return torch.from_numpy(rerank_t2i_loop(S.double(), nb, k, n))


def random_S(N, M, seed, ties=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(N, M, generator=g, dtype=torch.float64)
    if ties:
        S = torch.round(S * 2) / 2  # few distinct values: ties everywhere, at boundaries too
    return S.to(dtype)


@pytest.fixture(params=["survivors", "buckets", "direct"])
def count_path(request, monkeypatch):
    """Run each test through every counting path of acf_fast.ranking."""
    if request.param != "survivors":
        monkeypatch.setattr(ranking, "SURVIVOR_MAX_FRACTION", -1.0)  # always fall back
        monkeypatch.setattr(ranking, "DIRECT_MAX_QUERIES_PER_LINE", 0 if request.param == "buckets" else 10**9)
    return request.param


CASES = [  # N, M, k, n, ties, dtype
    (13, 37, 5, None, False, torch.float32),
    (13, 37, 5, 3, False, torch.float32),
    (11, 29, 7, None, True, torch.float32),
    (11, 29, 7, 2, True, torch.float32),
    (9, 23, 4, None, True, torch.float64),
    (10, 31, 6, 4, True, torch.float16),
]


@pytest.mark.parametrize("N,M,k,n,ties,dtype", CASES)
def test_i2t_matches_loop(N, M, k, n, ties, dtype, count_path):
    S = random_S(N, M, seed=N * M + k, ties=ties, dtype=dtype)
    assert torch.equal(rerank_i2t(S, k=k, n=n), loop_i2t(S.double(), k, n))


@pytest.mark.parametrize("N,M,k,n,ties,dtype", CASES)
@pytest.mark.parametrize("mode", ["embedding", "profile", "siblings"])
def test_t2i_matches_loop_every_mode(N, M, k, n, ties, dtype, mode, count_path):
    S = random_S(N, M, seed=7 * N + M, ties=ties, dtype=dtype)
    kp = 3
    txt2img = torch.arange(M) % N  # ragged: some images have 3 captions, some 2
    g = torch.Generator().manual_seed(3)
    vecs = torch.randn(M, 6, generator=g)
    nb = text_neighbors(mode, kp, S=S, text_vectors=vecs, txt2img=txt2img)
    if mode == "embedding":
        want_nb = torch.from_numpy(cosine_neighbors_loop(vecs, kp))
    elif mode == "profile":
        want_nb = torch.from_numpy(cosine_neighbors_loop(S.T, kp))
    else:
        want_nb = torch.from_numpy(siblings_loop(txt2img, kp))
    assert torch.equal(nb, want_nb)
    assert torch.equal(rerank_t2i(S, nb, k=k, n=n), loop_t2i(S.double(), nb, k, n))


def test_neighbors_with_duplicate_vectors_break_ties_by_index():
    g = torch.Generator().manual_seed(5)
    protos = torch.randn(4, 8, generator=g)
    vecs = protos[torch.tensor([0, 1, 0, 2, 1, 0, 3, 0, 1])]  # exact duplicates: cosine ties
    assert torch.equal(text_neighbors("embedding", 4, text_vectors=vecs), torch.from_numpy(cosine_neighbors_loop(vecs, 4)))


def test_siblings_more_captions_than_k_and_unsorted_ids():
    txt2img = torch.tensor([2, 0, 2, 1, 2, 2, 0, 1, 2, 2])
    assert torch.equal(text_neighbors("siblings", 3, txt2img=txt2img), torch.from_numpy(siblings_loop(txt2img, 3)))


def test_k_equal_to_list_length_and_k_one():
    S = random_S(6, 8, seed=1, ties=True)
    assert torch.equal(rerank_i2t(S, k=8), loop_i2t(S.double(), 8, None))
    nb = text_neighbors("profile", 2, S=S)
    assert torch.equal(rerank_t2i(S, nb, k=6), loop_t2i(S.double(), nb, 6, None))
    assert torch.equal(rerank_i2t(S, k=1), loop_i2t(S.double(), 1, None))


def test_negative_zero_ties_with_positive_zero():
    S = torch.tensor([[0.0, -0.0, 1.0, -0.0], [-0.0, 0.0, 0.0, 2.0], [0.0, 0.0, -1.0, -0.0]])
    assert torch.equal(rerank_i2t(S, k=4), loop_i2t(S.double(), 4, None))
    nb = torch.tensor([[0, 1], [1, 3], [2, 0], [3, 2]])
    for frac, direct in ((0.25, 0), (-1.0, 0), (-1.0, 10**9)):
        old = ranking.SURVIVOR_MAX_FRACTION, ranking.DIRECT_MAX_QUERIES_PER_LINE
        ranking.SURVIVOR_MAX_FRACTION, ranking.DIRECT_MAX_QUERIES_PER_LINE = frac, direct
        try:
            assert torch.equal(rerank_t2i(S, nb, k=3), loop_t2i(S.double(), nb, 3, None))
        finally:
            ranking.SURVIVOR_MAX_FRACTION, ranking.DIRECT_MAX_QUERIES_PER_LINE = old


def test_small_budget_uses_many_blocks(monkeypatch):
    """Block boundaries must not change the answer."""
    monkeypatch.setattr(ranking, "DEFAULT_BUDGET_BYTES", 512)
    monkeypatch.setattr(ranking, "CPU_PASS_BYTES", 512)
    S = random_S(17, 41, seed=11, ties=True)
    assert torch.equal(rerank_i2t(S, k=6, n=None), loop_i2t(S.double(), 6, None))
    nb = text_neighbors("siblings", 3, txt2img=torch.arange(41) % 17)
    assert torch.equal(rerank_t2i(S, nb, k=5), loop_t2i(S.double(), nb, 5, None))


@pytest.mark.parametrize("frac", [1.0, 0.25, -1.0])
def test_positions_match_count_definition(frac, monkeypatch):
    monkeypatch.setattr(ranking, "SURVIVOR_MAX_FRACTION", frac)
    S = random_S(7, 19, seed=2, ties=True)
    g = torch.Generator().manual_seed(9)
    rows = torch.randint(0, 7, (60,), generator=g)
    cols = torch.randint(0, 19, (60,), generator=g)
    for axis, lines, items in ((1, rows, cols), (0, cols, rows)):
        got = ranking.positions(S, lines, items, axis=axis)
        for q in range(60):
            line = S[lines[q]] if axis == 1 else S[:, lines[q]]
            v, j = line[items[q]], int(items[q])
            want = int((line > v).sum()) + int((line[:j] == v).sum()) + 1
            assert int(got[q]) == want


def test_rerank_both_equals_each_direction():
    S = random_S(12, 31, seed=6, ties=True)
    nb = text_neighbors("profile", 3, S=S)
    hi, ht = rerank(S, nb, 7, 5, n=3)
    assert torch.equal(hi, rerank_i2t(S, 7, 3)) and torch.equal(ht, rerank_t2i(S, nb, 5, 3))
    assert torch.equal(hi, loop_i2t(S, 7, 3)) and torch.equal(ht, loop_t2i(S, nb, 5, 3))


def test_numpy_input_and_determinism():
    S = random_S(8, 40, seed=4).numpy()
    a = rerank_i2t(S, k=5)
    assert torch.equal(a, rerank_i2t(torch.from_numpy(S), k=5))
    nb = text_neighbors("profile", 3, S=S)
    assert torch.equal(rerank_t2i(S, nb, k=5), rerank_t2i(S, nb, k=5))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda S: rerank_i2t(S[0], k=2), "2-D"),
        (lambda S: rerank_i2t(S.to(torch.int64), k=2), "floating"),
        (lambda S: rerank_i2t(S.index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("nan"))), k=2), "NaN"),
        (lambda S: rerank_i2t(S, k=11), "k = 11 is larger"),
        (lambda S: rerank_i2t(S, k=0), "positive"),
        (lambda S: rerank_i2t(S, k=2, n=0), "n must be"),
        (lambda S: rerank_t2i(S, torch.zeros(10, 2, dtype=torch.long), k=5), "k = 5 is larger"),
        (lambda S: rerank_t2i(S, torch.zeros(9, 2, dtype=torch.long), k=2), "neighbors must be"),
        (lambda S: rerank_t2i(S, torch.full((10, 2), 10), k=2), "outside"),
        (lambda S: text_neighbors("nearest", 2, S=S), "mode must be"),
        (lambda S: text_neighbors("embedding", 2), "text_vectors"),
        (lambda S: text_neighbors("profile", 11, S=S), "k = 11"),
        (lambda S: text_neighbors("siblings", 2, S=S, txt2img=torch.arange(9)), "9 entries"),
    ],
)
def test_bad_inputs(call, match):
    S = random_S(4, 10, seed=0)
    with pytest.raises(ValueError, match=match):
        call(S)


def test_column_blocks_are_copied_in_tiles():
    """line_block copies columns transposed in tiles of rows; every tile edge must hold."""
    S = random_S(ranking.TRANSPOSE_TILE_ROWS * 2 + 37, 9, seed=13)
    for a, b in ((0, 9), (2, 5), (8, 9)):
        X = ranking.line_block(S, 0, a, b)
        assert X.is_contiguous() and torch.equal(X, S[:, a:b].T)
