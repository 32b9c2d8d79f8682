"""Training batches (spec §6): images, captions, positives and the shuffled texts
that shuffle negatives need, as the dict ``Objective`` takes.

Frozen encoder (default): every text is encoded once and cached (``data.encode_split``):
    captions            ``<data>/{split}_words.safetensors`` (``acf-fast data encode``)
    shuffled captions   ``<data>/{split}_shuffled_words.safetensors``
    short / long        ``<data>/positives/{split}_{short,long}_words.safetensors``
                        (long: every (caption, partner) pair, see ``positives.LongPairs``)
    their shuffles      ``..._shuffled_words.safetensors`` beside them
The shuffles are made only when the negatives use them ("shuffle", "mixture"). Each
text has ONE shuffled version, drawn with ``SHUFFLE_SEED`` [choice]: the spec asks to
encode a shuffle once and cache it, and a fixed draw lets every run and ablation row
on a data folder share the cache. Generated caches are stored in float16, and the
positives (4-5 texts per caption) are held in memory in float16 as well.

Encoder in the loop (``--finetune``): token ids instead, built per access (positives
and shuffles drawn from the step generator).

Every draw comes from the step's ``torch.Generator``, in a fixed order, so a batch
is a function of (seed, epoch, step) and resume is exact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from acf_fast.atomic import atomic_write_lines
from acf_fast.scoring import image_tensors

from .config import TrainConfig
from .negatives import uses_shuffle
from .positives import LongPairs, long_positive, short_positive

SHUFFLE_SEED = 0


class TextSet:
    """Cached encoder features of a list of texts, optionally with their shuffles.

    words (M, L, Db) float16/float32, mask (M, L) bool; shuf_words (M, L, Db) with the
    same mask and shuf_changed (M,) bool, or None."""

    def __init__(self, words, mask, shuf_words=None, shuf_changed=None):
        self.words, self.mask, self.shuf_words, self.shuf_changed = words, mask, shuf_words, shuf_changed

    @property
    def dim(self) -> int:
        return int(self.words.shape[2])

    def rows(self, idx: torch.Tensor) -> dict:
        """Rows ``idx`` trimmed to their longest text, float32: words, mask (+ shuf_words,
        shuf_changed)."""
        m = self.mask[idx]
        L = int(m.any(0).nonzero().max()) + 1
        out = {"words": self.words[idx, :L].float(), "mask": m[:, :L]}
        if self.shuf_words is not None:
            out["shuf_words"] = self.shuf_words[idx, :L].float()
            out["shuf_changed"] = self.shuf_changed[idx]
        return out


def load_text_set(folder: Path, split: str, shuffled: bool, dtype=torch.float32) -> TextSet:
    """A ``TextSet`` from the caches of ``split`` in ``folder`` (the shuffled one too)."""
    from acf_fast.data.encode import cache_path, load_encoded, load_shuffled

    words, mask = load_encoded(folder, split, dtype=dtype)
    if not shuffled:
        return TextSet(words, mask)
    swords, smask, changed = load_shuffled(folder, split, dtype=dtype)
    if not torch.equal(smask, mask):
        raise ValueError(f"{cache_path(folder, split, True)}: its mask differs from {cache_path(folder, split)}'s "
                         "(encoded with another max_length?); delete it to re-encode")
    return TextSet(words, mask, swords, changed)


def ensure_encoded(folder: Path, split: str, texts: Sequence[str], encoder_getter: Callable, *,
                   encoder_name: Optional[str], max_length: int, shuffled: bool, progress: bool,
                   generated: bool = True) -> None:
    """Encode ``texts`` as pseudo-split ``split`` of ``folder`` (``generated``: its
    ``_caps.txt`` written here, and encoded; else a real split whose own cache exists),
    and their shuffles when ``shuffled``, unless the caches already hold them encoded by
    ``encoder_name`` (then the encoder is not even loaded)."""
    from acf_fast.data import encode_split
    from acf_fast.data.encode import cache_is_fresh

    caps = folder / f"{split}_caps.txt"
    if generated and (not caps.is_file() or caps.read_text(encoding="utf-8") != "".join(t + "\n" for t in texts)):
        atomic_write_lines(caps, texts)
    for seed in ((None,) if generated else ()) + ((SHUFFLE_SEED,) if shuffled else ()):
        if not cache_is_fresh(folder, split, texts, encoder_name, max_length, shuffle_seed=seed):
            encode_split(folder, split, encoder_getter(), max_length=max_length, dtype=torch.float16,
                         progress=progress, shuffle_seed=seed)


def gather(choices: List[Tuple[TextSet, int]]) -> dict:
    """Per sample b one row of one set -> the ``TextSet.rows`` dict of the batch (B rows,
    padded to the longest)."""
    groups = {}
    for b, (ts, r) in enumerate(choices):
        groups.setdefault(id(ts), (ts, [], []))
        groups[id(ts)][1].append(b)
        groups[id(ts)][2].append(r)
    parts = [(torch.tensor(bs), ts.rows(torch.tensor(rs))) for ts, bs, rs in groups.values()]
    B, L = len(choices), max(p["mask"].shape[1] for _, p in parts)
    out = {}
    for bs, p in parts:
        for k, v in p.items():
            if k not in out:
                shape = (B, L) + tuple(v.shape[2:]) if v.dim() >= 2 else (B,)
                out[k] = torch.zeros(shape, dtype=v.dtype)
            if v.dim() >= 2:
                out[k][bs, : v.shape[1]] = v
            else:
                out[k][bs] = v
    return out


def _pad_ids(ids_list, pad_id: int):
    L = max(len(x) for x in ids_list)
    ids = torch.full((len(ids_list), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids_list), L, dtype=torch.bool)
    for r, x in enumerate(ids_list):
        ids[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[r, : len(x)] = True
    return ids, mask


class TrainData:
    """The training split, its text features (frozen) or captions (fine-tuned), positives."""

    def __init__(self, cfg: TrainConfig, encoder_getter, log):
        from acf_fast.data import encode_split, load_split
        from acf_fast.data.encode import cache_path, read_cache_metadata

        self.cfg = cfg
        self.split = load_split(cfg.data, cfg.train_split)
        t2i = np.asarray(self.split.txt2img, dtype=np.int64)
        self.txt2img = t2i
        n_img = self.split.regions.shape[0]
        keep = n_img if cfg.train_images is None else min(cfg.train_images, n_img)
        self.captions_idx = np.flatnonzero(t2i < keep)
        if len(self.captions_idx) < cfg.batch_size:
            raise ValueError(f"the training split has {len(self.captions_idx)} captions, fewer than batch_size={cfg.batch_size}")
        self.shuffle = uses_shuffle(cfg.negatives) and cfg.loss != "triplet"
        self.use_positives = cfg.positives is not None and cfg.loss != "triplet"
        self.kinds = () if not self.use_positives else ("long", "short") if cfg.positives == "both" else (cfg.positives,)
        self.long_pairs = LongPairs.build(t2i) if "long" in self.kinds else None
        self.encoder = None
        if cfg.finetune:
            self.encoder = encoder_getter()
            return
        folder = Path(cfg.data)
        if not cache_path(folder, cfg.train_split).is_file():
            encode_split(folder, cfg.train_split, encoder_getter(), max_length=cfg.max_length)
        meta = read_cache_metadata(cache_path(folder, cfg.train_split)) or {}
        encoder_name = meta.get("encoder")
        common = dict(encoder_name=encoder_name, shuffled=self.shuffle, progress=cfg.progress)
        # The captions' shuffles keep the captions' own max_length, so the masks match.
        ensure_encoded(folder, cfg.train_split, self.split.captions, encoder_getter, generated=False,
                       max_length=int(meta.get("max_length", cfg.max_length)), **common)
        self.texts = load_text_set(folder, cfg.train_split, self.shuffle)
        self.pos = {}
        for kind in self.kinds:
            if kind == "long":
                texts = self.long_pairs.texts(self.split.captions)
            else:
                texts = [short_positive(c) for c in self.split.captions]
            name = f"{cfg.train_split}_{kind}"
            log(f"positives ({kind}): {len(texts)} texts" + (" and their shuffles" if self.shuffle else "")
                + f", cached as {folder / 'positives' / name}")
            # A long positive holds two captions: give it room for both.
            mlen = 2 * cfg.max_length if kind == "long" else cfg.max_length
            ensure_encoded(folder / "positives", name, texts, encoder_getter, max_length=mlen, **common)
            self.pos[kind] = load_text_set(folder / "positives", name, self.shuffle, dtype=torch.float16)

    @property
    def text_dim(self) -> int:
        return self.encoder.dim if self.encoder is not None else self.texts.dim

    def __len__(self) -> int:
        return len(self.captions_idx)

    def _draw_positives(self, caps: np.ndarray, gen: torch.Generator):
        """Per sample: its kind ("long" / "short") and, for long, the pair row drawn now
        (the partner caption is redrawn at every access)."""
        B = len(caps)
        if self.cfg.positives == "both":
            kinds = ["long" if c else "short" for c in (torch.rand(B, generator=gen) < 0.5).tolist()]
        else:
            kinds = [self.cfg.positives] * B
        pair_rows = self.long_pairs.draw(caps, gen) if self.long_pairs is not None else None
        return kinds, pair_rows

    def batch(self, positions, gen: torch.Generator, device) -> dict:
        """positions: indices into the training captions -> a batch dict for ``Objective``."""
        caps = self.captions_idx[np.asarray(positions)]
        imgs = self.txt2img[caps]
        regions, rmask, glob = image_tensors(self.split, imgs, device)
        # two captions of one image in a batch are not each other's negatives (loss.same_image_mask)
        out = {"regions": regions, "region_mask": rmask, "globals": glob, "image_ids": torch.from_numpy(imgs)}
        if self.encoder is None:
            out.update(self.texts.rows(torch.from_numpy(caps)))
            if self.use_positives:
                kinds, pair_rows = self._draw_positives(caps, gen)
                choice = [(self.pos[k], int(pair_rows[b]) if k == "long" else int(c))
                          for b, (k, c) in enumerate(zip(kinds, caps))]
                out.update({f"pos_{k}": v for k, v in gather(choice).items()})
        else:
            captions = [self.split.captions[c] for c in caps]
            out.update(self._token_batch("", self.encoder.tokenize(captions, self.cfg.max_length), gen))
            if self.use_positives:
                kinds, pair_rows = self._draw_positives(caps, gen)
                texts = [long_positive(*(self.split.captions[t] for t in self.long_pairs.pairs[pair_rows[b]]))
                         if k == "long" else short_positive(captions[b]) for b, k in enumerate(kinds)]
                out.update(self._token_batch("pos_", self.encoder.tokenize(texts, 2 * self.cfg.max_length), gen))
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}

    def _token_batch(self, key: str, tok: List[List[int]], gen: torch.Generator) -> dict:
        """Padded ids and mask of tokenised texts, and their per-access shuffles when needed."""
        from acf_fast.text_encoder import shuffle_wordpieces

        pad = self.encoder.tokenizer.pad_token_id or 0
        ids, mask = _pad_ids(tok, pad)
        out = {f"{key}input_ids": ids, f"{key}mask": mask}
        if self.shuffle:
            shuf, changed = zip(*(shuffle_wordpieces(x, gen) for x in tok))
            out[f"{key}shuf_input_ids"] = _pad_ids(shuf, pad)[0]
            out[f"{key}shuf_changed"] = torch.tensor(changed, dtype=torch.bool)
        return out
