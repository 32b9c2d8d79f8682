"""acf_fast.model.ACF: encoders, fusion weights, scores against the float64 per-pair
reference of the spec, checkpoints (round trip, corrupt files, config mismatch)."""
import json

import pytest
import torch

from acf_fast import acf_similarity
from acf_fast.model import ACF
from acf_fast.reference import reference_similarity

DIMS = dict(embed_dim=32, heads=4, region_dim=24, global_dim=20, text_dim=16)
FUSION = ("z_x", "z_y", "z_o", "x_w", "x_v", "x_g", "gate")


def _inputs(seed=0, N=3, K=5, M=4, L=6, Dv=24, Dg=20, Db=16):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(N, K, Dv, generator=g)
    globals_ = torch.randn(N, Dg, generator=g)
    words = torch.randn(M, L, Db, generator=g)
    rmask = torch.ones(N, K, dtype=torch.bool)
    rmask[0, 3:] = False  # ragged: image 0 has 3 regions, image 2 has 4
    rmask[2, 4:] = False
    wmask = torch.zeros(M, L, dtype=torch.bool)
    for t, n in enumerate((6, 2, 5, 3)[:M]):
        wmask[t, :n] = True
    # Garbage in the invalid rows must not leak anywhere.
    regions[~rmask] = 1e3
    words[~wmask] = -1e3
    return regions, rmask, globals_, words, wmask


def _model(variant, seed=0, **kw):
    torch.manual_seed(seed)
    m = ACF(variant, **{**DIMS, **kw})
    if variant == "paper":
        with torch.no_grad():  # move well away from the identity init so z_* matter
            for name in m.fusion_names:
                getattr(m, name).add_(0.3 * torch.randn_like(getattr(m, name)))
    return m


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_encode_shapes_and_unit_rows(variant):
    m = _model(variant)
    regions, rmask, globals_, words, wmask = _inputs()
    V, G = m.encode_images(regions, rmask, globals_)
    W = m.encode_texts(words, wmask)
    assert V.shape == (3, 5, 32) and G.shape == (3, 32) and W.shape == (4, 6, 32)
    assert V.dtype == W.dtype == G.dtype == torch.float32
    torch.testing.assert_close(V.norm(dim=-1)[rmask], torch.ones(int(rmask.sum())))
    torch.testing.assert_close(G.norm(dim=-1), torch.ones(3))
    assert (V[~rmask] == 0).all() and (W[~wmask] == 0).all()
    # Encoders as spec §1, computed in float64 by hand.
    Wr, br = m.region_fc.weight.double(), m.region_fc.bias.double()
    want = regions.double() @ Wr.T + br
    want = want / want.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(V[rmask].double(), want[rmask], atol=1e-6, rtol=1e-5)
    # Words: paper l2norm(Hb Wt + bt); acf-code Hb Wt + bt unnormalised (the authors' code).
    P = words.double() @ m.text_fc.weight.double().T + m.text_fc.bias.double()
    if variant == "paper":
        P = P / P.norm(dim=-1, keepdim=True)
    else:
        assert W.norm(dim=-1)[wmask].min() > 1.5  # not unit rows
    torch.testing.assert_close(W[wmask].double(), P[wmask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.finish_texts(m.project_texts(words), wmask), W, atol=0, rtol=0)
    Tv = m.text_vectors(W, wmask)
    mean = torch.stack([W[t][wmask[t]].double().mean(0) for t in range(4)])
    torch.testing.assert_close(Tv.double(), mean / mean.norm(dim=-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_global_defaults_to_mean_of_valid_regions():
    m = ACF("paper", embed_dim=32, heads=4, region_dim=24, global_dim=24, text_dim=16)
    regions, rmask, _, _, _ = _inputs()
    _, G = m.encode_images(regions, rmask, None)
    g = torch.stack([regions[i][rmask[i]].double().mean(0) for i in range(3)])
    want = g @ m.global_fc.weight.double().T + m.global_fc.bias.double()
    torch.testing.assert_close(G.double(), want / want.norm(dim=-1, keepdim=True), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="global_dim"):
        _model("paper").encode_images(regions, rmask, None)  # Dg 20 != Dv 24


def test_parameter_names_and_init():
    paper, code = ACF("paper", **DIMS), ACF("acf-code", **DIMS)
    assert set(paper.fusion_weights()) == set(FUSION)
    assert code.fusion_weights() == {}
    for name in FUSION:
        assert isinstance(getattr(paper, name), torch.nn.Parameter)
        assert not hasattr(code, name)
    assert (paper.gate == 0).all()
    assert (paper.z_x - torch.eye(32)).abs().max() < 0.05  # near identity, not equal
    assert not torch.equal(paper.z_x, paper.z_y)
    for fc in (paper.region_fc, paper.global_fc, paper.text_fc):
        bound = (6 / sum(fc.weight.shape)) ** 0.5  # xavier-uniform
        assert fc.weight.abs().max() <= bound and (fc.bias == 0).all()
    with pytest.raises(ValueError, match="variant"):
        ACF("bogus")
    with pytest.raises(ValueError, match="divisible"):
        ACF("paper", embed_dim=30, heads=4)


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_score_matches_float64_reference(variant):
    m = _model(variant, seed=1)
    regions, rmask, globals_, words, wmask = _inputs(seed=1)
    V, G = m.encode_images(regions, rmask, globals_)
    W = m.encode_texts(words, wmask)
    S = m.score(V, rmask, G, W, wmask, backend="eager")
    assert S.shape == (3, 4) and S.dtype == torch.float32
    d = 32 // 4
    scale = (d ** -0.5, d ** -0.5) if variant == "paper" else (4.0, 9.0)
    if variant == "paper":
        want = reference_similarity(V, rmask, W, wmask, heads=4, scale=scale, u1=0.5, u2=0.8,
                                    weights={k: getattr(m, k) for k in FUSION}, G=G)
    else:
        Gt = torch.stack([W[t][wmask[t]].double().mean(0) for t in range(4)])
        Gt = Gt / Gt.norm(dim=-1, keepdim=True)
        want = reference_similarity(V, rmask, W, wmask, heads=4, scale=scale, u1=0.5, u2=0.8,
                                    global_emb=(G.double(), Gt))
    torch.testing.assert_close(S.double(), want, atol=1e-5, rtol=0)
    direct = acf_similarity(V, rmask, W, wmask, heads=4, scale=scale, u1=0.5, u2=0.8,
                            weights=m.fusion_weights() or None,
                            G=G if variant == "paper" else None,
                            global_emb=None if variant == "paper" else (G, m.text_vectors(W, wmask)),
                            backend="eager")
    torch.testing.assert_close(S, direct, atol=0, rtol=0)


def test_u_overrides_and_forward():
    m = _model("paper", u1=0.6, u2=1.0)
    regions, rmask, globals_, words, wmask = _inputs(seed=2)
    S = m(regions, rmask, globals_, words, wmask, backend="eager")
    V, G = m.encode_images(regions, rmask, globals_)
    W = m.encode_texts(words, wmask)
    want = reference_similarity(V, rmask, W, wmask, heads=4, u1=0.6, u2=1.0,
                                weights={k: getattr(m, k) for k in FUSION}, G=G)
    torch.testing.assert_close(S.double(), want, atol=1e-5, rtol=0)


def test_without_cmf_the_global_score_is_partner_free():
    m = _model("paper", seed=6, cmf=False, u2=0.7)
    assert set(m.fusion_weights()) == {"z_x", "z_y", "z_o"}  # no x_w, x_v, x_g, gate
    assert not any(hasattr(m, k) for k in ("x_w", "x_v", "x_g", "gate"))
    regions, rmask, globals_, words, wmask = _inputs(seed=6)
    V, G = m.encode_images(regions, rmask, globals_)
    W = m.encode_texts(words, wmask)
    S = m.score(V, rmask, G, W, wmask, backend="eager")
    # Spec §6 [choice]: S = u2 S_local + (1 - u2) R(G, l2norm(mean of the valid w_j)), in float64.
    tv = torch.stack([W[t][wmask[t]].double().mean(0) for t in range(4)])
    glob = torch.stack([torch.stack([torch.dot(G[i].double(), tv[t]) / (G[i].double().norm() * tv[t].norm())
                                     for t in range(4)]) for i in range(3)])
    local = reference_similarity(V, rmask, W, wmask, heads=4, u1=0.5, u2=1.0,
                                 weights={k: getattr(m, k) for k in ("z_x", "z_y", "z_o")})
    torch.testing.assert_close(S.double(), 0.7 * local + 0.3 * glob, atol=1e-5, rtol=0)
    m.score(V, rmask, G, W, wmask, backend="torch").sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with pytest.raises(ValueError, match="no cross-modal fusion"):
        ACF("acf-code", cmf=False, **DIMS)


def test_u_range_and_word_norm_checked(tmp_path):
    with pytest.raises(ValueError, match="u2"):
        ACF("paper", u2=1.5, **DIMS)
    with pytest.raises(ValueError, match="word_norm"):
        ACF("paper", word_norm="l1", **DIMS)
    # A checkpoint from before word_norm existed normalised the words in both variants.
    from safetensors.torch import save_file

    m = _model("acf-code", word_norm="l2")
    cfg = {k: v for k, v in m.config.items() if k not in ("word_norm", "cmf")}
    old = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(old),
              metadata={"acf_config": json.dumps(cfg), "format": "pt"})
    back = ACF.load(old)
    assert back.word_norm == "l2" and back.cmf
    assert ACF("acf-code", **DIMS).word_norm == "none" and ACF("paper", **DIMS).word_norm == "l2"


def test_gradients_reach_every_parameter():
    m = _model("paper", seed=3)
    regions, rmask, globals_, words, wmask = _inputs(seed=3)
    m(regions, rmask, globals_, words, wmask, backend="eager").sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_save_load_round_trip(tmp_path, variant):
    m = _model(variant, seed=4)
    path = m.save(tmp_path / "ckpt.safetensors", metadata={"epoch": 7})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]  # no temp file left
    back = ACF.load(path)
    assert back.config == m.config
    assert ACF.read_metadata(path)["epoch"] == "7"
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    regions, rmask, globals_, words, wmask = _inputs(seed=4)
    S1 = m(regions, rmask, globals_, words, wmask, backend="eager")
    S2 = back(regions, rmask, globals_, words, wmask, backend="eager")
    assert torch.equal(S1, S2)
    # Overwriting keeps a loadable file.
    _model(variant, seed=5).save(path)
    assert not torch.equal(ACF.load(path).region_fc.weight, back.region_fc.weight)


def test_corrupt_checkpoint_refused(tmp_path):
    path = _model("paper").save(tmp_path / "m.safetensors")
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        ACF.load(bad)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.safetensors"):
        ACF.load(junk)
    with pytest.raises(FileNotFoundError):
        ACF.load(tmp_path / "absent.safetensors")


def test_config_mismatch_refused(tmp_path):
    from safetensors.torch import save_file

    m = _model("paper")
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    cfg = dict(m.config, embed_dim=64)  # metadata disagrees with the tensors
    lying = tmp_path / "lying.safetensors"
    save_file(state, str(lying), metadata={"acf_config": json.dumps(cfg), "format": "pt"})
    with pytest.raises(ValueError, match="lying.safetensors"):
        ACF.load(lying)
    no_cfg = tmp_path / "plain.safetensors"
    save_file(state, str(no_cfg))
    with pytest.raises(ValueError, match="not an acf-fast checkpoint"):
        ACF.load(no_cfg)
    good = m.save(tmp_path / "good.safetensors")
    with pytest.raises(ValueError, match="variant"):
        ACF.load(good, expect={"variant": "acf-code"})
    assert ACF.load(good, expect={"variant": "paper", "text_dim": 16}).config == m.config


def test_bad_inputs_refused():
    m = _model("paper")
    regions, rmask, globals_, words, wmask = _inputs()
    with pytest.raises(ValueError, match="regions"):
        m.encode_images(regions[..., :10], rmask, globals_)
    with pytest.raises(ValueError, match="region_mask"):
        m.encode_images(regions, rmask[:, :2], globals_)
    with pytest.raises(ValueError, match="globals"):
        m.encode_images(regions, rmask, globals_[:2])
    with pytest.raises(ValueError, match="word_mask"):
        m.encode_texts(words, wmask.int())
