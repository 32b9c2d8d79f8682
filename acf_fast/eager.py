"""``backend="eager"``: the obvious per-pair PyTorch, the baseline every benchmark beats.

It follows the authors' sharded evaluation: one text at a time (cut to its valid
words), broadcast over a block of images, materialising the attended features
W* (n, K, D) and V* (n, L, D) and applying z_o to them. Differentiable in every
input and weight by plain autograd.
"""
from __future__ import annotations

import torch

from .notation import cosine, masked_mean

# Images per block: bounds the materialised (block, K, D) tensors (~4 at a time).
_BLOCK_BYTES = 256 * 2**20


def _heads_attend(Xq, Xk, key_mask, s, heads, z_x, z_y, z_o):
    """Batched spec §2. Xq (n, m, D) queries, Xk (n, t, D) keys, key_mask (n, t) bool or None."""
    n, m, D = Xq.shape
    d = D // heads
    Q = Xq if z_x is None else Xq @ z_x
    Kk = Xk if z_y is None else Xk @ z_y
    Q = Q.view(n, m, heads, d).transpose(1, 2)
    Kh = Kk.view(n, Kk.shape[1], heads, d).transpose(1, 2)
    logits = s * Q @ Kh.transpose(-2, -1)  # (n, H, m, t)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = (torch.softmax(logits, dim=-1) @ Kh).transpose(1, 2).reshape(n, m, D)
    return out if z_o is None else out @ z_o


def eager_similarity(V, v_mask, W, w_mask, *, heads, scale, u1, u2, weights, G, global_emb):
    """Inputs already validated. Computes in float64 for float64 inputs, else float32.

    Returns S (N, M) in that compute dtype.
    """
    cdt = torch.float64 if V.dtype == torch.float64 else torch.float32
    V, W = V.to(cdt), W.to(cdt)
    wts = {k: v.to(cdt) for k, v in weights.items()}
    z_x, z_y, z_o = wts.get("z_x"), wts.get("z_y"), wts.get("z_o")
    s_i2t, s_t2i = scale
    N, K, D = V.shape
    M = W.shape[0]
    if G is not None:
        G = G.to(cdt)
        gate = torch.sigmoid(wts["gate"]) if "gate" in wts else torch.full((D,), 0.5, dtype=cdt, device=V.device)
        Gx = G if "x_g" not in wts else G @ wts["x_g"]
    if global_emb is not None:
        Gi, Gt = (g.to(cdt) for g in global_emb)
    block = max(1, _BLOCK_BYTES // (K * D * V.element_size() * 4))
    columns = []
    for j in range(M):
        w = W[j] if w_mask is None else W[j][w_mask[j]]  # (L_j, D), valid words only
        col = []
        for start in range(0, N, block):
            v = V[start : start + block]
            vm = None if v_mask is None else v_mask[start : start + block]
            n = v.shape[0]
            w_rep = w.unsqueeze(0).expand(n, -1, -1)
            w_star = _heads_attend(v, w_rep, None, s_i2t, heads, z_x, z_y, z_o)  # (n, K, D)
            v_star = _heads_attend(w_rep, v, vm, s_t2i, heads, z_x, z_y, z_o)  # (n, L_j, D)
            local = u1 * masked_mean(cosine(v, w_star), vm) + (1 - u1) * cosine(w_rep, v_star).mean(1)
            if G is not None:
                Wg = masked_mean(w_star, vm)
                Vg = v_star.mean(1)
                if "x_w" in wts:
                    Wg = Wg @ wts["x_w"]
                if "x_v" in wts:
                    Vg = Vg @ wts["x_v"]
                Vg = gate * Vg + (1 - gate) * Gx[start : start + block]
                glob = cosine(Vg, Wg)
            elif global_emb is not None:
                glob = Gi[start : start + block] @ Gt[j]
            else:
                glob = None
            col.append(local if glob is None else u2 * local + (1 - u2) * glob)
        columns.append(torch.cat(col))
    return torch.stack(columns, dim=1)
