"""Bad input to the Python API (issue 14): checkpoints whose tensors or metadata lie
(items 8, 14), arguments of ``acf_similarity`` of the wrong type (item 20), and huge
finite features (item 9: the torch backend must not return NaN; eager and Triton
refuse what they cannot score)."""
import json

import numpy as np
import pytest
import torch

from acf_fast import acf_similarity
from acf_fast.model import ACF, CONFIG_KEY
from acf_fast.reference import reference_similarity


def rewrite(src, dst, *, state=None, config=None):
    """Copy checkpoint ``src`` to ``dst`` with some tensors or config entries replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.update(state or {})
    cfg = json.loads(meta[CONFIG_KEY])
    cfg.update(config or {})
    meta[CONFIG_KEY] = json.dumps(cfg)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    return ACF("paper", embed_dim=8, heads=2, region_dim=4, global_dim=4, text_dim=4).save(tmp_path / "m.safetensors")


# ------------------------------------------------------------------ item 8
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_weights_are_refused(ckpt, tmp_path, dtype):
    good = ACF.load(ckpt).state_dict()
    bad = rewrite(ckpt, tmp_path / "int.safetensors", state={"region_fc.weight": good["region_fc.weight"].to(dtype)})
    with pytest.raises(ValueError, match=r"int\.safetensors.*region_fc\.weight.*(int|bool|uint)"):
        ACF.load(bad)


def test_half_precision_weights_still_load(ckpt, tmp_path):
    good = ACF.load(ckpt).state_dict()
    half = rewrite(ckpt, tmp_path / "h.safetensors", state={k: v.half() for k, v in good.items()})
    m = ACF.load(half)
    assert all(torch.equal(m.state_dict()[k], v.half().float()) for k, v in good.items())


# ------------------------------------------------------------------ item 14
@pytest.mark.parametrize("entry", [{"embed_dim": 2**24, "heads": 8}, {"region_dim": 2**40}, {"text_dim": 6}])
def test_metadata_that_does_not_fit_the_tensors_is_refused_before_building(ckpt, tmp_path, entry):
    """A 2^24 embed_dim would be 2^48-element fusion matrices: refused from the header's
    shapes, without allocating the model."""
    bad = rewrite(ckpt, tmp_path / "meta.safetensors", config=entry)
    with pytest.raises(ValueError, match=r"meta\.safetensors"):
        ACF.load(bad)


# ------------------------------------------------------------------ item 20 (API)
def inputs(seed=0, N=2, M=3, K=4, L=5, D=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, K, D, generator=g), torch.randn(M, L, D, generator=g)


@pytest.mark.parametrize("kw, name", [
    (dict(u1=None), "u1"), (dict(u2=None), "u2"), (dict(u1="0.5"), "u1"), (dict(u1=True), "u1"),
    (dict(heads=True), "heads"), (dict(heads=2.0), "heads"), (dict(scale="45"), "scale"),
    (dict(scale=(True, 1.0)), "scale"), (dict(scale=("4", "9")), "scale"), (dict(scale=4.0), "scale"),
])
def test_wrong_argument_types_are_named(kw, name):
    V, W = inputs()
    args = dict(heads=2, u2=1.0)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        acf_similarity(V, None, W, None, backend="eager", **args)


# ------------------------------------------------------------------ item 9
def case(variant, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, K, M, L, D, H = 3, 5, 4, 6, 16, 2
    V, W = torch.randn(N, K, D, generator=g), torch.randn(M, L, D, generator=g)
    vm = torch.ones(N, K, dtype=torch.bool)
    vm[0, 3:] = False
    wm = torch.ones(M, L, dtype=torch.bool)
    wm[1, 2:] = False
    if variant == "acf-code":
        kw = dict(heads=H, scale=(4.0, 9.0), u1=0.5, u2=0.8,
                  global_emb=(torch.randn(N, D, generator=g), torch.randn(M, D, generator=g)))
        return V, vm, W, wm, kw
    torch.manual_seed(seed)
    weights = {k: v.detach() for k, v in ACF("paper", embed_dim=D, heads=H).fusion_weights().items()}
    return V, vm, W, wm, dict(heads=H, u1=0.5, u2=0.8, weights=weights, G=torch.randn(N, D, generator=g))


def f64(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) else
                {n: t.double() for n, t in v.items()} if isinstance(v, dict) else
                tuple(t.double() for t in v) if k == "global_emb" else v) for k, v in kw.items()}


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
@pytest.mark.parametrize("side, factor", [("V", 1e20), ("V", 1e30), ("W", 1e20), ("both", 1e15), ("V", 1e-30)])
def test_torch_backend_is_right_for_huge_finite_features(variant, side, factor):
    V, vm, W, wm, kw = case(variant)
    if side in ("V", "both"):
        V = V * factor
        if "G" in kw:
            kw["G"] = kw["G"] * factor
    if side in ("W", "both"):
        W = W * factor
    want = reference_similarity(V.double(), vm, W.double(), wm, **f64(kw))
    assert torch.isfinite(want).all()
    got = acf_similarity(V, vm, W, wm, backend="torch", **kw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)


def test_torch_backend_gradient_is_finite_for_huge_features():
    V, vm, W, wm, kw = case("paper")
    V = (V * 1e20).requires_grad_()
    acf_similarity(V, vm, W, wm, backend="torch", **kw).sum().backward()
    assert torch.isfinite(V.grad).all()


def test_unit_scale_features_are_scored_exactly_as_before():
    """Features within [-1, 1] are not rescaled: bit-identical to the unscaled algebra."""
    from acf_fast.fused_torch import _torch_similarity
    from acf_fast.notation import EPS

    V, vm, W, wm, kw = case("paper")
    V, W = V / V.abs().max(), W / W.abs().max()
    kw["G"] = kw["G"] / kw["G"].abs().max()
    kw["scale"] = (0.25, 0.25)
    got = acf_similarity(V, vm, W, wm, backend="torch", **kw)
    assert torch.equal(got, _torch_similarity(V, vm, W, wm, eps=EPS, global_emb=None, **kw))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rescaling_backends_refuse_when_the_logits_themselves_overflow(backend, device):
    V, vm, W, wm, kw = on(device, *case("acf-code"))
    with pytest.raises(ValueError, match="overflow"):
        acf_similarity(V * 1e25, vm, W * 1e25, wm, backend=backend, **kw)


def on(device, V, vm, W, wm, kw):
    """An acf-code ``case`` moved to ``device``."""
    return (V.to(device), vm.to(device), W.to(device), wm.to(device),
            {k: (tuple(t.to(device) for t in v) if k == "global_emb" else v) for k, v in kw.items()})


@pytest.mark.parametrize("backend", ["eager"])
def test_float32_backends_that_cannot_rescale_refuse_huge_features(backend, device):
    """Eager returned 0.0 for V x 1e20 (reference ~0.45)."""
    V, vm, W, wm, kw = on(device, *case("acf-code"))
    with pytest.raises(ValueError, match=r"backend='torch'"):
        acf_similarity(V * 1e20, vm, W, wm, backend=backend, **kw)
    acf_similarity(V.double() * 1e20, vm, W.double(), wm, backend="eager", **f64(kw))  # float64 has the range


# The Triton kernel gave ~1e28 for V x 1e20 (float32 Gram forms overflowed); it now rescales
# as the torch backend does (kernels/similarity.py, fused_torch.magnitude_scales).
@pytest.mark.parametrize("variant", ["acf-code", "paper"])
def test_triton_backend_is_right_for_huge_finite_features(variant, device):
    V, vm, W, wm, kw = on(device, *case(variant))
    V = V * 1e20
    want = reference_similarity(V.double(), vm, W.double(), wm, **f64(kw))
    got = acf_similarity(V, vm, W, wm, backend="triton", **kw)
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-4, rtol=0)
