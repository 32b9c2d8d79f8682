"""Two-stage evaluation, ``acf-fast evaluate --data ... --shortlist K`` (issue 15 item 3).

ALBEF / BLIP-style: a cheap global score ranks everything, the expensive
cross-attention re-scores only a shortlist.

1. Cheap score: the model's own global embeddings, one matmul,
   ``C = G · text_vectorsᵀ`` (N, M): G (N, D) the encoded global image features
   (``ACF.encode_images``), text_vectors (M, D) the l2-normalised mean of each caption's
   valid word features (``ACF.text_vectors``). Both are partner-free: this is the
   acf-code variant's global score and the paper variant's w/o-CMF one; for the paper
   variant with CMF it is a score the model was never trained to rank by, so its
   shortlists are only as good as G and the word features happen to align.
2. Shortlist: each image's top-K texts and each text's top-K images under C (ties to
   the smaller index, :func:`acf_fast.ranking.topk_along`), the union of these pairs.
3. ACF's full similarity scores only those pairs (:func:`acf_fast.acf_similarity_pairs`
   through ``ACF.score_pairs``).
4. S = the ACF score on the shortlisted pairs; every other entry keeps its cheap score
   shifted below every re-scored one (``C + min(ACF) − max(C off the list) − 1``), so in
   every row and column the shortlisted pairs rank first, in ACF's order, and the rest
   follow in the cheap order.

With K ≥ max(N, M) every pair is on the list and S is the full grid (up to float32
rounding between the pair and grid code paths). Metrics and re-ranking then run on
this S exactly as on a full one.

    scored = shortlist_split("run/best.safetensors", "data/", "test", k=64)   # ScoredSplit
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .scoring import DEFAULT_PRECISION, ScoredSplit

__all__ = ["shortlist_pairs", "combine_scores", "encode_split", "cheap_scores", "shortlist_split", "SHIFT_MARGIN"]

# Gap between the lowest re-scored entry and the highest shifted cheap one. ACF and the
# cheap score are cosines in [-1, 1], so the shifted scores stay within [-5, 1]: float32
# resolves them to ~5e-7, ties only where the cheap scores already were that close.
SHIFT_MARGIN = 1.0
# Images per acf_similarity_pairs call (the progress bar's step); a call gets only the
# images and texts it names, so the texts named by several calls are precomputed once per call.
_IMAGES_PER_CALL = 256


def shortlist_pairs(C: torch.Tensor, k: int) -> torch.Tensor:
    """The union of each row's top-k columns and each column's top-k rows of C (N, M).

    Args:
        C: (N, M) float cheap scores. k: positive int; rows take min(k, M) columns and
            columns min(k, N) rows (ties to the smaller index).

    Returns:
        (P, 2) int64 (row, column) pairs on C's device, sorted by row then column,
        each pair once.
    """
    from .ranking import topk_along

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (--shortlist) must be a positive int, got {k!r}")
    N, M = C.shape
    rows = topk_along(C, min(k, M), axis=1)  # (N, k) column ids
    cols = topk_along(C, min(k, N), axis=0)  # (M, k) row ids
    ar_n = torch.arange(N, device=C.device)[:, None]
    ar_m = torch.arange(M, device=C.device)[:, None]
    keys = torch.cat([(ar_n * M + rows).reshape(-1), (cols * M + ar_m).reshape(-1)])
    keys = torch.unique(keys)  # sorted
    return torch.stack([keys // M, keys % M], dim=1)


def combine_scores(C: torch.Tensor, pairs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """S (N, M) float32: ``scores`` at ``pairs``, C shifted below all of them elsewhere.

    Args:
        C: (N, M) cheap scores. pairs: (P, 2) int64 distinct (row, column) pairs.
        scores: (P,) the re-scored values of those pairs.
    """
    S = C.to(torch.float32).clone()
    if pairs.shape[0] == 0:
        return S
    on = torch.zeros_like(S, dtype=torch.bool)
    on[pairs[:, 0], pairs[:, 1]] = True
    if not bool(on.all()):
        shift = scores.min().to(torch.float32) - S[~on].max() - SHIFT_MARGIN
        S += shift
    S[pairs[:, 0], pairs[:, 1]] = scores.to(torch.float32)
    return S


def _pad_texts(chunks, D: int, device):
    """EncodedTexts chunks (length-sorted, each padded to its own L) -> W (M, L_max, D), mask (M, L_max)."""
    L = max(W.shape[1] for W, _ in chunks)
    M = sum(W.shape[0] for W, _ in chunks)
    W_all = torch.zeros(M, L, D, dtype=chunks[0][0].dtype, device=device)
    m_all = torch.zeros(M, L, dtype=torch.bool, device=device)
    a = 0
    for W, m in chunks:
        W_all[a:a + W.shape[0], :W.shape[1]] = W
        m_all[a:a + W.shape[0], :W.shape[1]] = m
        a += W.shape[0]
    return W_all, m_all


@torch.no_grad()
def encode_split(opened, *, chunk_images: int = 256, precision: str = DEFAULT_PRECISION):
    """Stage 1's encoding of an opened split (``scoring.open_split``): (V (N, K, D), v_mask
    (N, K) or None, G (N, D)) of every image, ``chunk_images`` at a time, and the captions'
    ``scoring.EncodedTexts`` (length-sorted chunks and the text vectors in caption order)."""
    from .scoring import _autocast, _eval_mode, encode_texts, image_tensors

    model, data, dev = opened.model, opened.data, opened.device
    texts = encode_texts(model, opened.words, opened.word_mask, dev, precision=precision)
    Vs, vms, Gs = [], [], []
    with _eval_mode(model), _autocast(precision):
        for a in range(0, data.num_images, chunk_images):
            regions, rmask, glob = image_tensors(data, slice(a, min(data.num_images, a + chunk_images)), dev)
            V, G = model.encode_images(regions, rmask, glob)
            Vs.append(V)
            Gs.append(G)
            vms.append(rmask)
    return torch.cat(Vs), None if vms[0] is None else torch.cat(vms), torch.cat(Gs), texts


def cheap_scores(G: torch.Tensor, texts) -> torch.Tensor:
    """The cheap score C = G · text_vectorsᵀ (N, M) float32, caption order, on G's device."""
    return G.float() @ texts.vectors.to(G.device).T


@torch.no_grad()
def shortlist_split(
    model,
    folder,
    split: str = "test",
    *,
    k: int,
    backend: str = "auto",
    device="auto",
    precision: str = DEFAULT_PRECISION,
    chunk_images: int = 256,
    progress: bool = True,
) -> ScoredSplit:
    """Two-stage S of a SCAN-layout split (see the module docstring).

    Args:
        model: a checkpoint path (``ACF.save``) or an ACF instance (moved to ``device``).
        folder, split: the data (captions encoded by ``acf-fast data encode``).
        k: the shortlist size per image and per text (``--shortlist K``).
        backend, device, precision: as :func:`acf_fast.scoring.score_split`.
        chunk_images: images encoded at a time.

    Returns:
        ScoredSplit with S (N, M) float32 CPU and ``info`` holding ``shortlist`` (k),
        ``pairs`` (how many were re-scored), ``fraction`` of the grid, and the seconds
        of each stage (``time_encode_s``, ``time_cheap_s``, ``time_acf_s``).
    """
    from tqdm.auto import tqdm

    from .scoring import _autocast, _eval_mode, open_split

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"--shortlist must be a positive int, got {k!r}")
    opened = open_split(model, folder, split, backend=backend, device=device, precision=precision,
                        chunk_images=chunk_images)
    model, data, dev = opened.model, opened.data, opened.device
    N, M = data.num_images, data.num_captions

    t0 = time.perf_counter()
    V, v_mask, G, texts = encode_split(opened, chunk_images=chunk_images, precision=precision)
    W, w_mask = _pad_texts(texts.chunks, model.config["embed_dim"], dev)  # length-sorted order
    position = torch.argsort(texts.order).to(dev)  # caption t sits at row position[t] of W
    t1 = time.perf_counter()

    C = cheap_scores(G, texts)
    pairs = shortlist_pairs(C, k)
    t2 = time.perf_counter()

    scores = torch.empty(pairs.shape[0], dtype=torch.float32, device=dev)
    starts = torch.searchsorted(pairs[:, 0].contiguous(), torch.arange(0, N + _IMAGES_PER_CALL, _IMAGES_PER_CALL,
                                                                      device=dev)).tolist()
    with _eval_mode(model), _autocast(precision), tqdm(total=pairs.shape[0], unit="pair", desc=f"shortlist {split}",
                                                       disable=not progress) as bar:
        for a, b in zip(starts[:-1], starts[1:]):
            if b > a:
                # only the images and texts this call names: the checks, the text vectors and
                # the precompute then cost what the call scores, not the whole split each time
                i0, i1 = int(pairs[a, 0]), int(pairs[b - 1, 0]) + 1
                tu, tl = torch.unique(position[pairs[a:b, 1]], return_inverse=True)  # sorted: W's length order kept
                p = torch.stack([pairs[a:b, 0] - i0, tl], dim=1)
                scores[a:b] = model.score_pairs(V[i0:i1], None if v_mask is None else v_mask[i0:i1], G[i0:i1], W[tu],
                                                w_mask[tu], p, backend=backend).float()
                bar.update(b - a)
    t3 = time.perf_counter()

    S = combine_scores(C, pairs, scores).cpu()
    info = {"shortlist": k, "pairs": int(pairs.shape[0]), "fraction": pairs.shape[0] / (N * M),
            "time_encode_s": t1 - t0, "time_cheap_s": t2 - t1, "time_acf_s": t3 - t2,
            "backend": backend, "precision": precision, "device": dev.type, "split": split,
            "cheap_score": "G . text_vectors (the model's global embeddings)"}
    return ScoredSplit(S, texts.vectors, np.asarray(data.txt2img, dtype=np.int64), info)
