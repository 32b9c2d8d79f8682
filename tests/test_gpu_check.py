"""bench/gpu_check.py runs end to end under the interpreter and cannot pass wrong (issue 10).

The script is the one GPU check of the project; here it runs with ``--smoke`` (tiny
shapes, Triton interpreter, fp32), once as is and once with ``--plant-wrong``, which
adds 0.01 to every kernel score before the contract checks: that run must exit
non-zero and name the contract it broke.
"""
import json

from bench import gpu_check


def _run(tmp_path, *extra):
    args = gpu_check.parse_args(["--smoke", "--no-rerank", "--variants", "acf-code", "--out", str(tmp_path), *extra])
    rc = gpu_check.main(args)
    return rc, json.loads((tmp_path / "gpu_check-smoke.json").read_text())


def test_smoke_passes_and_records_every_step(tmp_path):
    rc, rec = _run(tmp_path)
    assert rc == 0, rec["failures"]
    (r,) = rec["results"]
    assert r["variant"] == "acf-code" and r["dtype"] == "fp32" and not r["failures"]
    assert r["v2_vs_float64"] <= 1e-4 and r["v1_vs_float64"] <= 1e-4 and r["torch64_vs_reference"] <= 1e-9
    for key in ("v2_end_to_end", "v1_kernel", "torch", "eager"):
        assert r["per_pair_s"][key] > 0
    assert r["full_end_to_end_s"] > 0 and r["full_vs_check_slice"] <= 1e-4
    assert sum(b["pairs"] for b in r["full_per_bucket"].values()) == r["N"] * r["M"]
    # the compile-ahead step collected the case's launches (nothing to build in the interpreter)
    assert "error" not in rec["compile_ahead"] and rec["compile_ahead"]["requests"] >= 1


def test_planted_wrong_result_fails_the_check(tmp_path):
    rc, rec = _run(tmp_path, "--plant-wrong")
    assert rc != 0
    assert any("contract: v2_vs_float64" in f for f in rec["failures"]), rec["failures"]
