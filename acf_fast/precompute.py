"""Per-item precompute of spec §8: everything that depends on ONE image or ONE text.

Both the ``torch`` backend (``acf_fast/fused_torch.py``) and the Triton kernels
(``kernels/similarity.py``) call :func:`precompute_items` once per image and once
per text, then touch only these tensors per pair, so no per-pair work ever meets a
D×D matrix.

The algebra (X = V for images, W for texts; T = K or L rows; d = D / H; head h uses
columns [h·d, (h+1)·d) of z_x, z_y and rows [h·d, (h+1)·d) of z_o):

    Q_h  = X z_x[:, h]                       (T, d)   queries of this item
    Kk_h = X z_y[:, h]                       (T, d)   keys (= values) of this item
    O_h  = (X z_oᵀ)[:, h]                    (T, d)   so that x_t·(A K z_o) = Σ_h A_h (O_h[t]·Kk_h)
    P_h  = Kk_h z_o[h rows, :]               (T, D)   head h's values already through z_o
    Γ    = P_blk P_blkᵀ                      (HT, HT) P_blk = P_h stacked over heads

For a pair (image i, text j), region-attended text w*_k = Σ_h A_h[k, :] P^w_h, so
v_k·w*_k = Σ_h Σ_l A_h[k, l] (O^v_h[k]·Kk^w_h[l]) and ‖w*_k‖² = a_k Γw a_kᵀ with a_k the
HL-vector of attention weights; words -> regions is the mirror image.

Absent projections are identities and cost nothing: with z_x absent ``Q`` is a view
of X, with z_y absent ``Kk`` is (and ``Q is Kk`` when both are absent), with z_o
absent ``O`` is the same tensor object as ``Q`` when z_x is also absent (so the
numerator is the logits / s) and Γ is block-diagonal: H blocks Kk_h Kk_hᵀ (T×T),
stored as (n, H, T, T) with ``block_diagonal=True``. No identity matmul is ever run.

Pairwise global score (paper eqs. 7–12, 14), with ā_h the mean over valid regions of
A_h (an L-vector) and b̄_h the mean over valid words of B_h (a K-vector):

    W_g = (mean_k w*_k) x_w                      = āᵀ (P^w_blk x_w)            -> text ``Pglob``
    V_g = σ(gate) ⊙ (mean_l v*_l) x_v + (1−σ) ⊙ (G x_g)
        = b̄ᵀ (σ ⊙ (P^v_blk x_v)) + (1−σ) ⊙ (G x_g)                             -> image ``Pglob``, ``gx``
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Mapping, Optional

import torch

__all__ = ["ItemSide", "precompute_items", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (so gradient tests can compare); every other dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class ItemSide:
    """Per-item tensors of n images (role "image", T = K) or n texts (role "text", T = L).

    All tensors live on X's device, in ``dtype`` (float32, or float64 for float64
    input; the ``dtype=`` argument of :func:`precompute_items` may ask for float16 /
    bfloat16 storage, computed in float32 first then cast once). Shapes, H = heads,
    d = D / H:

    - ``mask``  (n, T) bool: True at valid rows (all True if no mask was given).
    - ``Q``     (n, H, T, d): queries  X z_x, split by heads.
    - ``Kk``    (n, H, T, d): keys = values X z_y, split by heads (``Kk is Q`` if z_x and z_y are absent).
    - ``O``     (n, H, T, d): (X z_oᵀ) split by heads; the numerator of the cosine is
      Σ_h Σ_t' A_h[t, t'] (O_h[t]·Kk'_h[t']) with the partner's keys. ``O is Q`` when z_o
      and z_x are absent (the numerator is then the logits divided by the scale).
    - ``norm``  (n, T): ‖x_t‖, the Euclidean norm of each row of X (compute dtype).
    - ``gram``  (n, H*T, H*T) = P_blk P_blkᵀ; or, when ``block_diagonal`` (z_o absent),
      (n, H, T, T) holding the H diagonal blocks Kk_h Kk_hᵀ (the rest is zero).
      Row/column index of the full form is h*T + t.
    - ``Pglob`` (n, H*T, D) or None: only with the pairwise global score. Text:
      P_blk x_w; image: σ(gate) ⊙ (P_blk x_v). Row index h*T + t.
    - ``gx``    (n, D) or None: images with the pairwise global score only:
      (1 − σ(gate)) ⊙ (G x_g).
    - ``block_diagonal``: z_o absent (gram is (n, H, T, T)).
    - ``identity_proj``: z_x, z_y and z_o all absent (the acf-code variant).
    - ``shared_qk``: z_x and z_y absent, so ``Q is Kk`` and the logits of the two
      directions are transposes of one product X_v,h X_w,hᵀ.
    - ``o_is_q``: z_x and z_o absent, so ``O is Q`` and the numerator is logits / s.
    - ``heads``, ``role``.

    Layout: ``Q``, ``Kk`` and ``O`` are stored head-major (their memory is a contiguous
    (H, n, T, d); the (n, H, T, d) tensors are transposed views), so they are NOT
    contiguous: read them through their strides or call ``.contiguous()``. The other
    tensors are contiguous.
    """

    mask: torch.Tensor
    Q: torch.Tensor
    Kk: torch.Tensor
    O: torch.Tensor
    norm: torch.Tensor
    gram: torch.Tensor
    Pglob: Optional[torch.Tensor]
    gx: Optional[torch.Tensor]
    block_diagonal: bool
    identity_proj: bool
    shared_qk: bool
    o_is_q: bool
    heads: int
    role: str

    @property
    def n(self) -> int:
        return self.Q.shape[0]

    @property
    def T(self) -> int:
        return self.Q.shape[2]

    def select(self, index) -> "ItemSide":
        """The same items restricted along dim 0 (``index`` a slice or an index tensor).

        Keeps the identities ``Q is Kk`` / ``O is Q`` where they hold.
        """
        out = {}
        gather = isinstance(index, torch.Tensor)
        for f in fields(self):
            val = getattr(self, f.name)
            if not isinstance(val, torch.Tensor):
                out[f.name] = val
            elif not gather:
                out[f.name] = val[index]
            elif f.name in ("Q", "Kk", "O"):
                # Gathered along the items of the head-major storage, so the result is head-major
                # too (its per-pair GEMM operands stay free views); index_select, not v[index]:
                # several times faster on a CPU (measured: 0.6 vs 7 us per text at L = 14, D = 128).
                out[f.name] = torch.index_select(val.transpose(0, 1), 1, index).transpose(0, 1)
            else:
                out[f.name] = torch.index_select(val, 0, index)
        if self.shared_qk:
            out["Kk"] = out["Q"]
        if self.o_is_q:
            out["O"] = out["Q"]
        return replace(self, **out)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(n, T, D) -> (n, H, T, d), stored head-major: the memory is a contiguous (H, n, T, d),
    so ``.transpose(0, 1).reshape(H, n*T, d)`` (the per-pair GEMM operand) is a free view,
    also after slicing items along dim 0. One copy per item, instead of one per pair chunk."""
    n, T, D = x.shape
    return x.view(n, T, heads, D // heads).permute(2, 0, 1, 3).contiguous().transpose(0, 1)


def precompute_items(
    X: torch.Tensor,
    mask: Optional[torch.Tensor],
    weights: Optional[Mapping[str, torch.Tensor]],
    heads: int,
    *,
    role: str,
    G: Optional[torch.Tensor] = None,
    pairwise_global: Optional[bool] = None,
    dtype: Optional[torch.dtype] = None,
) -> ItemSide:
    """Spec §8 per-item tensors for n images or n texts (see :class:`ItemSide`).

    Args:
        X: (n, T, D) features (V for images, W for texts), any float dtype; already validated.
        mask: (n, T) bool or None (all rows valid). Rows where it is False are zeroed
            before anything else (so ``norm`` is 0 there and they get zero gradient).
        weights: mapping with any of z_x z_y z_o x_w x_v x_g (D, D) and gate (D,);
            a missing matrix is the identity, a missing gate is 0 (σ = 0.5).
        heads: H; D % H == 0.
        role: "image" or "text" (decides which global weights apply).
        G: (n, D) global image features (images only). Giving G turns the pairwise
            global score on for images.
        pairwise_global: build ``Pglob`` (and ``gx`` for images). Default: ``G is not
            None`` for images, False for texts — pass True for texts when the
            similarity uses the pairwise global score (G given on the image side).
        dtype: storage dtype of the float outputs; default float32 (float64 for
            float64 X). Arithmetic is always float32/float64, cast once at the end.

    Returns:
        ItemSide. Differentiable in X, G and every weight by plain autograd.
    """
    if role not in ("image", "text"):
        raise ValueError(f"role must be 'image' or 'text', got {role!r}")
    if pairwise_global is None:
        pairwise_global = role == "image" and G is not None
    if role == "image" and pairwise_global and G is None:
        raise ValueError("G is required for images when pairwise_global=True")
    if role == "text" and G is not None:
        raise ValueError("G is an image-side input; pass it with role='image'")
    cdt = compute_dtype(X.dtype)
    n, T, D = X.shape
    H = heads
    d = D // H
    X = X.to(cdt)
    if mask is not None:
        # Padding never contributes to S; zeroing it keeps padding of any size from
        # overflowing a logit to inf (inf − inf = NaN under the −inf mask).
        X = torch.where(mask[:, :, None], X, torch.zeros((), dtype=cdt, device=X.device))
    w = {k: v.to(cdt) for k, v in (weights or {}).items() if v is not None}
    z_x, z_y, z_o = w.get("z_x"), w.get("z_y"), w.get("z_o")

    flat = X.reshape(n * T, D)
    Xh = _split_heads(X, H) if z_x is None or z_y is None or z_o is None else None
    Q = Xh if z_x is None else _split_heads((flat @ z_x).view(n, T, D), H)
    Kk = Xh if z_y is None else _split_heads((flat @ z_y).view(n, T, D), H)
    if z_x is None and z_y is None:
        Kk = Q
    if z_o is None:
        O = Q if z_x is None else Xh
    else:
        O = _split_heads((flat @ z_o.T).view(n, T, D), H)
    norm = X.norm(dim=-1)

    block_diagonal = z_o is None
    if block_diagonal:
        gram = Kk @ Kk.transpose(-1, -2)  # (n, H, T, T)
        P = None
    else:
        # P_h = Kk_h z_o[h rows]: one batched product over heads, (n, H, T, d) x (H, d, D).
        P = torch.einsum("nhtd,hde->nhte", Kk, z_o.view(H, d, D)).reshape(n, H * T, D)
        gram = P @ P.transpose(-1, -2)  # (n, HT, HT)

    Pglob = gx = None
    if pairwise_global:
        x_out = w.get("x_w") if role == "text" else w.get("x_v")
        if P is not None:
            Pglob = P if x_out is None else P @ x_out
        elif x_out is not None:
            # P_blk has Kk_h in head h's columns only, so P_blk x = Kk_h x[h rows].
            Pglob = torch.einsum("nhtd,hde->nhte", Kk, x_out.view(H, d, D)).reshape(n, H * T, D)
        else:
            # z_o and the output matrix both absent: P_blk itself (zero outside head blocks).
            Pglob = _block_rows(Kk)
        if role == "image":
            gate = w.get("gate")
            sig = torch.full((D,), 0.5, dtype=cdt, device=X.device) if gate is None else torch.sigmoid(gate)
            Pglob = Pglob * sig
            Gc = G.to(cdt)
            x_g = w.get("x_g")
            gx = (1 - sig) * (Gc if x_g is None else Gc @ x_g)

    if mask is None:
        mask = torch.ones(n, T, dtype=torch.bool, device=X.device)

    side = ItemSide(
        mask=mask,
        Q=Q,
        Kk=Kk,
        O=O,
        norm=norm,
        gram=gram,
        Pglob=Pglob,
        gx=gx,
        block_diagonal=block_diagonal,
        identity_proj=z_x is None and z_y is None and z_o is None,
        shared_qk=z_x is None and z_y is None,
        o_is_q=z_x is None and z_o is None,
        heads=H,
        role=role,
    )
    if dtype is not None and dtype != cdt:
        side = _cast(side, dtype)
    return side


def _block_rows(Kk: torch.Tensor) -> torch.Tensor:
    """(n, H, T, d) -> P_blk (n, H*T, D): row h*T+t holds Kk_h[t] in columns [h·d, (h+1)·d)."""
    n, H, T, d = Kk.shape
    eye = torch.eye(H, dtype=Kk.dtype, device=Kk.device)
    # (n, H, T, 1, d) * (H, 1, H, 1) -> (n, H, T, H, d): zero except where the two head indices agree.
    return (Kk[:, :, :, None, :] * eye[:, None, :, None]).reshape(n, H * T, H * d)


def _cast(side: ItemSide, dtype: torch.dtype) -> ItemSide:
    """Cast the float tensors once (the norms stay in the compute dtype)."""
    out = {}
    for name in ("Q", "Kk", "O", "gram", "Pglob", "gx"):
        val = getattr(side, name)
        out[name] = None if val is None else val.to(dtype)
    if side.shared_qk:
        out["Kk"] = out["Q"]
    if side.o_is_q:
        out["O"] = out["Q"]
    return replace(side, **out)
