"""The fused pairwise global score (``kernels/pair_global.py``) against a float64 loop over
pairs: both dtype paths (fp16 storage; fp32 split into fp16 pairs, with the scale the
tiles leave on κ and one power of two per chunk of images on Pv), ragged block edges (pairs,
D, H·DH and H·K not multiples of the interpreter's 16-wide blocks), columns in another order
with S entries of no pair poisoned, a strided S, the cosine's clamp, and shapes refused
before anything is written. On CPU it runs in the Triton interpreter (tests/conftest.py),
hence the small blocks."""
import pytest
import torch

from acf_fast.kernels import pair_global
from acf_fast.kernels.pair_global import add_pair_global, cat_image_operands, image_operands, weight_operands
from acf_fast.kernels.tiles import F16X3_MAX


def _inputs(n, Mb, HD, HK, D, seed, extra_cols=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(kap=r(n * Mb, HD), bbar=torch.rand(n * Mb, HK, generator=g), Zw=r(HD, D) / HD ** 0.5,
                Pv=r(n, HK, D) / HK ** 0.5, gx=r(n, D), col=torch.randperm(Mb + extra_cols, generator=g)[:Mb].to(torch.int32),
                S=r(n, Mb + extra_cols))


def _reference(S, col, kap, bbar, Zw, Pv, gx, coef, eps):
    """float64, one pair at a time (spec §3 regrouped, pair_global.py: W_g = κ Zw, V_g = b̄ Pv_i + gx_i)."""
    out = S.double().clone()
    n, Mb = S.shape[0], col.shape[0]
    for i in range(n):
        for j in range(Mb):
            p = i * Mb + j
            w = kap[p].double() @ Zw.double()
            v = bbar[p].double() @ Pv[i].double() + gx[i].double()
            out[i, int(col[j])] += coef * (v @ w) / max(float(v.norm() * w.norm()), eps)
    return out


def _run(S, x, dtype, coef, *, kap=None, kap_scale=1.0, pv=None, device="cpu"):
    """add_pair_global on ``device`` with x's tensors (kap: the one passed, scaled), S a copy."""
    S = S.clone().to(device)
    kap = (x["kap"] if kap is None else kap).to(dtype).to(device)
    pv = image_operands(x["Pv"].to(device), dtype) if pv is None else pv
    add_pair_global(S, x["col"].to(device), kap, x["bbar"].to(dtype).to(device), weight_operands(x["Zw"].to(device), dtype),
                    pv, x["gx"].to(device), coef, 1e-8, kap_scale=kap_scale)
    return S.cpu()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("n,Mb,HD,HK,D", [(3, 7, 48, 40, 40), (2, 9, 16, 20, 17), (1, 1, 40, 24, 33),
                                          (2, 37, 16, 16, 24)])  # 37: three blocks of texts per image
def test_matches_float64_pairs(dtype, tol, n, Mb, HD, HK, D, device):
    x = _inputs(n, Mb, HD, HK, D, seed=n * 100 + Mb)
    ref = _reference(x["S"], x["col"], x["kap"].to(dtype), x["bbar"].to(dtype), x["Zw"], x["Pv"], x["gx"], 0.2, 1e-8)
    S = _run(x["S"], x, dtype, 0.2, device=device)
    err = (S.double() - ref).abs()
    assert (ref - x["S"].double()).abs().max() > 0.01  # the global score moves S: the check can fail
    assert err.max() < tol * 0.2, f"{dtype} n={n} Mb={Mb} HD={HD} HK={HK} D={D}: max error {err.max():.2e}"
    untouched = torch.ones_like(S, dtype=torch.bool)
    untouched[:, x["col"].long()] = False
    assert torch.equal(S[untouched], x["S"][untouched])  # columns of no pair: as they were


def test_fp32_split_with_the_tiles_scales(device):
    """The tiles' fp32 path leaves κ times its side's power of two (up to ±2^13 in magnitude)
    for the fp16 split; the kernel undoes it, and splits Zw at its own scale (values of 1e3
    here, beyond fp16's precision of a unit)."""
    n, Mb, HD, HK, D = 2, 5, 32, 24, 24
    x = _inputs(n, Mb, HD, HK, D, seed=3)
    x["Zw"] = x["Zw"] * 1e3
    kap_scale = 2.0 ** 10
    kap = x["kap"] / x["kap"].abs().max() * (F16X3_MAX / kap_scale) * 0.9  # κ's largest is kap_scale·|κ| ≈ 2^13
    ref = _reference(x["S"], x["col"], kap, x["bbar"], x["Zw"], x["Pv"], x["gx"], 0.2, 1e-8)
    S = _run(x["S"], x, torch.float32, 0.2, kap=kap * kap_scale, kap_scale=kap_scale, device=device)
    assert (S.double() - ref).abs().max() < 1e-6


def test_each_chunk_of_images_keeps_its_own_scale(device):
    """tiles.plan_tiles splits Pv a chunk of images at a time, each chunk at its own power of
    two: images whose Pv differ by 10^6 in magnitude, in two chunks, are scored at fp32
    precision; with the first chunk's scale for both the second image's Pv would underflow
    fp16 by far."""
    n, Mb, HD, HK, D = 2, 4, 16, 20, 24
    x = _inputs(n, Mb, HD, HK, D, seed=6)
    x["Pv"] = x["Pv"] * torch.tensor([1e3, 1e-3])[:, None, None]
    x["gx"] = x["gx"] * torch.tensor([1e3, 1e-3])[:, None]  # V_g's two terms alike in size
    pv = cat_image_operands([image_operands(x["Pv"][i:i + 1].to(device), torch.float32) for i in range(n)])
    assert pv["unscale"][0] / pv["unscale"][1] > 1e5
    ref = _reference(x["S"], x["col"], x["kap"], x["bbar"], x["Zw"], x["Pv"], x["gx"], 0.3, 1e-8)
    S = _run(x["S"], x, torch.float32, 0.3, pv=pv, device=device)
    assert (S.double() - ref).abs().max() < 1e-6


def test_the_clamp_sees_the_unscaled_norms(device):
    """The clamp acts on ‖V_g‖·‖W_g‖ of the true κ, not of the scaled one the tiles leave:
    with κ of ~1e-11 (held times 2^46, as a side's power of two brings it near 2^13)
    ‖V_g‖·‖W_g‖ is below eps = 1e-8 and the cosine is V·W / eps, a few hundredths of it."""
    n, Mb, HD, HK, D = 1, 3, 16, 16, 16
    x = _inputs(n, Mb, HD, HK, D, seed=4)
    kap, kap_scale = x["kap"] * 1e-11, 2.0 ** 46
    ref = _reference(x["S"], x["col"], kap, x["bbar"], x["Zw"], x["Pv"], x["gx"], 0.5, 1e-8)
    moved = (ref - x["S"].double()).abs().max()
    assert 1e-4 < moved < 0.05  # clamped: a small part of a cosine's weight, but not nothing
    S = _run(x["S"], x, torch.float32, 0.5, kap=kap * kap_scale, kap_scale=kap_scale, device=device)
    assert (S.double() - ref).abs().max() < 1e-6


def test_strided_scores_and_the_cosines_clamp(device):
    """S a column slice of a wider matrix (strides not those of a contiguous S); a pair whose
    κ is zero has W_g = 0 and its cosine clamped to 0; the columns beside the slice keep
    their values."""
    n, Mb, HD, HK, D = 2, 4, 16, 24, 20
    x = _inputs(n, Mb, HD, HK, D, seed=5, extra_cols=0)
    x["kap"][1] = 0.0
    big = torch.randn(n, 2 * Mb + 5, generator=torch.Generator().manual_seed(1))
    S = big[:, 3:3 + Mb]
    ref = _reference(S, x["col"], x["kap"], x["bbar"], x["Zw"], x["Pv"], x["gx"], 0.25, 1e-8)
    bigd = big.clone().to(device)
    add_pair_global(bigd[:, 3:3 + Mb], x["col"].to(device), x["kap"].to(device), x["bbar"].to(device),
                    weight_operands(x["Zw"].to(device), torch.float32), image_operands(x["Pv"].to(device), torch.float32),
                    x["gx"].to(device), 0.25, 1e-8)
    got = bigd.cpu()
    assert (got[:, 3:3 + Mb].double() - ref).abs().max() < 1e-6
    assert got[0, 3 + int(x["col"][1])] == big[0, 3 + int(x["col"][1])]  # the zero κ: cos 0, S as it was
    assert torch.equal(got[:, :3], big[:, :3]) and torch.equal(got[:, 3 + Mb:], big[:, 3 + Mb:])


@pytest.mark.parametrize("bad", ["kap rows", "bbar columns", "Zw rows", "Pv images", "gx rows", "operands dtype"])
def test_bad_shapes_are_refused_before_anything_is_written(bad, device):
    n, Mb, HD, HK, D = 2, 3, 16, 24, 16
    x = {k: v.clone().to(device) for k, v in _inputs(n, Mb, HD, HK, D, seed=9).items()}
    if bad == "kap rows":
        x["kap"] = x["kap"][:-1]
    elif bad == "bbar columns":
        x["bbar"] = x["bbar"][:, :-1]
    elif bad == "Zw rows":
        x["Zw"] = x["Zw"][:-1]
    elif bad == "Pv images":
        x["Pv"] = x["Pv"][:-1]
    elif bad == "gx rows":
        x["gx"] = x["gx"][:-1]
    op_dtype = torch.float16 if bad == "operands dtype" else torch.float32  # κ is fp32
    S0 = x["S"].clone()
    with pytest.raises(ValueError, match="add_pair_global"):
        add_pair_global(x["S"], x["col"], x["kap"], x["bbar"], weight_operands(x["Zw"], op_dtype),
                        image_operands(x["Pv"], torch.float32), x["gx"], 0.2, 1e-8)
    assert torch.equal(x["S"], S0)


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_launch_passes_the_argument_types_the_kernel_report_compiles(dtype, name, device):
    """bench/kernel_report.py builds the kernel with the argument types and 16-divisible
    integers a launch at H·DH, H·K and D multiples of 16 passes (fp32: Zw, Pv as fp16 pairs,
    their lo planes a multiple of 16 elements on)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from bench import kernel_report
    from bench.offline_compile import _ast_arguments

    calls = []

    class Recorder:  # stands in for the kernel: the launch's arguments, nothing run
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((a, k))

    x = {k: v.to(device) for k, v in _inputs(3, 5, 48, 320, 32, seed=2).items()}
    kern, pair_global._pair_global_kernel = pair_global._pair_global_kernel, Recorder()
    try:
        add_pair_global(x["S"], x["col"], x["kap"].to(dtype), x["bbar"].to(dtype), weight_operands(x["Zw"], dtype),
                        image_operands(x["Pv"], dtype), x["gx"], 0.2, 1e-8, kap_scale=2.0)
    finally:
        pair_global._pair_global_kernel = kern
    assert len(calls) == 1
    jit = kern if isinstance(kern, JITFunction) else JITFunction(kern.fn, **kern.kwargs)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    (args, kw), = calls
    bound, spec, opts = binder(*args, **{k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")})
    _, sig, _, attrs = jit._pack_args(backend, {"enable_fp_fusion": True}, bound, spec, opts)
    report_sig = kernel_report.global_requests((name,))[0]["request"]["signature"]
    want_sig, _, want_attrs = _ast_arguments(jit.arg_names, report_sig, {k: v for k, v in kw.items()
                                                                          if k in jit.arg_names})
    assert {k: v for k, v in sig.items() if v != "constexpr"} == {k: v for k, v in want_sig.items() if v != "constexpr"}
    assert {k: v for k, v in attrs.items() if v} == want_attrs
