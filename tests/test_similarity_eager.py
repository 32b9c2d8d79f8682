"""backend="eager" beyond the shared contract of tests/test_backends.py.

The reference (acf_fast.reference) is an independent loop over pairs and heads on
the valid rows only; the eager backend is batched over images with masks, so the two
share no code path beyond torch and the spec's notation (acf_fast.notation).
"""
import torch

from inputs import make_case, reference, score
from tolerances import assert_scores_close


def test_eager_local_only_without_global():
    case = make_case(3, 4, 5, 6, D=64, H=4, variant="local", seed=5)
    assert_scores_close(score(case, "eager"), reference(case), torch.float32, "eager, no global score")


def test_eager_is_differentiable_in_every_input():
    case = make_case(3, 4, 5, 4, D=32, H=4, variant="paper", seed=2, dtype=torch.float64)
    leaves = [case["V"], case["W"], case["G"], *case["weights"].values()]
    for t in leaves:
        t.requires_grad_(True)
    score(case, "eager").sum().backward()
    for t in leaves:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().max() > 0
