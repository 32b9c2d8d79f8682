"""How the tiles (kernels/tiles.py) keep invalid keys and missing items out of S:

- a logit bias (MASK_BIAS, from one K = 16 product) on invalid keys where it pays and the
  softmax scale lets it mask them, a select per logit elsewhere (scaled first where the
  scale is not positive), chosen per direction (tiles.mask_mode); launch_tiles(mask_bias=
  True) takes the bias wherever the scale allows, so both paths run on every variant;
- feature loads without masks, which read past each side's last item into the zero slack
  every plan keeps after its feature tensors.

Both paths of both directions against the float64 reference under the interpreter, with
ragged masks and N, M that are not multiples of the tile; the slack filled with other
values; a plan without slack refused before anything is written.
"""
import dataclasses

import pytest
import torch

from acf_fast.kernels import tiles
from inputs import ALL_WEIGHTS, launch_tile_plan, make_case, reference, score, tile_plan
from tolerances import assert_scores_close

# id, variant, weights, (N, M, K, L), (rows, cols): 7 images of 6 regions (laid out as 8) in tiles
# of 2, texts of up to 20 tokens in buckets 16 and 32 (2 and 1 per 32-column tile)
CASES = [
    ("acf-code", "acf-code", None, (7, 9, 6, 20), (16, 32)),
    ("paper", "paper", ALL_WEIGHTS, (7, 9, 6, 20), (16, 32)),
    ("local-zo", "local", ("z_o",), (5, 7, 6, 20), (16, 32)),  # O != Q: the numerators from their own dot
    # 8 texts of bucket 16 per 128-column tile: batched p·Γw, where the GPU's bf16 tile ships the bias
    ("acf-code-8-texts", "acf-code", None, (5, 19, 5, 20), (16, 128)),
]

# (s_i2t, s_t2i) and the masking modes (MASK_I2T, MASK_T2I) they get with mask_bias=True
SCALES = [
    ((4.0, 9.0), ("bias", "bias")),
    ((-2.0, -3.0), ("signed", "signed")),  # until 2026-12-07 S was NaN, refused as an overflow
    ((0.0, 0.5), ("signed", "bias")),  # uniform attention over the valid words
    ((0.5, 1e-13), ("bias", "select")),  # too small for the bias to zero a weight (the fp32
]                                        # tiles divide it by their scale factors, ~2^25 here)


def _case(name, variant, wnames, shape, seed=11, scale=None):
    N, M, K, L = shape
    case = make_case(N, M, K, L, D=32, H=2, variant=variant, weights=wnames or (), seed=seed)
    if scale is not None:
        case["scale"] = scale
    return case


def _run(case, plan, tile, monkeypatch=None, seen=None, mask_bias=None):
    """S of ``case`` from ``plan`` on (rows, cols) = ``tile``; ``seen`` collects the launches'
    (MASK_I2T, MASK_T2I)."""
    if seen is not None:
        meta_of = tiles.tile_meta

        def recording(*a, **k):
            m = meta_of(*a, **k)
            seen.add((m["MASK_I2T"], m["MASK_T2I"]))
            return m

        monkeypatch.setattr(tiles, "tile_meta", recording)
    out = torch.full((case["V"].shape[0], case["W"].shape[0]), float("nan"))
    return launch_tile_plan(case, out, plan, rows=tile[0], cols=tile[1], global_pairs=2 * tile[1], mask_bias=mask_bias)


@pytest.mark.parametrize("bias", [True, None], ids=["bias", "chosen"])
@pytest.mark.parametrize("scale,flags", SCALES, ids=[f"s={s}" for s, _ in SCALES])
@pytest.mark.parametrize("name,variant,wnames,shape,tile", CASES, ids=[c[0] for c in CASES])
def test_bias_and_select_paths_match_float64_reference(name, variant, wnames, shape, tile, scale, flags, bias,
                                                       monkeypatch):
    case = _case(name, variant, wnames, shape, scale=scale)
    plan, _ = tile_plan(case)
    seen = set()
    S = _run(case, plan, tile, monkeypatch, seen, mask_bias=bias)
    # every launch (two buckets) took the paths the scales call for; the fp32 tiles (f16x3,
    # tensor-core bound) take no bias unless told
    if bias is None:
        flags = tuple("select" if f == "bias" else f for f in flags)
    assert seen == {flags}
    ref = reference(case)
    assert ref.std() > 1e-3
    assert_scores_close(S, ref, torch.float32, f"{name} scale={scale}")


@pytest.mark.parametrize("variant", ["acf-code", "paper"])
def test_zero_and_negative_scales_through_acf_similarity(variant):
    """Until 2026-12-07 the tile took the max of the raw logits and scaled it: with s < 0 the
    masked keys' weights were exp2(+inf), S was NaN and acf_similarity refused it as an
    overflow (ValueError)."""
    case = make_case(5, 6, 6, 9, D=32, H=2, variant=variant, seed=3)
    for scale in ((-2.0, -3.0), (0.0, -0.5)):
        case["scale"] = scale
        assert_scores_close(score(case, "triton"), reference(case), torch.float32, f"{variant} scale={scale}")


def test_scale_range_of_the_bias():
    ok = tiles.mask_bias_scale_ok
    assert ok(2.0**-40) and ok(1.0) and ok(2.0**40)
    assert not any(ok(s) for s in (0.0, -1.0, 2.0**-41, 2.0**41, float("inf")))


def test_the_bias_serves_the_batched_bf16_tile_only():
    """Where the offline report's floors say it pays (tiles.mask_bias_pays): acf-code's bf16
    tile at bucket 16 (8 texts, batched p·Γw), both directions."""
    def modes(LB, dot_prec, scale=(0.1, 0.1), full=False, mask_bias=None):
        m = tiles.tile_constexprs(8, 128, 40, LB, full=full, shared_qk=not full, o_is_q=not full, pairwise=full,
                                  embed=not full, HKP=320, dot_prec=dot_prec, scale=scale, mask_bias=mask_bias)
        return m["MASK_I2T"], m["MASK_T2I"]

    assert tiles.batched_gw(False, 8, 16)
    assert modes(16, "tf32") == ("bias", "bias")
    assert modes(32, "tf32") == modes(16, "f16x3") == modes(16, "tf32", full=True) == ("select", "select")
    assert modes(32, "f16x3", mask_bias=True) == ("bias", "bias")
    assert modes(16, "tf32", mask_bias=False) == ("select", "select")
    assert modes(16, "tf32", (-1.0, 0.0)) == modes(32, "tf32", (-1.0, 0.0), mask_bias=True) == ("signed", "signed")
    assert modes(16, "tf32", (1e-20, 1e20)) == ("select", "select")



def test_the_bias_waits_for_16_bit_storage():
    """fp32 tiles with allow_tf32 run dot_prec "tf32" as the bf16 / fp16 ones do, but on fp32
    storage at half their tensor-core rate, where the bias was never measured to pay: they keep
    the select. Until 2026-12-08 the choice went by dot_prec alone and gave them the bias."""
    case = make_case(3, 11, 4, 10, D=32, H=2, variant="acf-code", seed=12)
    for st, want in ((torch.float16, "bias"), (torch.bfloat16, "bias"), (torch.float32, "select")):
        plan, scale = tile_plan(case, st, split16=False)  # as triton_similarity(allow_tf32=True) plans fp32
        meta = tiles.tile_meta(plan, plan.buckets[0], dot_prec="tf32", embed=False, scale=scale)
        assert meta["BATCHED_GW"], st
        assert (meta["MASK_I2T"], meta["MASK_T2I"]) == (want, want), st

def _feature_tensors(plan):
    """(tensor, its lo-plane offset) for every feature tensor the tiles read without masks."""
    out = {}
    for side in (plan.images, *plan.buckets):
        for name in ("Q", "Kk", "O"):
            t = getattr(side, name)
            out[id(t)] = (t, tiles.lo_plane_offset(t) if side.split is not None else 0)
    return list(out.values())


def _fill_slack(plan, value):
    for t, lo in _feature_tensors(plan):
        flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
        flat[t.storage_offset() + lo + t.numel():] = value


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN slack, on purpose
@pytest.mark.parametrize("name,variant,wnames,shape,tile", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_reads_past_the_last_item_change_no_score(name, variant, wnames, shape, tile):
    """The last image tile (image 6 of 7, and a missing one) and the last text tiles read the
    slack after the features. Large values there change no bit of S, whichever way the keys
    are masked; NaN there changes S (with the bias, a missing key's weight, exp2 of NaN,
    meets Γ's zero rows: NaN · 0), which shows that the slack is read, and why plans keep it
    zero."""
    case = _case(name, variant, wnames, shape)
    plan, _ = tile_plan(case)
    for t, lo in _feature_tensors(plan):
        assert tiles.slack_after(t, lo) >= tiles.read_slack(t.shape[-1])
    ref = reference(case)
    for bias in (True, False):  # both ways of masking the keys: the bias product, the select
        clean = _run(case, plan, tile, mask_bias=bias)
        assert_scores_close(clean, ref, torch.float32, f"{name} bias={bias}")
        _fill_slack(plan, 3.0e4)
        assert torch.equal(_run(case, plan, tile, mask_bias=bias), clean), bias
        if bias:
            _fill_slack(plan, float("nan"))
            assert not torch.equal(_run(case, plan, tile, mask_bias=bias), clean)
            _fill_slack(plan, 0.0)


def test_a_plan_without_read_slack_is_refused_before_anything_is_written():
    case = _case("acf-code", "acf-code", None, (3, 4, 6, 20))
    plan, _ = tile_plan(case)
    # a hi plane whose lo plane ends its storage: what a plan made elsewhere than plan_tiles may hold
    hi = plan.images.Q
    lo_off = tiles.lo_plane_offset(hi)
    bare = torch.empty(lo_off + hi.numel(), dtype=hi.dtype)
    bare[:hi.numel()] = hi.reshape(-1)
    bare[lo_off:] = torch.empty(0, dtype=hi.dtype).set_(hi.untyped_storage())[
        hi.storage_offset() + lo_off:hi.storage_offset() + lo_off + hi.numel()]
    bare_q = bare[:hi.numel()].view(hi.shape)
    images = dataclasses.replace(plan.images, Q=bare_q, Kk=bare_q, O=bare_q)
    out = torch.full((3, 4), 7.0)
    with pytest.raises(RuntimeError, match="TileImages.Q has 0 elements after it"):
        launch_tile_plan(case, out, dataclasses.replace(plan, images=images))
    assert bool((out == 7.0).all())
    with pytest.raises(ValueError, match="rows = 256"):
        launch_tile_plan(case, out, plan, rows=256)
    assert bool((out == 7.0).all())
