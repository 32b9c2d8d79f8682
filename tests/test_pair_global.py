"""The fused pairwise global score (``kernels/pair_global.py``) against a float64 loop over
pairs: both dtype paths (fp16 storage; fp32 split into fp16 pairs, with the scale the
tiles leave on κ and λ), ragged block edges (pairs, D and H·DH not multiples of the
interpreter's 16-wide blocks), columns in another order with S entries of no pair
poisoned, a strided S, the cosine's clamp, and shapes refused before anything is written.
On CPU it runs in the Triton interpreter (tests/conftest.py), hence the small blocks."""
import pytest
import torch

from acf_fast.kernels import pair_global
from acf_fast.kernels.pair_global import add_pair_global
from acf_fast.kernels.tiles import F16X3_MAX


def _inputs(n, Mb, HD, D, seed, device, extra_cols=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(kap=r(n * Mb, HD), lam=r(n * Mb, HD), Zw=r(HD, D) / HD ** 0.5, Zv=r(HD, D) / HD ** 0.5,
                sigma=torch.rand(D, generator=g), gx=r(n, D),
                col=torch.randperm(Mb + extra_cols, generator=g)[:Mb].to(torch.int32),
                S=r(n, Mb + extra_cols))


def _reference(S, col, kap, lam, Zw, Zv, sigma, gx, coef, eps):
    """float64, one pair at a time (spec §3: W_g = κ Zw, V_g = σ ⊙ (λ Zv) + gx)."""
    out = S.double().clone()
    n, Mb = S.shape[0], col.shape[0]
    for i in range(n):
        for j in range(Mb):
            p = i * Mb + j
            w = kap[p].double() @ Zw.double()
            v = sigma.double() * (lam[p].double() @ Zv.double()) + gx[i].double()
            out[i, int(col[j])] += coef * (v @ w) / max(float(v.norm() * w.norm()), eps)
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("n,Mb,HD,D", [(3, 7, 48, 40), (2, 9, 16, 17), (1, 1, 40, 33)])
def test_matches_float64_pairs(dtype, tol, n, Mb, HD, D, device):
    x = _inputs(n, Mb, HD, D, seed=n * 100 + Mb, device=device)
    ref = _reference(x["S"], x["col"], x["kap"].to(dtype), x["lam"].to(dtype), x["Zw"], x["Zv"], x["sigma"], x["gx"],
                     0.2, 1e-8)
    S = x["S"].clone().to(device)
    kap, lam = (x[k].to(dtype).to(device) for k in ("kap", "lam"))
    dev = {k: x[k].to(device) for k in ("col", "Zw", "Zv", "sigma", "gx")}
    add_pair_global(S, dev["col"], kap, lam, dev["Zw"], dev["Zv"], dev["sigma"], dev["gx"], 0.2, 1e-8)
    err = (S.double().cpu() - ref).abs()
    assert (ref - x["S"].double()).abs().max() > 0.01  # the global score moves S: the check can fail
    assert err.max() < tol * 0.2, f"{dtype} n={n} Mb={Mb} HD={HD} D={D}: max error {err.max():.2e}"
    untouched = torch.ones_like(S, dtype=torch.bool).cpu()
    untouched[:, x["col"].long()] = False
    assert torch.equal(S.cpu()[untouched], x["S"][untouched])  # columns of no pair: as they were


def test_fp32_split_with_the_tiles_scales(device):
    """The tiles' fp32 path leaves κ, λ times its sides' powers of two (up to ±2^13 in
    magnitude) for the fp16 split; the kernel undoes them, and splits Zw, Zv at their own
    scale (values of 1e3 here, beyond fp16's precision of a unit)."""
    n, Mb, HD, D = 2, 5, 32, 24
    x = _inputs(n, Mb, HD, D, seed=3, device=device)
    x["Zw"] = x["Zw"] * 1e3
    kap_scale, lam_scale = 2.0 ** 10, 2.0 ** -7
    kap = x["kap"] / x["kap"].abs().max() * (F16X3_MAX / kap_scale) * 0.9  # κ's largest is kap_scale·|κ| ≈ 2^13
    lam = x["lam"] * 3.0
    ref = _reference(x["S"], x["col"], kap, lam, x["Zw"], x["Zv"], x["sigma"], x["gx"], 0.2, 1e-8)
    S = x["S"].clone().to(device)
    add_pair_global(S, x["col"].to(device), (kap * kap_scale).to(device), (lam * lam_scale).to(device),
                    x["Zw"].to(device), x["Zv"].to(device), x["sigma"].to(device), x["gx"].to(device), 0.2, 1e-8,
                    kap_scale=kap_scale, lam_scale=lam_scale)
    assert (S.double().cpu() - ref).abs().max() < 1e-6


def test_the_clamp_sees_the_unscaled_norms(device):
    """The clamp acts on ‖V_g‖·‖W_g‖ of the true κ, not of the scaled one the tiles leave:
    with κ of ~1e-11 (held times 2^46, as a side's power of two brings it near 2^13)
    ‖V_g‖·‖W_g‖ is below eps = 1e-8 and the cosine is V·W / eps, a few hundredths of it."""
    n, Mb, HD, D = 1, 3, 16, 16
    x = _inputs(n, Mb, HD, D, seed=4, device=device)
    kap, kap_scale = x["kap"] * 1e-11, 2.0 ** 46
    ref = _reference(x["S"], x["col"], kap, x["lam"], x["Zw"], x["Zv"], x["sigma"], x["gx"], 0.5, 1e-8)
    moved = (ref - x["S"].double()).abs().max()
    assert 1e-4 < moved < 0.05  # clamped: a small part of a cosine's weight, but not nothing
    S = x["S"].clone().to(device)
    add_pair_global(S, x["col"].to(device), (kap * kap_scale).to(device), x["lam"].to(device), x["Zw"].to(device),
                    x["Zv"].to(device), x["sigma"].to(device), x["gx"].to(device), 0.5, 1e-8, kap_scale=kap_scale)
    assert (S.double().cpu() - ref).abs().max() < 1e-6


def test_strided_scores_and_the_cosines_clamp(device):
    """S a column slice of a wider matrix (strides not those of a contiguous S); a pair whose
    κ is zero has W_g = 0 and its cosine clamped to 0; the columns beside the slice keep
    their values."""
    n, Mb, HD, D = 2, 4, 16, 20
    x = _inputs(n, Mb, HD, D, seed=5, device=device, extra_cols=0)
    x["kap"][1] = 0.0
    big = torch.randn(n, 2 * Mb + 5, generator=torch.Generator().manual_seed(1))
    S = big[:, 3:3 + Mb]
    ref = _reference(S, x["col"], x["kap"], x["lam"], x["Zw"], x["Zv"], x["sigma"], x["gx"], 0.25, 1e-8)
    bigd = big.clone().to(device)
    add_pair_global(bigd[:, 3:3 + Mb], x["col"].to(device), x["kap"].to(device), x["lam"].to(device),
                    x["Zw"].to(device), x["Zv"].to(device), x["sigma"].to(device), x["gx"].to(device), 0.25, 1e-8)
    got = bigd.cpu()
    assert (got[:, 3:3 + Mb].double() - ref).abs().max() < 1e-6
    assert got[0, 3 + int(x["col"][1])] == big[0, 3 + int(x["col"][1])]  # the zero κ: cos 0, S as it was
    assert torch.equal(got[:, :3], big[:, :3]) and torch.equal(got[:, 3 + Mb:], big[:, 3 + Mb:])


@pytest.mark.parametrize("bad", ["kap rows", "Zw shape", "gx rows", "sigma length", "z dtype"])
def test_bad_shapes_are_refused_before_anything_is_written(bad, device):
    n, Mb, HD, D = 2, 3, 16, 16
    x = {k: v.clone().to(device) for k, v in _inputs(n, Mb, HD, D, seed=9, device=device).items()}
    if bad == "kap rows":
        x["kap"] = x["kap"][:-1]
    elif bad == "Zw shape":
        x["Zw"] = x["Zw"][:, :-1]
    elif bad == "gx rows":
        x["gx"] = x["gx"][:-1]
    elif bad == "sigma length":
        x["sigma"] = x["sigma"][:-1]
    z = pair_global.z_operands(x["Zw"], x["Zv"], torch.float16) if bad == "z dtype" else None  # κ is fp32
    S0 = x["S"].clone()
    with pytest.raises(ValueError, match="add_pair_global"):
        add_pair_global(x["S"], x["col"], x["kap"], x["lam"], x["Zw"], x["Zv"], x["sigma"], x["gx"], 0.2, 1e-8, z=z)
    assert torch.equal(x["S"], S0)


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "bf16"), (torch.float32, "fp32")])
def test_launch_passes_the_argument_types_the_kernel_report_compiles(dtype, name, device):
    """bench/kernel_report.py builds the kernel with the argument types and 16-divisible
    integers a launch at H·DH and D multiples of 16 passes (fp32: Zw, Zv as fp16 pairs, their
    lo planes a multiple of 16 elements on)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from bench import kernel_report
    from bench.offline_compile import _ast_arguments

    calls = []

    class Recorder:  # stands in for the kernel: the launch's arguments, nothing run
        def __getitem__(self, grid):
            return lambda *a, **k: calls.append((a, k))

    x = {k: v.to(device) for k, v in _inputs(3, 5, 48, 32, seed=2, device=device).items()}
    kern, pair_global._pair_global_kernel = pair_global._pair_global_kernel, Recorder()
    try:
        add_pair_global(x["S"], x["col"], x["kap"].to(dtype), x["lam"].to(dtype), x["Zw"], x["Zv"], x["sigma"], x["gx"],
                        0.2, 1e-8, kap_scale=2.0, lam_scale=0.5)
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
