"""Chance and the ridge linear probe: chance against an enumeration of every ranking, the
probe against an independent least-squares solve."""
import itertools

import numpy as np
import pytest
import torch

from acf_fast.evaluate import recall_metrics
from acf_fast.retrieval_baselines import RidgeProbe, chance_metrics, fit_probe, mean_regions, mean_words


@pytest.mark.parametrize("txt2img", [[0, 1, 1, 1, 2], [0, 0, 1, 1], [2, 0, 1]])
def test_chance_is_the_mean_over_every_ranking(txt2img):
    """Average recall_metrics over all score matrices whose rows and columns are every
    permutation: the exact expectation of a random ranking."""
    g = np.array(txt2img)
    N, M = g.max() + 1, len(g)
    sums = None
    count = 0
    # I2T depends only on each row's order and rows are independent, so the mean over random
    # rankings is the mean over every permutation given to all rows at once; T2I likewise by columns.
    for perm in itertools.permutations(range(M)):
        S = torch.tensor(np.tile(np.array(perm, dtype=np.float64), (N, 1)))
        m = recall_metrics(S, g)["i2t"]
        sums = {k: (sums or {}).get(k, 0.0) + m[k] for k in ("r1", "r5", "r10")}
        count += 1
    want_i2t = {k: v / count for k, v in sums.items()}
    t2i = {k: 0.0 for k in ("r1", "r5", "r10")}
    perms = list(itertools.permutations(range(N)))
    for perm in perms:
        S = torch.tensor(np.tile(np.array(perm, dtype=np.float64)[:, None], (1, M)))
        m = recall_metrics(S, g)["t2i"]
        for k in t2i:
            t2i[k] += m[k] / len(perms)
    got = chance_metrics(g, N)
    for k in ("r1", "r5", "r10"):
        assert got["i2t"][k] == pytest.approx(want_i2t[k], abs=1e-9)
        assert got["t2i"][k] == pytest.approx(t2i[k], abs=1e-9)
    assert got["rsum"] == pytest.approx(sum(got[d][k] for d in ("i2t", "t2i") for k in ("r1", "r5", "r10")))


def test_chance_one_caption_each():
    c = chance_metrics(np.arange(155), 155)
    assert c["i2t"]["r1"] == pytest.approx(100 / 155) and c["t2i"]["r10"] == pytest.approx(1000 / 155)
    assert c["t2i"]["meanr"] == 78.0 and c["i2t"]["meanr"] == pytest.approx(78.0)


@pytest.mark.parametrize("n,d", [(40, 7), (9, 30)])  # primal and dual branches
def test_ridge_matches_augmented_least_squares(n, d):
    rng = np.random.default_rng(n)
    X, Y, lam = rng.normal(size=(n, d)), rng.normal(size=(n, 5)), 0.7
    p = RidgeProbe.fit(X, Y, lam)
    A, B = X - X.mean(0), Y - Y.mean(0)
    W = np.linalg.lstsq(np.vstack([A, np.sqrt(lam) * np.eye(d)]), np.vstack([B, np.zeros((d, 5))]), rcond=None)[0]
    np.testing.assert_allclose(p.W, W, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(p.predict(X[:3]), A[:3] @ W + Y.mean(0), rtol=1e-8, atol=1e-10)
    S = p.scores(X[:4], Y[:6])
    P, Q = p.predict(X[:4]), Y[:6]
    cos = (P @ Q.T) / np.linalg.norm(P, axis=1)[:, None] / np.linalg.norm(Q, axis=1)[None]
    assert S.dtype == torch.float32 and S.shape == (4, 6)
    np.testing.assert_allclose(S.numpy(), cos, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lam"):
        RidgeProbe.fit(X, Y, 0.0)


def test_fit_probe_picks_the_best_dev_lambda_and_retrieves_a_linear_map():
    """Captions are a noisy linear image of the regions: the probe finds the pairs."""
    rng = np.random.default_rng(0)
    T = rng.normal(size=(12, 6))

    def make(n, caps_per):
        X = rng.normal(size=(n, 12))
        t2i = np.repeat(np.arange(n), caps_per)
        return X, X[t2i] @ T + 0.3 * rng.normal(size=(len(t2i), 6)), t2i

    train, dev, test = make(60, 2), make(20, 1), make(20, 3)
    probe, info = fit_probe(*train, *dev, lambdas=(0.01, 1.0, 1e6))
    assert info["lambda"] == probe.lam
    assert info["dev_rsum"][f"{probe.lam:g}"] == max(info["dev_rsum"].values())
    m = recall_metrics(probe.scores(test[0], test[1]), test[2])
    assert m["i2t"]["r1"] > 80 and m["t2i"]["r1"] > 80
    assert info["dev_rsum"]["1e+06"] < info["dev_rsum"]["1"]  # a huge penalty flattens the map


def test_means_use_valid_rows_only():
    R = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[True, False, True], [True, True, True]])
    np.testing.assert_allclose(mean_regions(R, mask), [[2.0, 3.0], [8.0, 9.0]])
    np.testing.assert_allclose(mean_regions(R), R.mean(1))
    w = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [99.0, 99.0]]])
    np.testing.assert_allclose(mean_words(w, torch.tensor([[True, True, False]])), [[2.0, 3.0]])


def test_paired_bootstrap_rsum():
    from acf_fast.retrieval_baselines import paired_bootstrap_rsum

    rng = np.random.default_rng(1)
    t2i = np.repeat(np.arange(30), 2)
    good = torch.from_numpy(rng.normal(size=(30, 60)))
    good[t2i, np.arange(60)] += 3.0
    noise = torch.from_numpy(rng.normal(size=(30, 60)))
    r = paired_bootstrap_rsum(good, noise, t2i, resamples=500)
    want = recall_metrics(good, t2i)["rsum"] - recall_metrics(noise, t2i)["rsum"]
    assert r["diff"] == pytest.approx(want)
    assert 0 < r["low"] < r["diff"] < r["high"] and r["p_a_ahead"] == 1.0
    same = paired_bootstrap_rsum(good, good, t2i, resamples=50)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_a_ahead": 0.0, "resamples": 50}
