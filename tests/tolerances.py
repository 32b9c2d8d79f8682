"""The numerical contract of spec §9, decided once, per dtype.

S_ATOL[dtype]: max |S − S_ref| for a backend whose inputs are stored in ``dtype``,
    where S_ref is the float64 reference (``acf_fast.reference``) evaluated on the same
    (rounded) inputs. float32: 1e-4; bf16 / fp16 storage with fp32 accumulation: 5e-3;
    float64 (eager and torch compute in it): rounding only.
GRAD_RTOL[dtype]: max |g − g_ref| / max |g_ref| per input tensor, against float64
    autograd of the eager form. float32: 1e-3.
"""
import torch

S_ATOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 5e-3,
}
GRAD_RTOL = {
    torch.float64: 1e-9,
    torch.float32: 1e-3,
}


def assert_scores_close(S: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """S within S_ATOL[dtype] of ``ref`` (float64), every element finite."""
    assert S.shape == ref.shape, f"{what}: shape {tuple(S.shape)} != {tuple(ref.shape)}"
    assert bool(torch.isfinite(S).all()), f"{what}: S holds NaN or Inf"
    err = (S.detach().double().cpu() - ref.double().cpu()).abs().max().item()
    assert err <= S_ATOL[dtype], f"{what}: max |ΔS| = {err:.3e} > {S_ATOL[dtype]:.0e} ({dtype})"


def assert_grad_close(g: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Relative gradient error max|g − ref| / max|ref| within GRAD_RTOL[dtype]; ref must not be all zero."""
    scale = ref.abs().max().item()
    assert scale > 0, f"{what}: the reference gradient is zero, the check could not fail"
    rel = (g.detach().double().cpu() - ref.double().cpu()).abs().max().item() / scale
    assert rel <= GRAD_RTOL[dtype], f"{what}: relative gradient error {rel:.2e} > {GRAD_RTOL[dtype]:.0e}"
