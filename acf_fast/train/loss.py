"""Training objectives: the asymmetry-sensitive contrastive loss of spec §6 and the
VSE++ max-violation triplet loss (the ablation).

Score blocks are (B, B) float tensors from ``acf_similarity``: row = image, column
= text, the matched pair on the diagonal.

    L_I(b)  = -log softmax_tau over images {Sa[b,b]} ∪ {Sa[n,b]: n≠b}
              -log softmax_tau over texts  {Sa[b,b]} ∪ {Sa[b,n]: n≠b} ∪ {α_bn·Sn[b,n]}
    L_II(b) = the same with Sp for Sa and Spn for Sn
    L       = mean_b [λ L_I(b) + (1-λ) L_II(b)]

α_bn = 0 where Sn[b,n] > Sa[b,b], else 1, decided on detached scores (no
gradient through α); α multiplies the exp term (spec §6), so a dropped negative is
simply absent from the denominator. [departure from the authors' code, documented]
The authors' code zeroes the SCORE instead, which leaves exp(0 / τ) = 1 in the
denominator for every dropped negative; we follow the paper and the spec. n runs
over the whole batch for Sn (n = b is the noised own caption, the hard negative
Asymmetry-I is about). [choice] A negative that could not be perturbed (``Sn_valid``
False: e.g. a shuffle of a text with one inner wordpiece) is the caption itself, not
a negative: its column gets α = 0 too, rather than leaving it to rounding whether
Sn[b,b] ties Sa[b,b] (which would put a log 2 floor on that sample).
Eq. 17's S(T̂ₙ⁺, T⁺) is read as S(Îₙ, T⁺) [spec choice]: the image side of L_II
uses the column of Sp.

With any number of captions per image a batch may hold two captions of one image
(their rows then hold the same image). ``image_ids`` (B,) names each pair's image;
entries (b, n), n ≠ b, of one image are left out of Sa and Sp on both sides (a
sibling caption is not a negative, nor is the image's own copy). Sn and Spn keep
every n: a noised text is a negative whoever it came from, as for n = b.
"""
from __future__ import annotations

from typing import Optional

import torch

DEFAULT_TAU = 0.05  # COCO (F30K: 0.01)
DEFAULT_LAMBDA = 0.5
DEFAULT_MARGIN = 0.2


def _compute(S):
    # float64 stays float64 so tests can compare against a float64 loop exactly.
    return S if S.dtype == torch.float64 else S.float()


def _check_block(name, S, B=None):
    if not isinstance(S, torch.Tensor) or S.dim() != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"{name} must be a square (B, B) tensor, got {getattr(S, 'shape', type(S).__name__)}")
    if B is not None and S.shape[0] != B:
        raise ValueError(f"{name} is {tuple(S.shape)} but Sa is ({B}, {B}); all blocks share the batch")


def same_image_mask(image_ids: Optional[torch.Tensor], B: int, device) -> Optional[torch.Tensor]:
    """(B, B) bool, True at (b, n), n ≠ b, where pairs b and n share an image; None
    when ``image_ids`` is None or every image differs."""
    if image_ids is None:
        return None
    if not isinstance(image_ids, torch.Tensor) or image_ids.shape != (B,) or image_ids.dtype.is_floating_point:
        raise ValueError(f"image_ids must be a ({B},) integer tensor, got "
                         f"{getattr(image_ids, 'dtype', type(image_ids).__name__)} {tuple(getattr(image_ids, 'shape', ()))}")
    ids = image_ids.to(device)
    same = ids[:, None].eq(ids[None, :]).fill_diagonal_(False)
    return same if bool(same.any()) else None


def contrastive_term(Sa: torch.Tensor, Sn: Optional[torch.Tensor], tau: float,
                     same: Optional[torch.Tensor] = None, Sn_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample L_I (or L_II given Sp, Spn): (B,) float32 (float64 for float64 input).
    ``same`` (B, B) bool: entries left out of Sa (see :func:`same_image_mask`).
    Sn_valid (B,) bool or None: False drops column n of Sn (its text was not perturbed)."""
    Sa = _compute(Sa) / tau
    diag = Sa.diagonal()
    if same is not None:
        Sa = Sa.masked_fill(same, float("-inf"))
    img_side = torch.logsumexp(Sa, dim=0) - diag  # images compete for text b (column b)
    row = Sa
    if Sn is not None:
        Sn = _compute(Sn) / tau
        keep = Sn.detach() <= diag.detach()[:, None]  # α_bn = 1
        if Sn_valid is not None:
            keep = keep & Sn_valid.to(device=keep.device, dtype=torch.bool)[None, :]
        row = torch.cat([Sa, Sn.masked_fill(~keep, float("-inf"))], dim=1)
    txt_side = torch.logsumexp(row, dim=1) - diag  # texts (and negatives) compete for image b
    return img_side + txt_side


def acf_contrastive_loss(Sa: torch.Tensor, Sn: Optional[torch.Tensor] = None, Sp: Optional[torch.Tensor] = None,
                         Spn: Optional[torch.Tensor] = None, *, tau: float = DEFAULT_TAU,
                         lam: float = DEFAULT_LAMBDA, image_ids: Optional[torch.Tensor] = None,
                         Sn_valid: Optional[torch.Tensor] = None,
                         Spn_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Spec §6 loss, a float32 scalar (float64 for float64 blocks).

    Args:
        Sa: (B, B) S(I, T).   Sn: (B, B) S(I, T⁻) or None (w/o negatives).
        Sp: (B, B) S(I, T⁺) or None (w/o positives: L = mean_b L_I(b), λ unused).
        Spn: (B, B) S(I, T̃⁻) or None (needs Sp; None with Sp given = w/o negatives).
        tau: softmax temperature (> 0). lam: weight λ of L_I in [0, 1].
        image_ids: (B,) integer image of each pair, or None (all distinct).
        Sn_valid, Spn_valid: (B,) bool or None (all valid): False where text n's
            negative is the text itself (nothing could be perturbed); α_bn = 0 there.
    """
    _check_block("Sa", Sa)
    B = Sa.shape[0]
    for name, S in (("Sn", Sn), ("Sp", Sp), ("Spn", Spn)):
        if S is not None:
            _check_block(name, S, B)
    for name, v in (("Sn_valid", Sn_valid), ("Spn_valid", Spn_valid)):
        if v is not None and (not isinstance(v, torch.Tensor) or tuple(v.shape) != (B,)):
            raise ValueError(f"{name} must be a (B,) = ({B},) bool tensor, got {getattr(v, 'shape', type(v).__name__)}")
    if Spn is not None and Sp is None:
        raise ValueError("Spn (noised positives) given without Sp (positives)")
    if (Sn is None) != (Spn is None) and Sp is not None:
        raise ValueError("give Sn and Spn together (negatives on both the text and its positive) or neither")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    same = same_image_mask(image_ids, B, Sa.device)
    l1 = contrastive_term(Sa, Sn, tau, same, Sn_valid)
    if Sp is None:
        return l1.mean()
    l2 = contrastive_term(Sp, Spn, tau, same, Spn_valid)
    return (lam * l1 + (1.0 - lam) * l2).mean()


def triplet_loss(S: torch.Tensor, margin: float = DEFAULT_MARGIN,
                 image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """VSE++ max-violation triplet loss on S (B, B), float32 scalar.

    For each matched pair, the hardest negative text (row) and the hardest negative
    image (column) each add max(0, margin + S_neg - S_pos). Averaged over the batch
    [choice] (VSE++ sums): the same per-sample scale as the contrastive loss in the
    logs. Not a neutral choice: Adam alone would be invariant to the constant factor
    B, but the gradient clip (2.0) comes first, and a B-times larger summed gradient
    is clipped on more steps, so sum and mean train differently. ``image_ids`` (B,):
    pairs of one image are not each other's negatives."""
    _check_block("S", S)
    S = _compute(S)
    diag = S.diagonal()
    eye = torch.eye(S.shape[0], dtype=torch.bool, device=S.device)
    same = same_image_mask(image_ids, S.shape[0], S.device)
    if same is not None:
        eye = eye | same
    cost_txt = (margin + S - diag[:, None]).clamp(min=0).masked_fill(eye, 0.0)  # image b vs text n
    cost_img = (margin + S - diag[None, :]).clamp(min=0).masked_fill(eye, 0.0)  # text b vs image n
    return (cost_txt.max(dim=1).values + cost_img.max(dim=0).values).mean()
