"""Every backend against the float64 per-pair reference (spec §9): backend × dtype × shape.

One parametrised test holds the contract for all backends: the inputs come from the
one factory (``inputs.make_case``: unit rows, ragged masks with holes, generic
weights), the tolerance from the one table (``tolerances.S_ATOL``). The shapes
include a "weird" size (17 regions, 9 words: a power of two plus one, padded by the
kernel), a single region, a single word, no masks, and non-contiguous layouts
(every other element of a wider buffer; items and rows swapped in memory).

On the CPU the Triton backend runs in the interpreter (tests/conftest.py), in fp32
only: the interpreter has no real bf16 arithmetic (PLATFORM_FACTS), so its fp16 /
bf16 / float64 cases run with ``--device cuda``.
"""
import zlib

import pytest
import torch

from acf_fast import acf_similarity
from acf_fast.reference import authors_local_score
from inputs import authors_case, make_case, reference, score
from tolerances import assert_scores_close

BACKENDS = ("eager", "torch", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SHAPES = [  # id, (N, M, K, L), (D, H), layout, masks
    ("small", (3, 4, 6, 5), (64, 4), "contiguous", True),
    ("weird-strided", (3, 3, 17, 9), (32, 2), "strided", True),
    ("K1-transposed", (2, 3, 1, 6), (32, 2), "transposed", True),
    ("L1-strided", (3, 2, 5, 1), (32, 2), "strided", True),
    ("no-masks", (3, 3, 4, 3), (32, 2), "contiguous", False),
]


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
@pytest.mark.parametrize("name,shape,DH,layout,masks", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_float64_reference(backend, dtype, name, shape, DH, layout, masks, variant, device):
    if backend == "triton" and device.type == "cpu" and dtype != torch.float32:
        pytest.skip("Triton interpreter: fp32 only (no real bf16 arithmetic); run with --device cuda")
    N, M, K, L = shape
    case = make_case(N, M, K, L, D=DH[0], H=DH[1], variant=variant, masks=masks, seed=zlib.crc32(f"{name}/{variant}".encode()) % 997,
                     dtype=dtype, device=device, layout=layout)
    if layout != "contiguous":
        assert not case["V"].is_contiguous() and not case["W"].is_contiguous()
    S = score(case, backend)
    # float64 in, float64 out (eager, torch); the kernel computes float64 input in float32
    want = torch.float64 if dtype == torch.float64 and backend != "triton" else torch.float32
    assert S.dtype == want and S.device.type == device.type
    ref = reference(case)  # float64, of the same (rounded) inputs
    assert ref.std() > 1e-3  # scores vary across the grid: the comparison can fail
    assert_scores_close(S, ref, want if dtype == torch.float64 else dtype, f"{backend} {variant} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_acf_code_local_score_equals_the_authors(backend, device):
    """Spec §3: the acf-code local score is the authors' 0.5·i2t + 0.5·t2i on the same V, W."""
    V, W, w_mask, lens = authors_case(3, 4, 7, 9, 64, seed=11)
    S = acf_similarity(V.to(device), None, W.to(device), w_mask.to(device), heads=4, scale=(4.0, 9.0), u1=0.5,
                       u2=1.0, backend=backend)
    assert_scores_close(S, authors_local_score(V, W, lens, heads=4, smooth_i2t=4.0, smooth_t2i=9.0), torch.float32,
                        f"{backend} vs the authors' formula")


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_values_do_not_leak(backend, device):
    """Masked-out rows may hold any finite value: S is unchanged and finite."""
    case = make_case(3, 4, 5, 6, D=32, H=2, variant="paper", seed=52, device=device)
    base = score(case, backend)
    huge = dict(case)
    huge["V"] = torch.where(case["v_mask"][:, :, None], case["V"], torch.full_like(case["V"], 1e30))
    huge["W"] = torch.where(case["w_mask"][:, :, None], case["W"], torch.full_like(case["W"], -1e30))
    S = score(huge, backend)
    assert bool(torch.isfinite(S).all()) and torch.allclose(S, base, atol=1e-6, rtol=0)
