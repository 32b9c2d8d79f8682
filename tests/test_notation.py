"""The spec's notation (acf_fast.notation) and the one txt2img validator, against plain
float64 loops written here."""
import numpy as np
import pytest
import torch

from acf_fast.notation import cosine, cosine_from_squares, l2norm, masked_mean
from acf_fast.validate import check_txt2img


def test_cosine_is_the_spec_formula_with_its_clamp():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, 16, generator=g, dtype=torch.float64)
    y = torch.randn(7, 5, 16, generator=g, dtype=torch.float64)
    x[0, 0] = 0.0  # a zero row: legitimate input (spec §1)
    x[1, 1] *= 1e-6
    y[1, 1] *= 1e-5  # ‖x‖‖y‖ ~ 1e-10 < 1e-8: clamped
    want = torch.empty(7, 5, dtype=torch.float64)
    for i in range(7):
        for j in range(5):
            a, b = x[i, j], y[i, j]
            want[i, j] = float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-8)
    torch.testing.assert_close(cosine(x, y), want, rtol=1e-12, atol=0)
    dots, sq_x, sq_y = (x * y).sum(-1), (x * x).sum(-1), (y * y).sum(-1)
    torch.testing.assert_close(cosine_from_squares(dots, sq_x, sq_y), want, rtol=1e-12, atol=0)


def test_cosine_gradient_is_finite_at_a_zero_row():
    x = torch.zeros(3, 8, requires_grad=True)
    y = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    cosine(x, y).sum().backward()
    assert bool(torch.isfinite(x.grad).all())


def test_l2norm_and_its_clamp():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [3e-9, 4e-9]], dtype=torch.float64)
    torch.testing.assert_close(l2norm(x), torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.3, 0.4]], dtype=torch.float64))


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 3)])
def test_masked_mean_over_valid_rows(shape):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=g) < 0.5
    mask[0] = True
    mask[1] = False  # no valid row: 0, not NaN
    mask[2, :] = False
    mask[2, 5] = True
    got = masked_mean(x, mask)
    for i in range(4):
        rows = x[i][mask[i]]
        want = rows.mean(0) if len(rows) else torch.zeros(shape[2:], dtype=torch.float64)
        torch.testing.assert_close(got[i], want)
    torch.testing.assert_close(masked_mean(x, None), x.mean(1))


def test_txt2img_validator_with_and_without_the_image_count():
    torch.testing.assert_close(check_txt2img(None, 2, 10), torch.arange(10) // 5)
    assert check_txt2img(np.array([2, 0, 1, 0]), None, 4).tolist() == [2, 0, 1, 0]
    assert check_txt2img([1, 1, 0]).dtype == torch.int64  # any length without M
    for bad, N, M, match in [(None, None, 4, "is needed"), (np.array([0, -1]), None, 2, "negative"),
                             (np.array([0, 3]), 2, 2, r"ids in \[0, 3\]"), (np.array([0, 0]), 2, 2, "image 1 has no"),
                             (np.array([0.0, 1.0]), None, 2, "integer"), (np.array([0, 1]), None, 3, r"\(3,\)"),
                             (torch.zeros(2, 2, dtype=torch.long), None, None, "shape")]:
        with pytest.raises(ValueError, match=match):
            check_txt2img(bad, N, M)
