"""Zero rows are legitimate input (spec §1: CNN cells on a white background, padded
regions): every normalisation must have a finite, modest gradient there.

Issue 12: on real grid features the FIRST step logged grad_norm ~1e14. Cause: the
linears start with zero bias, so an all-zero region maps to an exactly zero row;
``x / max(‖x‖, 1e-8)`` then has a Jacobian of I / 1e-8 there, and the cosine after it
(``x·y / max(‖x‖‖y‖, 1e-8)``) another 1e8 on the zero row: region_fc.bias got ~1e15.
"""
import pytest
import torch

from acf_fast.model import ACF
from acf_fast.notation import l2norm
from acf_fast.train.objective import Objective


def _batch(B=6, K=6, L=7, Dv=12, Db=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    words = torch.randn(B, L, Db, generator=g) * mask[..., None]
    pos_mask = mask.clone()
    return {"regions": torch.randn(B, K, Dv, generator=g), "region_mask": torch.ones(B, K, dtype=torch.bool),
            "globals": torch.randn(B, Dv, generator=g), "words": words, "mask": mask,
            "pos_words": torch.randn(B, L, Db, generator=g) * pos_mask[..., None], "pos_mask": pos_mask}


@pytest.mark.parametrize("backend", ["torch", "eager"])
@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_first_step_with_an_all_zero_region_has_a_modest_gradient(variant, backend):
    # Fails before the fix: grad norm 1.7e15 (paper) / 1.6e15 (acf-code), all in region_fc.bias.
    torch.manual_seed(0)
    model = ACF(variant, embed_dim=16, heads=2, region_dim=12, global_dim=12, text_dim=10)  # default init
    b = _batch()
    b["regions"][0, 1] = 0.0  # a valid, all-zero region (a white background cell)
    b["regions"][3, :2] = 0.0
    obj = Objective(model, negatives="gaussian", positives=True, backend=backend)
    loss, _ = obj(b, torch.Generator().manual_seed(0))
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert torch.isfinite(norm) and float(norm) < 1e3, {n: float(p.grad.norm()) for n, p in model.named_parameters()}


def test_l2norm_forward_is_the_spec_and_gradient_is_exact_off_zero():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    x[1] = 0.0
    x[2] = 1e-10  # inside the clamp: forward x / 1e-8
    y = l2norm(x)
    want = x / torch.clamp(x.norm(dim=-1, keepdim=True), min=1e-8)
    assert torch.equal(y, want)
    # Away from the clamp the gradient is autograd's of x / ‖x‖ (float64).
    xr = x[[0, 3, 4]].clone().requires_grad_(True)
    w = torch.randn(3, 7, generator=g, dtype=torch.float64)
    (l2norm(xr) * w).sum().backward()
    xr2 = x[[0, 3, 4]].clone().requires_grad_(True)
    (xr2 / xr2.norm(dim=-1, keepdim=True) * w).sum().backward()
    torch.testing.assert_close(xr.grad, xr2.grad, rtol=1e-12, atol=0)
    # At (and inside) the clamp: a zero, finite gradient instead of I / 1e-8.
    xz = x.clone().requires_grad_(True)
    (l2norm(xz) * torch.randn(5, 7, generator=g, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(xz.grad).all() and (xz.grad[[1, 2]] == 0).all()
    assert (xz.grad[[0, 3, 4]] != 0).any()


def test_l2norm_keeps_dtype_and_dim():
    x = torch.randn(3, 4, 5, dtype=torch.float32)
    x[:, 2, :] = 0
    y = l2norm(x, dim=1)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x / x.norm(dim=1, keepdim=True))
