"""Recall metrics and the standard protocols (spec §4), for any model's S.

S is (N images, M texts); caption t belongs to image ``txt2img[t]`` (default
t // 5, COCO and Flickr30K). Ranks are 0-based counts (items scoring strictly
higher + items scoring equal with a smaller index), computed by streaming S once
per direction, never by sorting it.

- I2T rank of image i = min rank over its captions in row i.
- T2I rank of caption t = rank of its image in column t.
- R@K = 100 * fraction with rank < K (K = 1, 5, 10); medr = floor(median) + 1;
  meanr = mean + 1; rsum = sum of the six R@K.

Re-ranked heads (``i2t_heads`` (N, k), ``t2i_heads`` (M, k), from
:mod:`acf_fast.rerank`) define the new list of a query as: the head, then every
other item in its original order. So a target inside the head has the rank of its
position there; a target outside it has rank
``k + (its original rank) - #{head items originally ranked before it}``, which is
its original rank whenever the head is a reordering of the original top k (what
the re-ranker returns). R@K for K <= k therefore reads the head alone.

Ranks are counted by :func:`acf_fast.ranking.target_positions`: a Triton kernel for
float32/16/bf16 S on CUDA (``backend="auto"``), torch ops otherwise, the same
integers either way. Every public function checks S once (NaN/Inf, shape) and hands
the checked tensor to the internal ``_``-functions, which never check it again.

Protocols: ``coco5k`` (5,000 x 25,000 at once), ``coco1k`` (five folds of 1,000 x
5,000, every metric averaged over the folds; rsum = sum of the averaged six R@K,
which equals the mean of the fold rsums - SCAN's 5-fold printout mislabels it),
``f30k`` (1,000 x 5,000), ``any`` (any shape, explicit or default txt2img).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .ranking import check_k, check_scores, resolve_backend, target_positions
from .rerank import NEIGHBOR_MODES, ORACLE_LABEL, _rerank_both, neighbors_of_checked
from .validate import check_txt2img

RECALL_KS = (1, 5, 10)
METRIC_KEYS = ("r1", "r5", "r10", "medr", "meanr")

# shape (images, captions) and number of image folds per protocol.
PROTOCOLS = {
    "coco5k": {"shape": (5000, 25000), "folds": 1},
    "coco1k": {"shape": (5000, 25000), "folds": 5},
    "f30k": {"shape": (1000, 5000), "folds": 1},
    "any": {"shape": None, "folds": 1},
}


def _check_heads(heads, n_lists: int, length: int, name: str, device) -> torch.Tensor:
    if isinstance(heads, np.ndarray):
        heads = torch.from_numpy(heads)
    if not isinstance(heads, torch.Tensor) or heads.dim() != 2 or heads.shape[0] != n_lists:
        raise ValueError(f"{name} must be a ({n_lists}, k) tensor of ids, got {getattr(heads, 'shape', type(heads).__name__)}")
    if heads.dtype.is_floating_point or heads.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer ids, got dtype {heads.dtype}")
    check_k(heads.shape[1], length, f"{name} width k", "list it re-ranks")
    heads = heads.to(device=device, dtype=torch.long)
    if int(heads.min()) < 0 or int(heads.max()) >= length:
        raise ValueError(f"{name} holds ids outside [0, {length})")
    srt = torch.sort(heads, dim=1).values
    if bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError(f"{name} repeats an id within a row; a head must list distinct items")
    return heads


def _apply_heads(rank, heads, hit, score_t, score_h, idx_t, idx_h):
    """New 0-based ranks given re-ranked heads (see module doc). hit (Q, k) bool marks
    targets inside the head; score_*/idx_* give the target's and head items' keys."""
    k = heads.shape[1]
    pos = torch.where(hit.any(1), hit.to(torch.uint8).argmax(1), -1)
    ahead = ((score_h > score_t[:, None]) | ((score_h == score_t[:, None]) & (idx_h < idx_t[:, None]))).sum(1)
    return torch.where(pos >= 0, pos, k + rank - ahead)


def _ranks_i2t(S, g, heads, backend):
    """I2T ranks of a checked S (N, M), g (M,) long on S's device, heads checked or None."""
    N, M = S.shape
    t = torch.arange(M, device=S.device)
    own = S[g, t]  # score of each caption in its own image's row
    # Best caption of each image by (score desc, index asc): its rank is the min.
    top = torch.full((N,), float("-inf"), dtype=S.dtype, device=S.device).scatter_reduce(0, g, own, "amax")
    best = torch.full((N,), M, dtype=torch.long, device=S.device).scatter_reduce(
        0, g, torch.where(own == top[g], t, M), "amin"
    )
    rank = target_positions(S, best, 1, backend)
    if heads is None:
        return rank
    rows = torch.arange(N, device=S.device)
    hit = g[heads] == rows[:, None]
    return _apply_heads(rank, heads, hit, S[rows, best], S.gather(1, heads), best, heads)


def _ranks_t2i(S, g, heads, backend):
    """T2I ranks of a checked S (N, M), g (M,) long on S's device, heads checked or None."""
    M = S.shape[1]
    rank = target_positions(S, g, 0, backend)
    if heads is None:
        return rank
    cols = torch.arange(M, device=S.device)
    hit = heads == g[:, None]
    return _apply_heads(rank, heads, hit, S[g, cols], S[heads, cols[:, None]], g, heads)


def _metrics_backend(backend: str, S: torch.Tensor) -> str:
    return resolve_backend(backend, S, copy_bytes=0)  # the counting kernels read S in place


def ranks_i2t(S, txt2img=None, heads=None, *, backend: str = "auto") -> torch.Tensor:
    """(N,) long 0-based I2T rank of every image: min rank over its captions in its row
    (in its re-ranked list when ``heads`` (N, k) is given)."""
    return _checked_ranks(_ranks_i2t, "i2t_heads", S, txt2img, heads, backend)


def ranks_t2i(S, txt2img=None, heads=None, *, backend: str = "auto") -> torch.Tensor:
    """(M,) long 0-based T2I rank of every caption: rank of its image in its column
    (in its re-ranked list when ``heads`` (M, k) is given)."""
    return _checked_ranks(_ranks_t2i, "t2i_heads", S, txt2img, heads, backend)


def _checked_ranks(ranks, name, S, txt2img, heads, backend):
    S = check_scores(S)
    N, M = S.shape
    g = check_txt2img(txt2img, N, M).to(S.device)
    if heads is not None:
        heads = _check_heads(heads, *((N, M) if name == "i2t_heads" else (M, N)), name, S.device)
    return ranks(S, g, heads, _metrics_backend(backend, S))


def summarize_ranks(ranks) -> dict:
    """R@1, R@5, R@10 (percent), medr, meanr of 0-based ranks, as plain floats."""
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    out = {f"r{K}": float(100.0 * np.mean(r < K)) for K in RECALL_KS}
    out["medr"] = float(math.floor(np.median(r)) + 1)
    out["meanr"] = float(r.mean() + 1)
    return out


def _rsum(m: dict) -> float:
    return float(sum(m[d][f"r{K}"] for d in ("i2t", "t2i") for K in RECALL_KS))


def recall_metrics(S, txt2img=None, i2t_heads=None, t2i_heads=None, *, backend: str = "auto") -> dict:
    """Spec §4 metrics of S (N, M): {"i2t": {r1 r5 r10 medr meanr}, "t2i": {...}, "rsum"}.

    Args:
        S: (N, M) float scores (torch or numpy), any device.
        txt2img: (M,) integer image id per caption; None = t // 5.
        i2t_heads: (N, k) re-ranked text ids per image, or None.
        t2i_heads: (M, k) re-ranked image ids per text, or None.
        backend: "auto" (counting kernels for float32/16/bf16 S on CUDA), "torch" or
            "triton"; the ranks are the same.
    """
    S = check_scores(S)
    N, M = S.shape
    g = check_txt2img(txt2img, N, M).to(S.device)
    hi = None if i2t_heads is None else _check_heads(i2t_heads, N, M, "i2t_heads", S.device)
    ht = None if t2i_heads is None else _check_heads(t2i_heads, M, N, "t2i_heads", S.device)
    return _recall(S, g, hi, ht, _metrics_backend(backend, S))


def _recall(S, g, i2t_heads, t2i_heads, backend) -> dict:
    """recall_metrics of checked inputs (g (M,) long on S's device)."""
    out = {"i2t": summarize_ranks(_ranks_i2t(S, g, i2t_heads, backend)),
           "t2i": summarize_ranks(_ranks_t2i(S, g, t2i_heads, backend))}
    out["rsum"] = _rsum(out)
    return out


def _average(metrics: list) -> dict:
    out = {d: {key: float(np.mean([m[d][key] for m in metrics])) for key in METRIC_KEYS} for d in ("i2t", "t2i")}
    out["rsum"] = _rsum(out)
    return out


def _evaluate_one(S, g, *, rerank, k_i2t, k_t2i, kprime, n, neighbors, text_vectors, backend):
    """Plain and re-ranked metrics of a checked S (N, M), txt2img g (M,) long and
    checked text_vectors: nothing here scans S to validate it again."""
    g = g.to(S.device)
    mb = _metrics_backend(backend, S)
    plain = _recall(S, g, None, None, mb)
    if not rerank:
        return plain, None
    N, M = S.shape
    k_i2t = check_k(k_i2t, M, "k_i2t", "list of captions per image")
    k_t2i = check_k(k_t2i, N, "k_t2i", "list of images per caption")
    check_k(kprime, M if neighbors != "siblings" else 10**18, "kprime", "number of captions")
    nb = neighbors_of_checked(neighbors, kprime, S, text_vectors, g, backend)
    heads_i2t, heads_t2i = _rerank_both(S, nb.to(S.device), k_i2t, k_t2i, n, resolve_backend(backend, S))
    return plain, _recall(S, g, heads_i2t, heads_t2i, mb)


def evaluate_protocol(
    S,
    protocol: str = "any",
    txt2img=None,
    *,
    rerank: bool = False,
    k_i2t: int = 15,
    k_t2i: int = 20,
    kprime: int = 5,
    n: Optional[int] = None,
    neighbors: Optional[str] = None,
    text_vectors=None,
    backend: str = "auto",
) -> dict:
    """Evaluate S (N, M) under a protocol, plain and (optionally) re-ranked.

    Args:
        S: (N, M) float scores.
        protocol: "coco5k", "coco1k", "f30k" or "any" (see module doc); the first
            three check S's shape.
        txt2img: (M,) integer image id per caption, None = t // 5.
        rerank: also compute ACF-R+ re-ranked metrics (k_i2t, k_t2i, kprime, n).
        neighbors: "embedding" | "profile" | "siblings"; None = "embedding" when
            ``text_vectors`` (M, E) is given, else "profile".
        backend: "auto" | "torch" | "triton" for ranks, re-ranking and neighbours
            (:mod:`acf_fast.ranking`); the results are the same.

    Returns:
        {"protocol", "images", "texts", "folds", "plain": metrics, "reranked":
        metrics or None, "rerank": settings or None, "fold_results": [...] (coco1k)}.
        For folds, every metric is the mean over the folds and rsum the sum of
        the averaged R@K. Re-ranked results from "siblings" carry
        ``"label": "oracle (uses ground-truth captions)"``.
    """
    S = check_scores(S)
    N, M = S.shape
    spec = protocol_spec(protocol, N, M)
    g = check_txt2img(txt2img, N, M)
    neighbors, text_vectors = _check_rerank_inputs(rerank, neighbors, text_vectors, M)
    opts = dict(rerank=rerank, k_i2t=k_i2t, k_t2i=k_t2i, kprime=kprime, n=n, neighbors=neighbors, backend=backend)
    return protocol_result(protocol, N, M, _kfold(S, spec["folds"], g, text_vectors, opts), **opts)


def _kfold(S, folds: int, g, text_vectors, opts: dict) -> list:
    """[{"images": (a, b), "plain", "reranked"}] of each fold of a checked S (N, M)."""
    parts = []
    for a, b, caps in protocol_folds(S.shape[0], g, folds):
        if caps is None:
            plain, reranked = _evaluate_one(S, g, text_vectors=text_vectors, **opts)
        else:
            tv = None if text_vectors is None else text_vectors[caps.to(text_vectors.device)]
            plain, reranked = _evaluate_one(S[a:b][:, caps.to(S.device)], g[caps] - a, text_vectors=tv, **opts)
        parts.append({"images": (a, b), "plain": plain, "reranked": reranked})
    return parts


def protocol_spec(protocol: str, N: int, M: int, what: str = "S") -> dict:
    """``PROTOCOLS[protocol]``, after checking the name and that ``what`` (N images, M
    captions) has the protocol's shape (ValueError otherwise)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {protocol!r}")
    spec = PROTOCOLS[protocol]
    if spec["shape"] is not None and (N, M) != tuple(spec["shape"]):
        raise ValueError(f"protocol {protocol!r} expects {what} of shape {tuple(spec['shape'])} (images, captions), "
                         f"got {(N, M)}; use --protocol any for other sizes")
    return spec


def protocol_folds(N: int, g: torch.Tensor, folds: int) -> list:
    """The folds of a protocol as [(a, b, caps)]: images [a, b) and caps (M_f,) long, the
    captions of those images (by txt2img ``g``); one fold is every image and caption, caps None."""
    if folds == 1:
        return [(0, N, None)]
    if N % folds:
        raise ValueError(f"{N} images do not divide into {folds} equal folds")
    size = N // folds
    return [(a, a + size, ((g >= a) & (g < a + size)).nonzero().squeeze(1)) for a in range(0, N, size)]


def protocol_result(protocol: str, N: int, M: int, parts: list, *, rerank: bool, k_i2t: int, k_t2i: int, kprime: int,
                    n: Optional[int], neighbors: str, **_) -> dict:
    """The result dict of :func:`evaluate_protocol` from the per-fold ``parts``
    [{"images": (a, b), "plain", "reranked"}] (one part: no fold_results; several: every
    metric the mean over the folds)."""
    result = {"protocol": protocol, "images": N, "texts": M, "folds": len(parts)}
    if len(parts) == 1:
        plain, reranked = parts[0]["plain"], parts[0]["reranked"]
    else:
        result["fold_results"] = parts
        plain = _average([f["plain"] for f in parts])
        reranked = _average([f["reranked"] for f in parts]) if rerank else None
    result["plain"] = plain
    result["reranked"] = reranked
    result["rerank"] = None
    if rerank:
        result["rerank"] = {"k_i2t": k_i2t, "k_t2i": k_t2i, "kprime": kprime, "n": n, "neighbors": neighbors,
                            "oracle": neighbors == "siblings"}
        if neighbors == "siblings":
            result["rerank"]["label"] = ORACLE_LABEL
    return result


def _check_rerank_inputs(rerank: bool, neighbors, text_vectors, M: int):
    """(neighbors mode, checked text_vectors or None); None mode = "embedding" when
    text_vectors is given, else "profile"."""
    if neighbors is None:
        neighbors = "embedding" if text_vectors is not None else "profile"
    if not rerank:
        return neighbors, None
    if neighbors not in NEIGHBOR_MODES:
        raise ValueError(f"neighbors must be one of {NEIGHBOR_MODES}, got {neighbors!r}")
    if neighbors != "embedding":
        return neighbors, None
    if text_vectors is None:
        raise ValueError("neighbors='embedding' needs text_vectors (M, E); use 'profile' for a bare S")
    text_vectors = check_scores(text_vectors, "text_vectors")
    if text_vectors.shape[0] != M:
        raise ValueError(f"text_vectors must have one row per text ({M}), got {tuple(text_vectors.shape)}")
    return neighbors, text_vectors


def kfold_metrics(S, folds: int, txt2img=None, *, rerank: bool = False, k_i2t: int = 15, k_t2i: int = 20,
                  kprime: int = 5, n: Optional[int] = None, neighbors: Optional[str] = None, text_vectors=None,
                  backend: str = "auto") -> list:
    """Metrics of each of ``folds`` equal contiguous image folds of S (N, M), each
    with the captions of its images (in index order). Returns a list of
    {"images": (start, stop), "plain": metrics, "reranked": metrics|None}."""
    S = check_scores(S)
    N, M = S.shape
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or not 1 <= folds <= N:
        raise ValueError(f"folds must be an int in [1, {N}] (S has {N} images), got {folds!r}")
    g = check_txt2img(txt2img, N, M)
    if isinstance(text_vectors, np.ndarray):
        text_vectors = torch.from_numpy(text_vectors)
    neighbors, text_vectors = _check_rerank_inputs(rerank, neighbors, text_vectors, M)
    opts = dict(rerank=rerank, k_i2t=k_i2t, k_t2i=k_t2i, kprime=kprime, n=n, neighbors=neighbors, backend=backend)
    return _kfold(S, folds, g, text_vectors, opts)


_ROWS = [("R@1", "r1"), ("R@5", "r5"), ("R@10", "r10"), ("medr", "medr"), ("meanr", "meanr")]


def format_table(result: dict) -> str:
    """The standard table of an :func:`evaluate_protocol` result: R@1 R@5 R@10 medr
    meanr per direction and rsum, plain and re-ranked side by side."""
    plain, rr = result["plain"], result.get("reranked")
    head = f"protocol {result['protocol']}: {result['images']} images x {result['texts']} captions"
    if result.get("folds", 1) > 1:
        head += f", mean of {result['folds']} folds"
    lines = [head]
    cols = ["plain"]
    if rr is not None:
        setting = result["rerank"]
        label = setting.get("label") or f"neighbors: {setting['neighbors']}"
        cols.append(f"re-ranked, {label}")
        lines.append(
            f"re-ranking: k_i2t={setting['k_i2t']} k_t2i={setting['k_t2i']} k'={setting['kprime']} "
            f"n={'full' if setting['n'] is None else setting['n']} neighbors={setting['neighbors']}"
        )
    widths = [max(8, len(c)) for c in cols]
    lines.append(f"{'':12s}" + "  ".join(f"{c:>{w}s}" for c, w in zip(cols, widths)))
    for d, name in (("i2t", "I2T"), ("t2i", "T2I")):
        for label, key in _ROWS:
            vals = [plain[d][key]] + ([rr[d][key]] if rr is not None else [])
            lines.append(f"{name + ' ' + label:12s}" + "  ".join(f"{v:>{w}.2f}" for v, w in zip(vals, widths)))
    vals = [plain["rsum"]] + ([rr["rsum"]] if rr is not None else [])
    lines.append(f"{'rsum':12s}" + "  ".join(f"{v:>{w}.2f}" for v, w in zip(vals, widths)))
    return "\n".join(lines)
