"""One training step's forward: the four text variants, one fused score call, the loss.

``Objective`` is an ``nn.Module`` whose ``forward`` does the whole step, so DDP
wraps it and synchronises every gradient (the ACF weights and, when fine-tuned,
the text encoder's).

Per batch of B pairs (I_b, T_b) the texts are, in this order,
    T (captions), T⁻ (negatives of T), T⁺ (positives), T̃⁻ (negatives of T⁺),
the ones switched off left out. Negatives act on the projected word features
P = Hb Wt + bt (cached features) or on BERT's input embeddings (in the loop), see
``negatives``. A text and its negative are padded to one length, concatenated,
finished into W (``ACF.finish_texts``) and scored against the B images with one
``acf_similarity`` call (``model.score``); so are the positive and its negative.
S (B, nB) is then cut into the B×B blocks Sa, Sn, Sp, Spn.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .loss import acf_contrastive_loss, triplet_loss
from .negatives import make_negatives, perturbable_mask

LOSSES = ("contrastive", "triplet")


def pad_cat(parts: List[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (x (B_i, L_i, D), mask (B_i, L_i)) along the batch, zero-padding to max L."""
    L = max(x.shape[1] for x, _ in parts)
    xs, ms = [], []
    for x, m in parts:
        pad = L - x.shape[1]
        xs.append(nn.functional.pad(x, (0, 0, 0, pad)) if pad else x)
        ms.append(nn.functional.pad(m, (0, pad), value=False) if pad else m)
    return torch.cat(xs), torch.cat(ms)


class Objective(nn.Module):
    """Spec §6 objective around an ACF model.

    Args:
        model: ``acf_fast.model.ACF`` (or anything with encode_images,
            encode_texts and score of that contract).
        loss: "contrastive" (spec §6) or "triplet" (VSE++ max violation, margin;
            scored on Sa only, no generated texts are built for it).
        negatives: a kind of ``negatives.NEGATIVE_KINDS`` or None (w/o negatives).
        positives: True to use the positives given in each batch.
        encoder: the ``TextEncoder`` when it is fine-tuned in the loop (negatives
            then act on its input embeddings); None for cached frozen features.
    """

    def __init__(self, model: nn.Module, *, loss: str = "contrastive", negatives: Optional[str] = "mixture",
                 positives: bool = True, tau: float = 0.05, lam: float = 0.5, margin: float = 0.2,
                 backend: str = "auto", encoder=None):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.model = model
        self.loss_name = loss
        self.negatives = None if loss == "triplet" else negatives
        self.positives = positives and loss != "triplet"
        self.tau, self.lam, self.margin = tau, lam, margin
        self.backend = backend
        self.encoder = encoder
        # Registered so DDP and the optimiser see the fine-tuned encoder's weights.
        self.text_model = encoder.model if encoder is not None else None

    def _texts(self, batch: dict, key: str, gen: torch.Generator, noised: bool):
        """Projected features P (B, L, D) and mask of one text set, and when ``noised``
        its negatives (P⁻, mask, changed (B,) bool).

        Batch keys (``key`` = "" for captions, "pos_" for positives): cached
        ``{key}words`` (B, L, Db) + ``{key}mask``, or in the loop ``{key}input_ids`` +
        ``{key}mask``; for shuffle negatives also ``{key}shuf_words`` (cached encodings
        of the shuffled texts) or ``{key}shuf_input_ids``, with ``{key}shuf_changed``."""
        mask = batch[f"{key}mask"]
        shuf_changed = batch.get(f"{key}shuf_changed")
        if self.encoder is None:
            P = self.model.project_texts(batch[f"{key}words"])
            if not noised:
                return (P, mask), None
            shuf = batch.get(f"{key}shuf_words")
            shuf = None if shuf is None else self.model.project_texts(shuf)
            neg, changed = make_negatives(P, mask, self.negatives, gen, shuffled=shuf, shuffled_changed=shuf_changed)
            return (P, mask), (neg, mask, changed)
        emb = self.encoder.input_embeddings(batch[f"{key}input_ids"])
        P = self.model.project_texts(self.encoder.from_embeds(emb, mask))
        if not noised:
            return (P, mask), None
        shuf = batch.get(f"{key}shuf_input_ids")
        shuf = None if shuf is None else self.encoder.input_embeddings(shuf)
        neg_emb, changed = make_negatives(emb, mask, self.negatives, gen, perturbable_mask(mask), shuffled=shuf,
                                          shuffled_changed=shuf_changed)
        return (P, mask), (self.model.project_texts(self.encoder.from_embeds(neg_emb, mask)), mask, changed)

    def forward(self, batch: Dict[str, torch.Tensor], gen: torch.Generator):
        """batch: regions (B, K, Dv), region_mask (B, K)|None, globals (B, Dg)|None, image_ids
        (B,) long|None (the image of each pair), and
        either words/mask (+ pos_words/pos_mask) cached features or input_ids/mask
        (+ pos_input_ids/pos_mask) token ids, plus the shuffled texts shuffle negatives
        need (see ``_texts``). Returns (loss scalar float32, blocks dict)."""
        V, G = self.model.encode_images(batch["regions"], batch.get("region_mask"), batch.get("globals"))
        noised = self.negatives is not None
        # Texts are scored in groups of one source (T with T⁻, T⁺ with T̃⁻): a group
        # pads to its own length, and the pair cost grows with L², so long positives
        # do not inflate the captions' blocks.
        groups, names, valid = [], [], {}
        for key, clean_name, neg_name in (("", "Sa", "Sn"), ("pos_", "Sp", "Spn")):
            if key and not self.positives:
                continue
            clean, neg = self._texts(batch, key, gen, noised)
            groups.append([clean] + ([neg[:2]] if neg is not None else []))
            names += [clean_name] + ([neg_name] if neg is not None else [])
            if neg is not None:
                valid[neg_name] = neg[2]
        cols = []
        for texts in groups:
            P, wmask = pad_cat(texts)
            W = self.model.finish_texts(P, wmask)
            cols.append(self.model.score(V, batch.get("region_mask"), G, W, wmask, backend=self.backend).float())
        S = torch.cat(cols, dim=1)
        B = V.shape[0]
        blocks = {n: S[:, i * B:(i + 1) * B] for i, n in enumerate(names)}
        ids = batch.get("image_ids")  # two captions of one image are not each other's negatives
        if self.loss_name == "triplet":
            loss = triplet_loss(blocks["Sa"], self.margin, image_ids=ids)
        else:
            loss = acf_contrastive_loss(blocks["Sa"], blocks.get("Sn"), blocks.get("Sp"), blocks.get("Spn"),
                                        tau=self.tau, lam=self.lam, image_ids=ids, Sn_valid=valid.get("Sn"),
                                        Spn_valid=valid.get("Spn"))
        return loss, blocks
