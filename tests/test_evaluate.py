"""Recall metrics and protocols (spec §4) against the per-query reference loops
(acf_fast.reference_ranking: argsort of each list, the re-ranked list built literally)."""
import numpy as np
import pytest
import torch

from acf_fast import evaluate as ev
from acf_fast import ranking
from acf_fast import rerank as rr
from acf_fast.evaluate import evaluate_protocol, kfold_metrics, recall_metrics
from acf_fast.reference_ranking import recall_loop
from acf_fast.rerank import rerank_i2t, rerank_t2i, text_neighbors


def assert_metrics_equal(got, want):
    for d in ("i2t", "t2i"):
        for key in ev.METRIC_KEYS:
            assert got[d][key] == pytest.approx(want[d][key], abs=1e-9), (d, key)
    assert got["rsum"] == pytest.approx(want["rsum"], abs=1e-9)


def planted_S(N, M, txt2img, seed, ties):
    """Random S with the true pairs lifted, so ranks spread over 0..a few."""
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(N, M, generator=g, dtype=torch.float64)
    S[txt2img, torch.arange(M)] += 1.5
    if ties:
        S = torch.round(S * 2) / 2
    return S.float()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("ragged", [False, True])
def test_metrics_match_loop(ties, ragged):
    N = 23
    if ragged:
        g = torch.Generator().manual_seed(1)
        txt2img = torch.cat([torch.arange(N), torch.randint(0, N, (40,), generator=g)])  # 1 to many captions each
        txt2img = txt2img[torch.randperm(txt2img.numel(), generator=g)]
    else:
        txt2img = torch.arange(5 * N) // 5
    M = txt2img.numel()
    S = planted_S(N, M, txt2img, seed=M, ties=ties)
    t2i_arg = None if not ragged else txt2img
    assert_metrics_equal(recall_metrics(S, t2i_arg), recall_loop(S, txt2img.tolist()))


@pytest.mark.parametrize("tied_max", [1.0, -1.0])  # sums of signs and a recount of tied lines / thresholds
def test_metrics_in_many_blocks_match_loop(tied_max, monkeypatch):
    """Either counting method; block edges (rows and columns, the last block short)
    must not change a rank."""
    monkeypatch.setattr(ranking, "DEFAULT_BUDGET_BYTES", 600)
    monkeypatch.setattr(ranking, "TIED_LINES_MAX_FRACTION", tied_max)
    N, M = 17, 85
    txt2img = torch.arange(M) // 5
    S = planted_S(N, M, txt2img, seed=12, ties=True)
    assert_metrics_equal(recall_metrics(S, txt2img, backend="torch"), recall_loop(S, txt2img))
    assert_metrics_equal(recall_metrics(S.double(), txt2img), recall_loop(S, txt2img))


@pytest.mark.parametrize("ties", [False, True])
def test_metrics_with_reranked_heads_match_loop(ties):
    N, M = 19, 95
    txt2img = torch.arange(M) // 5
    S = planted_S(N, M, txt2img, seed=4, ties=ties)
    hi = rerank_i2t(S, k=7)
    ht = rerank_t2i(S, text_neighbors("profile", 3, S=S), k=6)
    assert_metrics_equal(recall_metrics(S, None, hi, ht), recall_loop(S, txt2img.tolist(), hi, ht))


def test_arbitrary_heads_follow_the_documented_rule():
    """Heads that are NOT a reordering of the original top k (targets pushed out)."""
    N, M = 9, 45
    txt2img = torch.arange(M) // 5
    S = planted_S(N, M, txt2img, seed=8, ties=True)
    g = torch.Generator().manual_seed(2)
    hi = torch.stack([torch.randperm(M, generator=g)[:6] for _ in range(N)])
    ht = torch.stack([torch.randperm(N, generator=g)[:4] for _ in range(M)])
    assert_metrics_equal(recall_metrics(S, None, hi, ht), recall_loop(S, txt2img.tolist(), hi, ht))


def test_rsum_and_median_even_count():
    S = torch.tensor([[1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.9, 0.3]])
    m = recall_metrics(S, torch.tensor([0, 1, 1, 1]))
    # every caption's image is first in its column, every image's best caption first in its row
    assert m["t2i"] == {"r1": 100.0, "r5": 100.0, "r10": 100.0, "medr": 1.0, "meanr": 1.0}
    assert m["rsum"] == 600.0
    S2 = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 2)
    m2 = recall_metrics(S2, torch.tensor([0, 1, 0, 1]))
    # constant columns: image 0 wins every tie (smaller index) -> t2i ranks [0, 1, 0, 1], median 0.5 -> medr 1
    assert m2["t2i"]["medr"] == 1.0 and m2["t2i"]["meanr"] == 1.5 and m2["t2i"]["r1"] == 50.0


def fold_S(seed=0):
    """50 images x 250 captions; fold f's true pairs are lifted by a fold-specific amount."""
    N, M = 50, 250
    txt2img = torch.arange(M) // 5
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(N, M, generator=g, dtype=torch.float64)
    lift = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0]).repeat_interleave(10)
    S[txt2img, torch.arange(M)] += lift[txt2img]
    return S.float(), txt2img


def test_kfold_averages_folds_computed_alone():
    S, txt2img = fold_S()
    folds = kfold_metrics(S, 5, txt2img)
    singles = []
    for f in range(5):
        Sf = S[10 * f : 10 * f + 10, 50 * f : 50 * f + 50]
        singles.append(recall_loop(Sf, (torch.arange(50) // 5).tolist()))
        assert_metrics_equal(folds[f]["plain"], singles[-1])
    assert len({f["plain"]["rsum"] for f in folds}) > 1, "folds should differ"


def test_coco1k_protocol_averages_and_labels_rsum(monkeypatch):
    S, txt2img = fold_S(3)
    monkeypatch.setitem(ev.PROTOCOLS, "coco1k", {"shape": (50, 250), "folds": 5})
    res = evaluate_protocol(S, "coco1k")
    singles = [recall_loop(S[10 * f : 10 * f + 10, 50 * f : 50 * f + 50], (torch.arange(50) // 5).tolist())
               for f in range(5)]
    for d in ("i2t", "t2i"):
        for key in ev.METRIC_KEYS:
            assert res["plain"][d][key] == pytest.approx(np.mean([s[d][key] for s in singles]))
    want_rsum = sum(np.mean([s[d][f"r{K}"] for s in singles]) for d in ("i2t", "t2i") for K in (1, 5, 10))
    assert res["plain"]["rsum"] == pytest.approx(want_rsum)
    assert res["plain"]["rsum"] == pytest.approx(np.mean([s["rsum"] for s in singles]))
    assert res["folds"] == 5 and len(res["fold_results"]) == 5
    # the folds differ from the whole-matrix (5K-style) evaluation
    assert res["plain"]["rsum"] != pytest.approx(recall_metrics(S)["rsum"])


def test_coco1k_reranked_per_fold(monkeypatch):
    S, txt2img = fold_S(5)
    monkeypatch.setitem(ev.PROTOCOLS, "coco1k", {"shape": (50, 250), "folds": 5})
    res = evaluate_protocol(S, "coco1k", rerank=True, k_i2t=6, k_t2i=5, kprime=3, neighbors="siblings")
    f2 = S[20:30, 100:150]
    t = torch.arange(50) // 5
    want = recall_metrics(f2, t, rerank_i2t(f2, 6), rerank_t2i(f2, text_neighbors("siblings", 3, txt2img=t), 5))
    assert_metrics_equal(res["fold_results"][2]["reranked"], want)
    assert res["rerank"]["oracle"] is True and "oracle" in res["rerank"]["label"]


def test_protocol_any_with_embedding_neighbors_and_shapes():
    N, M = 12, 60
    txt2img = torch.arange(M) // 5
    S = planted_S(N, M, txt2img, seed=6, ties=False)
    vecs = torch.randn(M, 4, generator=torch.Generator().manual_seed(1))
    res = evaluate_protocol(S, "any", rerank=True, k_i2t=5, k_t2i=4, kprime=2, text_vectors=vecs)
    assert res["rerank"]["neighbors"] == "embedding" and res["rerank"]["oracle"] is False
    nb = text_neighbors("embedding", 2, text_vectors=vecs)
    assert_metrics_equal(res["reranked"], recall_metrics(S, None, rerank_i2t(S, 5), rerank_t2i(S, nb, 4)))
    assert evaluate_protocol(S, rerank=True, k_i2t=5, k_t2i=4)["rerank"]["neighbors"] == "profile"
    with pytest.raises(ValueError, match="expects S of shape"):
        evaluate_protocol(S, "f30k")
    with pytest.raises(ValueError, match="protocol must be"):
        evaluate_protocol(S, "coco")


@pytest.mark.parametrize(
    "S,txt2img,match",
    [
        (torch.zeros(3, 15, 1), None, "2-D"),
        (torch.tensor([[0.0, float("nan")] * 5, [0.0] * 10]), None, "NaN"),
        (torch.tensor([[0.0, float("inf")] * 5, [0.0] * 10]), None, "NaN or Inf"),
        (torch.zeros(2, 9), None, "txt2img not given"),
        (torch.zeros(2, 10), torch.zeros(9, dtype=torch.long), r"shape \(10,\)"),
        (torch.zeros(2, 10), torch.tensor([0, 1] * 4 + [0, 2]), "image ids in"),
        (torch.zeros(2, 10), torch.tensor([0, 1] * 4 + [0, -1]), "image ids in"),
        (torch.zeros(3, 10), torch.tensor([0, 1] * 5), "image 2 has no caption"),
        (torch.zeros(2, 10), torch.linspace(0, 1, 10), "integer"),
    ],
)
def test_bad_inputs(S, txt2img, match):
    with pytest.raises(ValueError, match=match):
        recall_metrics(S, txt2img)


def test_bad_heads():
    S = torch.randn(3, 15)
    with pytest.raises(ValueError, match="larger than"):
        recall_metrics(S, None, i2t_heads=torch.zeros(3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="repeats"):
        recall_metrics(S, None, i2t_heads=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="t2i_heads must be"):
        recall_metrics(S, None, t2i_heads=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        recall_metrics(S, None, t2i_heads=torch.full((15, 1), 3))


# ------------------------------------------------------------------ the triton path (interpreter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [False, True])
def test_triton_metrics_equal_torch_and_loop(dtype, heads, monkeypatch):
    """Counting kernels (small tiles, so every line spans several blocks and splits)
    vs the torch path vs the loop: ragged captions, planted ties, -0.0, subnormals."""
    from acf_fast.kernels import ranking as kernels

    monkeypatch.setattr(kernels, "TARGETS_ROWS", (2, 8, 16))
    monkeypatch.setattr(kernels, "TARGETS_COLUMNS", (4, 4, 8))
    g = torch.Generator().manual_seed(11)
    N = 13
    txt2img = torch.cat([torch.arange(N), torch.randint(0, N, (24,), generator=g)])
    txt2img = txt2img[torch.randperm(txt2img.numel(), generator=g)]
    M = txt2img.numel()  # 37: no block size divides either side
    S = planted_S(N, M, txt2img, seed=5, ties=True)
    S[0, :6] = -0.0
    S[1, :4] = torch.tensor([1e-40, 0.0, -1e-40, 0.0])  # subnormals are not zero
    S = S.to(dtype)
    hi = ht = None
    if heads:
        hi = torch.stack([torch.randperm(M, generator=g)[:6] for _ in range(N)])
        ht = torch.stack([torch.randperm(N, generator=g)[:4] for _ in range(M)])
    got = recall_metrics(S, txt2img, hi, ht, backend="triton")
    assert got == recall_metrics(S, txt2img, hi, ht, backend="torch")
    assert_metrics_equal(got, recall_loop(S.float(), txt2img, hi, ht))
    ri = ev.ranks_i2t(S, txt2img, hi, backend="triton")
    assert torch.equal(ri, ev.ranks_i2t(S, txt2img, hi, backend="torch"))


def test_one_validation_of_S_per_public_call(monkeypatch):
    """A re-ranked evaluation reads S's values for validation once (it did ~10 times)."""
    seen = []

    def counting(check):
        def wrapped(X, name="S"):
            if name == "S":
                seen.append(X.shape)
            return check(X, name)
        return wrapped

    for mod in (ev, rr, ranking):
        monkeypatch.setattr(mod, "check_scores", counting(ranking.check_scores))
    S, txt2img = fold_S(2)
    evaluate_protocol(S, rerank=True, k_i2t=5, k_t2i=4, kprime=3)
    assert len(seen) == 1
    seen.clear()
    monkeypatch.setitem(ev.PROTOCOLS, "coco1k", {"shape": (50, 250), "folds": 5})
    evaluate_protocol(S, "coco1k", rerank=True, k_i2t=5, k_t2i=4, kprime=3, neighbors="siblings")
    assert len(seen) == 1
