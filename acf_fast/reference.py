"""Plain references that tests and benchmarks share (one reference, never two).

``reference_similarity`` is spec §2–§3 written literally: float64, one (image, text)
pair at a time, one head at a time, only the valid rows. It is slow on purpose and
exists to be obviously right. ``authors_local_score`` re-states the authors' released
``0.5·xattn_score_i2t1 + 0.5·xattn_score_t2i1`` (8 heads, smooth 4 / 9, unmasked
regions, captions cut to their length) so the ``acf-code`` variant can be checked
against it.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from .notation import cosine


def mha(X, Y, s, heads, z_x=None, z_y=None, z_o=None):
    """Spec §2 on valid rows only. X (m, D) queries, Y (n, D) keys (= values) -> (m, D)."""
    D = X.shape[1]
    d = D // heads
    eye = torch.eye(D, dtype=X.dtype, device=X.device)
    z_x = eye if z_x is None else z_x
    z_y = eye if z_y is None else z_y
    z_o = eye if z_o is None else z_o
    outs = []
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        Q = X @ z_x[:, cols]
        Kh = Y @ z_y[:, cols]
        A = torch.softmax(s * Q @ Kh.T, dim=-1)
        outs.append(A @ Kh)
    return torch.cat(outs, dim=1) @ z_o


def reference_similarity(V, v_mask, W, w_mask, *, heads=8, scale=None, u1=0.5, u2=0.8,
                         weights: Optional[Mapping[str, torch.Tensor]] = None, G=None, global_emb=None):
    """Spec §3 by per-pair loops in float64. Returns S (N, M) float64."""
    f = lambda t: None if t is None else t.detach().to(torch.float64).cpu()
    V, W, G = f(V), f(W), f(G)
    N, K, D = V.shape
    M, L, _ = W.shape
    d = D // heads
    s_i2t, s_t2i = (d ** -0.5, d ** -0.5) if scale is None else scale
    wts = {k: f(v) for k, v in (weights or {}).items() if v is not None}
    v_mask = torch.ones(N, K, dtype=torch.bool) if v_mask is None else v_mask.cpu()
    w_mask = torch.ones(M, L, dtype=torch.bool) if w_mask is None else w_mask.cpu()
    eye = torch.eye(D, dtype=torch.float64)
    x_w, x_v, x_g = (wts.get(k, eye) for k in ("x_w", "x_v", "x_g"))
    sig = torch.sigmoid(wts.get("gate", torch.zeros(D, dtype=torch.float64)))
    proj = {k: wts.get(k) for k in ("z_x", "z_y", "z_o")}
    S = torch.empty(N, M, dtype=torch.float64)
    for i in range(N):
        v = V[i][v_mask[i]]
        for j in range(M):
            w = W[j][w_mask[j]]
            w_star = mha(v, w, s_i2t, heads, **proj)
            v_star = mha(w, v, s_t2i, heads, **proj)
            local = u1 * cosine(v, w_star).mean() + (1 - u1) * cosine(w, v_star).mean()
            if G is not None:
                Wg = w_star.mean(0) @ x_w
                Vg = sig * (v_star.mean(0) @ x_v) + (1 - sig) * (G[i] @ x_g)
                glob = cosine(Vg, Wg)
            elif global_emb is not None:
                glob = f(global_emb[0])[i] @ f(global_emb[1])[j]
            else:
                glob = torch.zeros((), dtype=torch.float64)
            S[i, j] = u2 * local + (1 - u2) * glob
    return S


def authors_local_score(images, captions, cap_lens, heads=8, smooth_i2t=4.0, smooth_t2i=9.0):
    """The authors' acf-code local score, re-stated: images (N, K, D) all regions valid,
    captions (M, L, D) with caption t valid in its first ``cap_lens[t]`` rows.

    For each caption: repeat it over every image, split D into ``heads`` heads, attend
    (regions -> words with smooth 4, words -> regions with smooth 9, value = key),
    concatenate heads, cosine of each query row with its attended context, mean over
    the query rows; the two directions averaged 0.5 / 0.5. Returns (N, M) float64.
    """
    images = images.detach().to(torch.float64).cpu()
    captions = captions.detach().to(torch.float64).cpu()
    N, K, D = images.shape
    d = D // heads

    def attend(query, context, smooth):  # (n, q, D), (n, c, D) -> (n, q, D)
        n = query.shape[0]
        q = query.view(n, query.shape[1], heads, d).transpose(1, 2)
        k = context.view(n, context.shape[1], heads, d).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-2, -1) * smooth, dim=-1)
        return (a @ k).transpose(1, 2).reshape(n, query.shape[1], D)

    i2t, t2i = [], []
    for t in range(captions.shape[0]):
        cap = captions[t, : int(cap_lens[t])].unsqueeze(0).repeat(N, 1, 1)
        i2t.append(cosine(images, attend(images, cap, smooth_i2t)).mean(1))
        t2i.append(cosine(cap, attend(cap, images, smooth_t2i)).mean(1))
    return 0.5 * torch.stack(i2t, 1) + 0.5 * torch.stack(t2i, 1)
