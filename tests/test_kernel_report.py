"""The offline kernel report (issue 10, point 3): what an sm_90 build of the shipped tile
kernel says, on every commit, without a GPU.

Builds the bf16 configurations of kernel v2 for the COCO shape's buckets (16 and 32 tokens),
the fp32 acf-code one at bucket 16 and paper's pairwise global score kernel (both dtype
paths), through bench/kernel_report.py (compiled in a child process:
tests/conftest.py interprets Triton). Checks that every main dot is a warp-group MMA, that
the trip-count mapping reproduces the tensor-core work the design says a tile does (the
report raises otherwise), and the issue's targets. Targets not met yet are strict xfails: they say so, and they fail
the day the kernel meets them, so the marker must go.
"""
import pytest
import triton

from bench import kernel_report


@pytest.fixture(scope="module")
def records():
    recs = kernel_report.v2_records(("acf-code", "paper"), ("bf16",), log=lambda *_: None, buckets=(16, 32))
    return {(r["variant"], r["bucket"], r["num_stages"], r["head_passes"]): r for r in recs}


@pytest.fixture(scope="module")
def global_records():
    """kernels/pair_global.py (paper's pairwise global score after the tiles), both dtype paths:
    global_records raises if its trip counts miss the design's tensor-core work."""
    return {r["dtype"]: r for r in kernel_report.global_records(("bf16", "fp32"), log=lambda *_: None)}


def test_the_global_score_kernel_builds_without_spills_on_wgmma(global_records):
    """Both products of every chunk on warp-group MMA (fp32: three fp16 products each), no
    spill, within sm_90's shared memory, and per pair the (H·DH) x D and (H·K) x D products
    (K: the tiles' 40 rows per image)."""
    for dt, r in global_records.items():
        assert r["spill_bytes"] == 0 and r["spill_instructions_per_pair"] == 0, (dt, r["spill_bytes"])
        assert r["wgmma"] and r["main_dots"] == (6 if dt == "fp32" else 2), (dt, r["dots_wgmma"], r["main_dots"])
        assert r["shared_bytes"] <= kernel_report.SM90_SHARED_LIMIT
        HK = kernel_report.H * 40
        assert r["tensor_core_macs_per_pair"] == (kernel_report.D + HK) * kernel_report.D * (3 if dt == "fp32" else 1)


def _at16(records, variant):
    return [r for (v, b, _, _), r in records.items() if v == variant and b == 16]


def test_every_main_dot_is_wgmma(records):
    for r in records.values():
        assert r["wgmma"], f"{r['variant']} bucket {r['bucket']}: {r['dots_wgmma']} of {r['main_dots']} main dots on wgmma"
        # acf-code: the two logits dots and q·Γv, and p·Γw where it is not batched per text (tiles.batched_gw)
        assert r["main_dots"] >= (3 if r["batched_gw"] else 4)


def test_every_shipped_configuration_fits_in_shared_memory(records):
    """A configuration over sm_90's 227 KiB per block would fail to launch: the autotuner
    must never be offered one."""
    for r in records.values():
        assert r["shared_dynamic_bytes"] <= kernel_report.SM90_SHARED_LIMIT, \
            f"{r['variant']} stages {r['num_stages']} passes {r['head_passes']}: {r['shared_dynamic_bytes']} B"


def test_paper_bf16_under_its_instruction_target(records):
    for r in _at16(records, "paper"):
        assert r["warp_instructions_per_pair"] <= kernel_report.TARGETS[("v2", "paper", "bf16")]


def _triton_at_least(major, minor):
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (major, minor)


def test_acf_code_bf16_under_its_instruction_target(records):
    """Bucket 16. At bucket 32 (twice the tokens per pair) the tile takes 11.5 K warp-instructions
    per pair (triton 3.9): the keys' mask bias (tiles.mask_bias_pays) would bring it to 9.9 K
    but adds tensor-core work to a tile that tensor cores bound, so it is not shipped there."""
    for r in _at16(records, "acf-code"):
        assert r["warp_instructions_per_pair"] <= kernel_report.TARGETS[("v2", "acf-code", "bf16")]


def test_two_pass_acf_code_tiles_spend_under_one_percent_of_their_instructions_on_spills(records):
    """What spills are left in the tiles a GPU tries first sit once per tile or a few per head:
    the regions -> words means no longer stay live through the second pass (they did: 1.07 %
    at bucket 16, 72 spill instructions per tile and 23 in every head). That is triton 3.9's
    build; triton 3.6 (the GPU machine's) keeps more of them in the loops: 0.7-2.2 %
    (bench/results/kernels/kernel-report-sm90-triton3.6-*.json), bounded at 4 %."""
    limit = 0.01 if _triton_at_least(3, 9) else 0.04
    for (v, _, _, passes), r in records.items():
        if v == "acf-code" and passes == 2:
            assert r["spill_instructions_per_pair"] <= limit * r["warp_instructions_per_pair"], \
                f"stages {r['num_stages']}: {r['spill_instructions_per_pair']:.0f} of {r['warp_instructions_per_pair']:.0f}"


@pytest.fixture(scope="module")
def fp32_acf_code():
    recs = kernel_report.v2_records(("acf-code",), ("fp32",), log=lambda *_: None, buckets=(16,))
    assert len(recs) == 1
    return recs[0]


def test_fp32_acf_code_tile_is_f16x3_on_wgmma_at_under_two_and_a_half_bf16_tiles(records, fp32_acf_code):
    """The fp32 path (fp16 pairs, three fp16 products per dot) against the bf16 tile it must
    stay within 3x of on a GPU (issue 10): tf32x3, splitting in registers, issued 3.4x
    (22.8 K warp-instructions per pair, 2.5 KB of spills); f16x3 1.7x (2.0x while its lo
    planes were 16-bit loads)."""
    r = fp32_acf_code
    # 9 main dots (three f16x3 products of the two logits dots and of q·Γv); p·Γw is batched per
    # text at bucket 16 (tiles.batched_gw: 3 mma.sync dots, not main dots)
    assert r["dots"] == "f16x3" and r["wgmma"] and r["main_dots"] >= 9
    assert r["shared_dynamic_bytes"] <= kernel_report.SM90_SHARED_LIMIT
    bf16 = records[("acf-code", 16, 1, 2)]
    assert r["warp_instructions_per_pair"] <= 2.5 * bf16["warp_instructions_per_pair"], \
        f"{r['warp_instructions_per_pair']:.0f} vs bf16 {bf16['warp_instructions_per_pair']:.0f}"


def test_leanest_acf_code_bf16_tiles_spill_little(records):
    """acf-code's bf16 tiles in the configuration a GPU tries first (one stage, two passes over
    the heads), triton 3.9's build: at most 80 B spilled, under 0.5 % of the instructions. They
    spilled nothing before the keys' mask bias at bucket 16 (68 B with it, for 15 % fewer
    instructions per pair) and p·Γw's column halves at bucket 32 (56 B, for 12.5 % less
    tensor-core work); the floors over the COCO grid went 1.07 -> 0.92 s. Triton 3.6 (the GPU
    machine's) spills more there: bench/results/kernels/kernel-report-sm90-triton3.6-*.json."""
    if not _triton_at_least(3, 9):
        pytest.skip(f"triton {triton.__version__}: its ptxas input spills these tiles more (docstring)")
    for b in (16, 32):
        r = records[("acf-code", b, 1, 2)]
        assert r["spill_bytes"] <= 80 and r["spill_instructions_per_pair"] <= 0.005 * r["warp_instructions_per_pair"], \
            (b, r["spill_bytes"], r["spill_instructions_per_pair"])


@pytest.mark.xfail(strict=True, reason="8-warp bf16 tiles still spill up to 0.6 KB per thread (triton 3.9: acf-code "
                                       "56-152 B, 68 / 56 B in its leanest configuration; paper 0.3-0.6 KB, much of it "
                                       "in its loops over the heads; triton 3.6 acf-code 0.1-0.3 KB, paper 0.2-0.3 KB): "
                                       "open. The global score's kernel does not spill (its own test)")
def test_no_shipped_configuration_spills(records):
    for r in records.values():
        assert r["spill_bytes"] == 0, f"{r['variant']} bucket {r['bucket']} stages {r['num_stages']}: {r['spill_bytes']} B"


@pytest.mark.xfail(strict=True, reason="bucket 16 pads COCO's mean 12.5 tokens to 16 and 36 regions to 42.7: 0.64 "
                                       "(0.77 even with no region padding)")
def test_padding_efficiency_at_coco_lengths(records):
    for r in records.values():
        assert r["padding_efficiency"] >= kernel_report.MIN_PADDING_EFFICIENCY


def test_grid_floor_adds_each_buckets_larger_bound_for_its_best_configuration():
    """bench/kernel_report.grid_estimates on records with round counts, against the sums by
    hand: 1000 SMs x 1 scheduler at 1 GHz issue 1e12 warp-instructions per second, tensor
    cores at 2e15 FLOP/s do 1e15 multiply-adds per second, L2 moves 1e11 bytes per second
    (beside the floor, for the configuration the floor chose)."""
    gpu = dict(sms=1000, clock_hz=1e9, schedulers=1, tensor_flops=2e15, l2_bytes_per_s=1e11)

    def rec(bucket, wi, macs, stages=1, gb=1e3):
        return dict(version="v2", variant="acf-code", dtype="bf16", bucket=bucket, num_stages=stages, head_passes=2,
                    warp_instructions_per_pair=wi, tensor_core_macs_per_pair=macs, global_bytes_per_pair=gb)

    recs = [rec(16, 8_000, 3e6, gb=2e3), rec(16, 5_000, 9e6, stages=2),  # 8 ms / 3 ms; 5 ms / 9 ms: the first
            rec(32, 20_000, 1e6, gb=4e3)]  # 10 ms issue-bound
    est = kernel_report.grid_estimates(recs, gpu=gpu, grid=(100_000, 15), texts_per_bucket={16: 10, 32: 5})
    assert len(est) == 1
    e = est[0]
    by_bucket = {p["bucket"]: p for p in e["per_bucket"]}
    assert by_bucket[16]["num_stages"] == 1 and by_bucket[16]["pairs"] == 1_000_000
    assert by_bucket[16]["issue_s"] == pytest.approx(8e-3) and by_bucket[16]["tensor_s"] == pytest.approx(3e-3)
    assert by_bucket[32]["pairs"] == 500_000 and by_bucket[32]["floor_s"] == pytest.approx(10e-3)
    assert e["floor_s"] == pytest.approx(18e-3) and e["target_s"] == 2.0
    # 1e6 pairs x 2 KB and 5e5 x 4 KB at 1e11 B/s: 20 ms each, more than the floor, not in it
    assert by_bucket[16]["l2_s"] == pytest.approx(20e-3) and e["l2_s"] == pytest.approx(40e-3)
    with pytest.raises(ValueError, match="bucket 64"):
        kernel_report.grid_estimates(recs, gpu=gpu, grid=(100_000, 15), texts_per_bucket={16: 10, 64: 5})


def test_grid_floor_adds_the_global_score_kernel_to_its_variant():
    """A record of the pairwise global score's kernel (part "global score") adds its floor
    over all N x M pairs to the floor of its variant's tiles, not to another variant's."""
    gpu = dict(sms=1000, clock_hz=1e9, schedulers=1, tensor_flops=2e15, l2_bytes_per_s=1e11)

    def rec(variant, wi, macs, **kw):
        return dict(dict(version="v2", variant=variant, dtype="bf16", bucket=16, num_stages=1, head_passes=2,
                         warp_instructions_per_pair=wi, tensor_core_macs_per_pair=macs, global_bytes_per_pair=1e3), **kw)

    recs = [rec("acf-code", 8_000, 3e6), rec("paper", 8_000, 3e6),
            rec("paper", 1_000, 4e6, part="global score", bucket="all")]  # 1 ms issue, 4 ms tensor at 1e6 pairs
    est = {e["variant"]: e for e in kernel_report.grid_estimates(recs, gpu=gpu, grid=(100_000, 10),
                                                                  texts_per_bucket={16: 10})}
    assert est["acf-code"]["floor_s"] == pytest.approx(8e-3) and est["acf-code"]["global_score"] is None
    g = est["paper"]["global_score"]
    assert g["pairs"] == 1_000_000 and g["floor_s"] == pytest.approx(4e-3) and g["l2_s"] == pytest.approx(10e-3)
    assert est["paper"]["floor_s"] == pytest.approx(12e-3) and est["paper"]["tensor_s"] == pytest.approx(7e-3)
    assert est["paper"]["l2_s"] == pytest.approx(20e-3) and len(est["paper"]["per_bucket"]) == 1

    # one image against 8 texts per program: 10 texts of a bucket take two programs, 16 rows
    recs[-1]["pairs_per_program"] = 8
    est = {e["variant"]: e for e in kernel_report.grid_estimates(recs, gpu=gpu, grid=(100_000, 10),
                                                                  texts_per_bucket={16: 10})}
    g = est["paper"]["global_score"]
    assert g["pairs"] == 1_000_000 and g["rows"] == 1_600_000 and g["floor_s"] == pytest.approx(6.4e-3)


def test_bf16_floors_on_the_coco_grid_leave_room_under_the_gpu_targets(records, global_records):
    """Issue 10's H200 targets for the full 5K x 25K bf16 grid (acf-code 2 s, paper 6 s)
    against the offline floor of the shipped tiles, paper's with its global score's kernel
    (bench/kernel_report.grid_estimates): a real kernel runs slower than its floor, so a
    floor above ~2/3 of the target would say the design cannot make it whatever a GPU
    measures."""
    est = kernel_report.grid_estimates(list(records.values()) + [global_records["bf16"]])
    assert [e["global_score"] is not None for e in est] == [e["variant"] == "paper" for e in est]
    for e in est:
        assert e["floor_s"] <= e["target_s"] * 2 / 3, \
            f"{e['variant']}: floor {e['floor_s']:.2f} s (issue {e['issue_s']:.2f}, tensor {e['tensor_s']:.2f})"


def test_two_pass_tiles_read_the_features_twice(records):
    """global_bytes_per_pair (offline_compile.dynamic_global_bytes) against the design: per
    head, the acf-code tile reads its images' and texts' features (128 x 128 bf16 each) once
    in one pass over the heads and twice in two (regions -> words, then words -> regions);
    paper, whose O differs from Q, reads three and writes its attention to the scratch slot."""
    tile = 128 * 128 * 2  # one side's features of one head of a tile, bf16
    for (v, b, stages, passes), r in records.items():
        pairs = r["pairs_per_program"]
        loads, stores = r["global_load_bytes"] / pairs, r["global_store_bytes"] / pairs
        if v == "acf-code":
            assert loads >= passes * 2 * 8 * tile / pairs, (b, stages, passes, loads)
            # and per head at most a tile's worth of Γw and of Γv blocks (their masked lanes counted),
            # 10 % for the rest (masks, norms, S); a pipelined loop counts stages - 1 heads' loads more
            assert loads <= 1.1 * (passes * 2 + 2) * (8 + stages - 1) * tile / pairs, (b, stages, passes, loads)
        else:
            assert loads >= 2 * 3 * 8 * tile / pairs and stores >= 2 * 8 * tile / pairs, (b, loads, stores)
    for b in (16, 32):
        one, two = records[("acf-code", b, 1, 1)], records[("acf-code", b, 1, 2)]
        assert 1.3 * one["global_load_bytes"] < two["global_load_bytes"] < 2 * one["global_load_bytes"]
