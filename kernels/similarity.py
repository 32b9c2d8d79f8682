"""``backend="triton"``: the fused ACF similarity (spec §3, §8) on kernel v2.

Layout (Liger-Kernel style): the Triton kernels and their launcher live in
``kernels/tiles.py`` (tiles of images × texts, see its docstring); this module holds
the registered op ``acf_fast::fused_similarity`` (per-item precompute, then the tile
launches), the ``torch.autograd.Function`` and the backend entry
:func:`triton_similarity`. :func:`launch_similarity` is the op's plain-Python name:
benchmarks time exactly what users call.

Precision. fp16 / bf16 inputs are stored as they are and every product accumulates in
fp32 on tensor cores (≤ 5e-3, spec §9). fp32 inputs (and float64, scored in fp32) keep
~22 bits per product on tensor cores, so the 1e-4 contract holds without CUDA-core dots.
The tiles hold them as fp16 pairs, x = hi + lo/2048 after a power-of-two scaling per side
(``tiles.split16_planes``), and every product is three fp16 products, "f16x3". That is
the split ``input_precision="tf32x3"`` makes (measured at 2–3e-7 relative error per dot on
an H200, bench/results/gpu/*probe.json; f16x3 itself is not measured on a GPU yet), at
fp16's tensor-core rate, twice tf32's, with the inputs split once on the host instead of
in registers: the offline sm_90 build of the tile issues 32–41 % fewer instructions per
pair and spills 40–70 % fewer bytes (bench/results/kernels/). ``allow_tf32=True`` takes one
tf32 product per dot instead (~8e-4 per dot: its own, looser tolerance).

Backward: :class:`TritonSimilarityFunction` stores only its inputs; its backward
recomputes S block by block with the ``torch`` backend (``acf_fast.fused_torch``)
under autograd and back-propagates the incoming gradient of each block, so gradients
reach V, W, G, global_emb and every weight without any per-pair tensor kept from
the forward.
"""
from typing import Optional

import torch

from acf_fast.fused_torch import torch_similarity, with_magnitude_scaling
from acf_fast.validate import WEIGHT_NAMES

from .interpreter import INTERPRET as _INTERPRET
from .tiles import check_tile_limits, launch_tiles, plan_tiles

__all__ = ["storage_dtype", "dot_precision", "launch_similarity", "triton_similarity", "TritonSimilarityFunction"]

# Pairs per backward recompute block. The torch backend bounds its own memory
# (chunked, checkpointed), so a block can span many images and texts, and the
# texts' precompute is redone once per block rather than once per image.
_BACKWARD_PAIRS = 2**20


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16 / bf16 stay (tensor-core dots, fp32 accumulation); everything else is scored in float32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def dot_precision(st: torch.dtype, allow_tf32: bool) -> str:
    """The tiles' dot mode for storage dtype ``st`` (see the module docstring): a tl.dot
    input precision ("tf32": ignored for fp16 / bf16 operands; fp32 with ``allow_tf32``),
    or "f16x3" for fp32 tiles held as fp16 pairs (``tiles.plan_tiles(split16=True)``)."""
    if st != torch.float32:
        return "tf32"  # ignored for fp16 / bf16 operands
    return "tf32" if allow_tf32 else "f16x3"


@torch.library.custom_op("acf_fast::fused_similarity", mutates_args=())
def _fused_similarity(
    V: torch.Tensor, v_mask: Optional[torch.Tensor], W: torch.Tensor, w_mask: Optional[torch.Tensor],
    G: Optional[torch.Tensor], Gi: Optional[torch.Tensor], Gt: Optional[torch.Tensor],
    z_x: Optional[torch.Tensor], z_y: Optional[torch.Tensor], z_o: Optional[torch.Tensor],
    x_w: Optional[torch.Tensor], x_v: Optional[torch.Tensor], x_g: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    heads: int, s_i2t: float, s_t2i: float, u1: float, u2: float, allow_tf32: bool,
) -> torch.Tensor:
    """S (N, M) float32 of validated inputs (see :func:`launch_similarity`)."""
    weights = {k: v for k, v in zip(WEIGHT_NAMES, (z_x, z_y, z_o, x_w, x_v, x_g, gate)) if v is not None}
    st = storage_dtype(V.dtype)
    f32 = lambda t: None if t is None else t.detach().to(torch.float32).contiguous()  # noqa: E731

    def tiles(V, v_mask, W, w_mask, *, scale, G, eps):
        prec = dot_precision(st, allow_tf32)
        plan = plan_tiles(V, v_mask, W, w_mask, heads=heads, weights=weights, G=G, st=st, split16=prec == "f16x3")
        out = torch.empty(V.shape[0], W.shape[0], dtype=torch.float32, device=V.device)
        return launch_tiles(plan, out, scale=scale, u1=u1, u2=u2, gi=f32(Gi), gt=f32(Gt), dot_prec=prec, eps=eps)

    # Huge finite features would overflow the fp32 norms and Gram forms: rescaled exactly
    # as the torch backend does (powers of two, softmax scales and cosine clamp adjusted).
    return with_magnitude_scaling(tiles, V, v_mask, W, w_mask, scale=(s_i2t, s_t2i), G=G)


@_fused_similarity.register_fake
def _(V, v_mask, W, w_mask, G, Gi, Gt, z_x, z_y, z_o, x_w, x_v, x_g, gate, heads, s_i2t, s_t2i, u1, u2, allow_tf32):
    return V.new_empty((V.shape[0], W.shape[0]), dtype=torch.float32)


def launch_similarity(V, v_mask, W, w_mask, *, heads, scale, u1, u2, weights=None, G=None, global_emb=None,
                      allow_tf32: bool = False) -> torch.Tensor:
    """S (N, M) float32 through the registered op ``acf_fast::fused_similarity`` (no autograd).

    Inputs as :func:`acf_fast.acf_similarity` after validation (``scale`` a pair). The
    op runs the per-item precompute and the tile kernels; torch.compile sees it as one
    opaque op with a known output shape."""
    N, K, D = V.shape
    check_tile_limits(K, W.shape[1])
    w = weights or {}
    Gi, Gt = (None, None) if global_emb is None else global_emb
    return _fused_similarity(V, v_mask, W, w_mask, G, Gi, Gt, *(w.get(k) for k in WEIGHT_NAMES), int(heads),
                             float(scale[0]), float(scale[1]), float(u1), float(u2), bool(allow_tf32))


# --------------------------------------------------------------------------- autograd


class TritonSimilarityFunction(torch.autograd.Function):
    """Forward: the fused kernels. Backward: blockwise recompute with the torch backend.

    Inputs: V, v_mask, W, w_mask, G, Gi, Gt, config (dict), then the weight tensors in
    the order of ``config["weight_names"]``. Returns S (N, M) float32.
    """

    @staticmethod
    def forward(ctx, V, v_mask, W, w_mask, G, Gi, Gt, config, *weight_list):
        weights = dict(zip(config["weight_names"], weight_list))
        out = launch_similarity(V, v_mask, W, w_mask, heads=config["heads"], scale=config["scale"], u1=config["u1"],
                                u2=config["u2"], weights=weights, G=G, global_emb=None if Gi is None else (Gi, Gt),
                                allow_tf32=config.get("allow_tf32", False))
        ctx.config = config
        ctx.save_for_backward(V, v_mask, W, w_mask, G, Gi, Gt, *weight_list)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        V, v_mask, W, w_mask, G, Gi, Gt, *weight_list = ctx.saved_tensors
        cfg = ctx.config
        names = cfg["weight_names"]
        need = ctx.needs_input_grad
        N, M = V.shape[0], W.shape[0]
        gV = torch.zeros_like(V) if need[0] else None
        gW = torch.zeros_like(W) if need[2] else None
        gG = torch.zeros_like(G) if G is not None and need[4] else None
        gGi = torch.zeros_like(Gi) if Gi is not None and need[5] else None
        gGt = torch.zeros_like(Gt) if Gt is not None and need[6] else None
        gws = [torch.zeros_like(w) if need[8 + k] else None for k, w in enumerate(weight_list)]
        # Blocks of images x texts small enough that the recompute's graph stays bounded.
        bm = max(1, min(M, _BACKWARD_PAIRS))
        bn = max(1, _BACKWARD_PAIRS // bm)
        with torch.enable_grad():
            for i0 in range(0, N, bn):
                for j0 in range(0, M, bm):
                    si, sj = slice(i0, i0 + bn), slice(j0, j0 + bm)
                    leaves, slots = [], []

                    def leaf(t, grad_slot, idx=None):
                        if t is None:
                            return None
                        x = (t if idx is None else t[idx]).detach()
                        if grad_slot is not None:
                            x.requires_grad_(True)
                            leaves.append(x)
                            slots.append((grad_slot, idx))
                        return x

                    v = leaf(V, gV, si)
                    w = leaf(W, gW, sj)
                    g = leaf(G, gG, si)
                    gi = leaf(Gi, gGi, si)
                    gt = leaf(Gt, gGt, sj)
                    wts = {nm: leaf(wt, gw) for nm, wt, gw in zip(names, weight_list, gws)}
                    vm = None if v_mask is None else v_mask[si]
                    wm = None if w_mask is None else w_mask[sj]
                    if not leaves:
                        continue
                    S = torch_similarity(v, vm, w, wm, heads=cfg["heads"], scale=cfg["scale"], u1=cfg["u1"],
                                         u2=cfg["u2"], weights=wts, G=g, global_emb=None if gi is None else (gi, gt))
                    grads = torch.autograd.grad(S.to(torch.float32), leaves, grad_out[si, sj].to(torch.float32),
                                                allow_unused=True)
                    for (slot, idx), gr in zip(slots, grads):
                        if gr is None:
                            continue
                        if idx is None:
                            slot += gr.to(slot.dtype)
                        else:
                            slot[idx] += gr.to(slot.dtype)
        return (gV, None, gW, None, gG, gGi, gGt, None, *gws)


def triton_similarity(V, v_mask, W, w_mask, *, heads, scale, u1, u2, weights, G, global_emb, allow_tf32=False):
    """The ``triton`` backend of ``acf_similarity`` (inputs already validated).

    Args:
        V (N, K, D), W (M, L, D): fp16 / bf16 / fp32 (float64 is scored in float32),
            K <= 128 regions, L <= 128 tokens, any D divisible by ``heads``.
        v_mask (N, K), w_mask (M, L): bool or None.
        weights: dict of z_x z_y z_o x_w x_v x_g (D, D) and gate (D,) (absent = identity / 0).
        G (N, D) -> pairwise global; global_emb (Gi (N, E), Gt (M, E)) -> embedding global.
        allow_tf32: one tf32 product per fp32 dot instead of three (looser tolerance).

    Returns:
        S (N, M) float32, differentiable in V, W, G, global_emb and every weight
        (backward = blockwise recompute with the torch backend, see the module doc).
    """
    check_tile_limits(V.shape[1], W.shape[1])
    if not V.is_cuda and not _INTERPRET:
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 set before import); "
                         "use backend='torch' on CPU")
    names = tuple(sorted(k for k, v in (weights or {}).items() if v is not None))
    config = dict(heads=heads, scale=tuple(scale), u1=float(u1), u2=float(u2), weight_names=names, allow_tf32=allow_tf32)
    Gi, Gt = (None, None) if global_emb is None else global_emb
    return TritonSimilarityFunction.apply(V, v_mask, W, w_mask, G, Gi, Gt, config, *(weights[k] for k in names))
