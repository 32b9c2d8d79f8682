"""Score a whole split with a model (validation, the demo's test evaluation)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def image_tensors(split, images: Optional[np.ndarray], device) -> tuple:
    """(regions (n, K, Dv) float32, region_mask (n, K) bool|None, globals (n, Dg)|None) on device
    for the rows ``images`` (int array) of a loaded ``Split`` (all rows when None)."""
    sel = slice(None) if images is None else np.asarray(images)
    # np.array copies: the memmap is read-only and torch wants writable memory.
    regions = torch.from_numpy(np.array(split.regions[sel], dtype=np.float32)).to(device)
    mask = None if split.region_mask is None else torch.from_numpy(np.array(split.region_mask[sel], dtype=bool)).to(device)
    glob = None if split.globals is None else torch.from_numpy(np.array(split.globals[sel], dtype=np.float32)).to(device)
    return regions, mask, glob


@torch.no_grad()
def score_split(model, regions, region_mask, globals_, words, word_mask, *, backend="auto", autocast=False,
                text_chunk: Optional[int] = None, return_text_vectors: bool = False,
                progress: bool = False, desc: str = "score"):
    """S (N, M) float32 on the CPU for images (regions (N, K, Dv), mask, globals) and cached
    text features words (M, L, Db) float / word_mask (M, L) bool (any device; moved to the
    images' device chunk by chunk, trimmed to each chunk's longest caption).

    With ``return_text_vectors``: (S, text_vectors (M, D) float32 CPU), the model's
    per-text vectors (the re-ranker's honest ``embedding`` neighbours)."""
    device = regions.device
    if text_chunk is None:
        # The torch backend's peak memory grows with images x texts per call (about
        # 3 GB for 1,000 x 100 at L = 23, D = 128 on the CPU): keep calls small there.
        text_chunk = 1024 if device.type == "cuda" else 100
    was_training = model.training
    model.eval()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
            V, G = model.encode_images(regions, region_mask, globals_)
            # Texts go in chunks of similar length (sorted), so a chunk pads to nearly
            # its own length: the per-pair cost grows with L and L².
            order = torch.argsort(word_mask.sum(1).cpu(), stable=True)
            cols, tvs = [], []
            from tqdm.auto import tqdm

            for start in tqdm(range(0, words.shape[0], text_chunk), desc=desc, unit="chunk", disable=not progress,
                              leave=False):
                idx = order[start:start + text_chunk]
                m = word_mask[idx.to(word_mask.device)]
                L = int(m.any(0).nonzero().max()) + 1
                w = words[idx.to(words.device), :L].to(device=device, dtype=torch.float32)
                m = m[:, :L].to(device)
                W = model.encode_texts(w, m)
                cols.append(model.score(V, region_mask, G, W, m, backend=backend).float().cpu())
                if return_text_vectors:
                    tvs.append(model.text_vectors(W, m).float().cpu())
        inverse = torch.argsort(order)
        S = torch.cat(cols, dim=1)[:, inverse]
        return (S, torch.cat(tvs)[inverse]) if return_text_vectors else S
    finally:
        model.train(was_training)


def evaluate_checkpoint(checkpoint, data, split: str = "test", *, backend: str = "auto", device="cpu",
                        progress: bool = False) -> dict:
    """Spec §4 metrics (no re-ranking) of a saved ACF on a split whose captions are
    encoded (``{split}_words.safetensors``): {"i2t", "t2i", "rsum", "images", "captions"}."""
    from acf_fast.data import load_encoded, load_split
    from acf_fast.evaluate import recall_metrics
    from acf_fast.model import ACF

    device = torch.device(device)
    sp = load_split(data, split)
    words, mask = load_encoded(data, split)
    regions, rmask, glob = image_tensors(sp, None, device)
    model = ACF.load(checkpoint, map_location=str(device))
    S = score_split(model, regions, rmask, glob, words, mask, backend=backend, autocast=True, progress=progress,
                    desc=f"score {split}")
    out = recall_metrics(S, torch.from_numpy(np.asarray(sp.txt2img)))
    out["images"], out["captions"] = int(S.shape[0]), int(S.shape[1])
    return out
