"""Two honest baselines to print beside any retrieval result on the same split.

- ``chance_metrics``: the expected spec §4 recalls of a random ranking, exact for any
  caption -> image map (an image with c of the M captions finds one in its top K
  with probability 1 - C(M - c, K) / C(M, K)).
- ``RidgeProbe``: a closed-form ridge regression from mean-pooled region features
  to mean-pooled caption features, scored by cosine; the ridge weight is chosen on
  the dev split (``fit_probe``). It has no attention and no negatives: what a
  linear map between the two frozen feature spaces already retrieves.

    probe, info = fit_probe(train_X, train_Y, train_t2i, dev_X, dev_Y, dev_t2i)
    S = probe.scores(test_X, test_Y)     # (N, M) float32, then evaluate_protocol(S, ...)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

DEFAULT_LAMBDAS = tuple(10.0 ** k for k in range(-2, 5))


def chance_metrics(txt2img, num_images: int, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Expected R@K (percent) and meanr of a uniformly random ranking: {"i2t", "t2i", "rsum"}."""
    g = np.asarray(txt2img, dtype=np.int64)
    M, N = len(g), int(num_images)
    c = np.bincount(g, minlength=N).astype(np.float64)

    def miss_all(K: int) -> np.ndarray:  # P(none of an image's c captions in the top K of M)
        p = np.ones(N)
        for j in range(min(K, M)):
            p *= np.clip((M - c - j) / (M - j), 0.0, None)
        return p

    i2t = {f"r{K}": float(100.0 * np.mean(1.0 - miss_all(K))) for K in ks}
    i2t["meanr"] = float(np.mean((M + 1) / (c + 1)))  # expected best position (1-based) of c among M
    t2i = {f"r{K}": 100.0 * min(K, N) / N for K in ks}
    t2i["meanr"] = (N + 1) / 2
    return {"i2t": i2t, "t2i": t2i, "rsum": sum(i2t[f"r{K}"] + t2i[f"r{K}"] for K in ks)}


def mean_regions(regions, region_mask=None) -> np.ndarray:
    """(N, Dv) float64 mean of each image's valid regions; regions (N, K, Dv), mask (N, K) bool|None."""
    R = np.asarray(regions, dtype=np.float64)
    if region_mask is None:
        return R.mean(axis=1)
    m = np.asarray(region_mask, dtype=np.float64)[..., None]
    return (R * m).sum(axis=1) / m.sum(axis=1)


def mean_words(words, mask) -> np.ndarray:
    """(M, Db) float64 mean of each caption's valid token features; words (M, L, Db), mask (M, L) bool."""
    w = torch.as_tensor(words).double()
    m = torch.as_tensor(mask).double()[..., None]
    return ((w * m).sum(1) / m.sum(1)).numpy()


@dataclass
class RidgeProbe:
    """x -> (x - x_mean) @ W + y_mean; W (Dv, Db) float64, ``lam`` its ridge weight."""

    x_mean: np.ndarray
    y_mean: np.ndarray
    W: np.ndarray
    lam: float

    @classmethod
    def fit(cls, X: np.ndarray, Y: np.ndarray, lam: float) -> "RidgeProbe":
        """Least squares with an L2 penalty lam·‖W‖², closed form, on centred X (n, Dv) and
        Y (n, Db) (one row per caption: its image's X). Solves the smaller of the primal
        (Dv × Dv) and dual (n × n) systems; both give the same W."""
        if not lam > 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
        xm, ym = X.mean(0), Y.mean(0)
        A, B = X - xm, Y - ym
        n, d = A.shape
        if d <= n:
            W = np.linalg.solve(A.T @ A + lam * np.eye(d), A.T @ B)
        else:
            W = A.T @ np.linalg.solve(A @ A.T + lam * np.eye(n), B)
        return cls(xm, ym, W, float(lam))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, np.float64) - self.x_mean) @ self.W + self.y_mean

    def scores(self, X: np.ndarray, Y: np.ndarray) -> torch.Tensor:
        """S (N, M) float32: cosine of each image's prediction with each caption's Y."""
        P = self.predict(X)
        P = P / np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-8)
        Yn = np.asarray(Y, np.float64)
        Yn = Yn / np.maximum(np.linalg.norm(Yn, axis=1, keepdims=True), 1e-8)
        return torch.from_numpy((P @ Yn.T).astype(np.float32))


def fit_probe(train_X, train_Y, train_t2i, dev_X, dev_Y, dev_t2i,
              lambdas: Optional[Sequence[float]] = None) -> tuple:
    """Fit on train for each ridge weight, keep the best dev rsum. Returns (probe,
    {"lambda": chosen, "dev_rsum": {lam: rsum}})."""
    from .evaluate import recall_metrics

    lambdas = DEFAULT_LAMBDAS if lambdas is None else tuple(lambdas)
    train_t2i = np.asarray(train_t2i, dtype=np.int64)
    X = np.asarray(train_X, np.float64)[train_t2i]
    best, dev_rsum = None, {}
    for lam in lambdas:
        probe = RidgeProbe.fit(X, train_Y, lam)
        rsum = recall_metrics(probe.scores(dev_X, dev_Y), np.asarray(dev_t2i, dtype=np.int64))["rsum"]
        dev_rsum[lam] = rsum
        if best is None or rsum > dev_rsum[best.lam] or (math.isclose(rsum, dev_rsum[best.lam]) and lam > best.lam):
            best = probe
    return best, {"lambda": best.lam, "dev_rsum": {f"{k:g}": v for k, v in dev_rsum.items()}}


def paired_bootstrap_rsum(S_a, S_b, txt2img, *, resamples: int = 2000, seed: int = 0,
                          ks: Sequence[int] = (1, 5, 10)) -> dict:
    """How sure is "a beats b"? rsum(a) - rsum(b) on the same split, with a 95% interval
    from resampling the queries (images for I2T, captions for T2I, with replacement; the
    galleries stay whole) and the share of resamples in which a is ahead.

    Returns {"diff": observed, "low", "high": 2.5 / 97.5 percentiles, "p_a_ahead"}."""
    from .evaluate import ranks_i2t, ranks_t2i

    g = torch.as_tensor(np.asarray(txt2img, dtype=np.int64))
    hits = []
    for ranks in (ranks_i2t, ranks_t2i):
        ra, rb = ranks(S_a, g).numpy(), ranks(S_b, g).numpy()
        # per query: sum over K of 100 * (hit_a - hit_b); its mean over queries is that direction's rsum gap
        hits.append(sum(100.0 * ((ra < K).astype(np.float64) - (rb < K)) for K in ks))
    rng = np.random.default_rng(seed)
    diffs = np.zeros(resamples)
    for h in hits:
        idx = rng.integers(0, len(h), size=(resamples, len(h)))
        diffs += h[idx].mean(axis=1)
    observed = float(sum(h.mean() for h in hits))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"diff": observed, "low": float(low), "high": float(high), "p_a_ahead": float(np.mean(diffs > 0)),
            "resamples": resamples}
