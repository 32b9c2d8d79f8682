"""One training step's forward: the four text variants, one fused score call, the loss.

``Objective`` is an ``nn.Module`` whose ``forward`` does the whole step, so DDP
wraps it and synchronises every gradient (the ACF weights and, when fine-tuned,
the text encoder's).

Per batch of B pairs (I_b, T_b) the texts are, in this order,
    T (captions), T⁻ (negatives of T), T⁺ (positives), T̃⁻ (negatives of T⁺),
the ones switched off left out. A text and its negative are padded to one length,
concatenated and scored against the B images with one ``acf_similarity`` call
(``model.score``); so are the positive and its negative. S (B, nB) is then cut
into the B×B blocks Sa, Sn, Sp, Spn.
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
        """Clean and optionally noised encoder features (x (B, L, Db), mask) for one text set."""
        if self.encoder is None:
            x, mask = batch[f"{key}words"], batch[f"{key}mask"]
            if not noised:
                return (x, mask), None
            neg = make_negatives(x, mask, self.negatives, gen)
            # A token row zeroed in the CACHED features (token cutoff) is taken out of
            # the mask: its W row would be l2norm(bias) of a near-zero bias, whose
            # gradient is ~1/‖bias‖ (1e8 at init) and would swamp the clipped step.
            # Encoder outputs are never exactly zero, so only cut tokens are removed.
            return (x, mask), (neg, mask & neg.ne(0).any(-1))
        ids, mask = batch[f"{key}input_ids"], batch[f"{key}mask"]
        emb = self.encoder.input_embeddings(ids)
        clean = self.encoder.from_embeds(emb, mask)
        if not noised:
            return (clean, mask), None
        neg = self.encoder.from_embeds(make_negatives(emb, mask, self.negatives, gen, perturbable_mask(mask)), mask)
        return (clean, mask), (neg, mask)

    def forward(self, batch: Dict[str, torch.Tensor], gen: torch.Generator):
        """batch: regions (B, K, Dv), region_mask (B, K)|None, globals (B, Dg)|None, image_ids
        (B,) long|None (the image of each pair), and
        either words/mask (+ pos_words/pos_mask) cached features or input_ids/mask
        (+ pos_input_ids/pos_mask) token ids. Returns (loss scalar float32, blocks dict)."""
        V, G = self.model.encode_images(batch["regions"], batch.get("region_mask"), batch.get("globals"))
        noised = self.negatives is not None
        # Texts are scored in groups of one source (T with T⁻, T⁺ with T̃⁻): a group
        # pads to its own length, and the pair cost grows with L², so long positives
        # do not inflate the captions' blocks.
        groups, names = [], []
        clean, neg = self._texts(batch, "", gen, noised)
        groups.append([clean] + ([neg] if neg is not None else []))
        names += ["Sa"] + (["Sn"] if neg is not None else [])
        if self.positives:
            pclean, pneg = self._texts(batch, "pos_", gen, noised)
            groups.append([pclean] + ([pneg] if pneg is not None else []))
            names += ["Sp"] + (["Spn"] if pneg is not None else [])
        cols = []
        for texts in groups:
            words, wmask = pad_cat(texts)
            W = self.model.encode_texts(words, wmask)
            cols.append(self.model.score(V, batch.get("region_mask"), G, W, wmask, backend=self.backend).float())
        S = torch.cat(cols, dim=1)
        B = V.shape[0]
        blocks = {n: S[:, i * B:(i + 1) * B] for i, n in enumerate(names)}
        ids = batch.get("image_ids")  # two captions of one image are not each other's negatives
        if self.loss_name == "triplet":
            loss = triplet_loss(blocks["Sa"], self.margin, image_ids=ids)
        else:
            loss = acf_contrastive_loss(blocks["Sa"], blocks.get("Sn"), blocks.get("Sp"), blocks.get("Spn"),
                                        tau=self.tau, lam=self.lam, image_ids=ids)
        return loss, blocks
