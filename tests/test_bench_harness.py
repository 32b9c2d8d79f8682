"""Fast unit tests of the benchmark harness (bench/): FLOP formula, device record,
timing bookkeeping, derived figures, markdown writer, plots and README generator. The
per-query loops the benchmarks time are checked against the library in
tests/test_rerank.py and tests/test_evaluate.py. No timed assertions."""
import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from acf_fast.atomic import atomic_write_text
from acf_fast.commands.bench import _sizes, load_bench_package

load_bench_package()

from bench import cases, device, flops, markdown, readme, report, timing, workloads  # noqa: E402


# ----------------------------------------------------------------------------- FLOPs


def spec_pair_operations(K, L, D, H, variant):
    """The multiply-adds of one (image, text) pair, listed operation by operation as
    spec §8 describes the fused computation: (what, batch, m, n, k) for a batch of
    (m, k) @ (k, n) products. Written from the spec's prose, not from bench.flops."""
    d = D // H
    if variant == "paper":
        return [
            ("logits i2t: Qv_h Kw_hᵀ per head", H, K, L, d),
            ("logits t2i: Qw_h Kv_hᵀ per head", H, L, K, d),
            ("numerator i2t: Ov_h[i] Kw_hᵀ per head", H, K, L, d),
            ("numerator t2i: Ow_h[j] Kv_hᵀ per head", H, L, K, d),
            ("‖w*_i‖² = a_i Γw a_iᵀ, Γw (HL × HL), per region", K, 1, H * L, H * L),
            ("‖v*_j‖² = b_j Γv b_jᵀ, Γv (HK × HK), per word", L, 1, H * K, H * K),
            ("W_g = āᵀ (P^w_blk x_w): an HL-vector times (HL × D)", 1, 1, D, H * L),
            ("V_g = b̄ᵀ (σ ⊙ P^v_blk x_v): an HK-vector times (HK × D)", 1, 1, D, H * K),
        ]
    # acf-code: z_o = identity, so Γ is block-diagonal: H blocks of L × L (K × K).
    return [
        ("logits i2t per head", H, K, L, d),
        ("logits t2i per head", H, L, K, d),
        ("‖w*_i‖², H blocks L × L, per region", K * H, 1, L, L),
        ("‖v*_j‖², H blocks K × K, per word", L * H, 1, K, K),
    ]


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
def test_grid_flops_equal_the_spec_operations_summed_over_pairs(variant):
    rng = np.random.default_rng(0)
    K = rng.integers(5, 37, size=7)
    L = rng.integers(3, 33, size=11)
    D, H = 96, 4
    total = 0.0
    for k in K:  # every pair at its own valid lengths
        for l in L:
            total += sum(2.0 * b * m * n * kk for _, b, m, n, kk in spec_pair_operations(int(k), int(l), D, H, variant))
    assert flops.grid_flops(K, L, D, H, variant) == pytest.approx(total, rel=1e-12)
    assert flops.pair_flops(int(K[0]), int(L[0]), D, H, variant) == pytest.approx(
        flops.grid_flops(K[:1], L[:1], D, H, variant), rel=1e-12)


def test_flops_match_the_spec_figures():
    # spec §8: ≈ 10.3 M / 3.0 M MACs per pair at K=36, L=32, D=1024, H=8; 2.6 PFLOP for COCO 5K x 25K.
    assert flops.pair_macs(36, 32, 1024, 8, "paper") == pytest.approx(10.3e6, rel=0.01)
    assert flops.pair_macs(36, 32, 1024, 8, "acf-code") == pytest.approx(3.0e6, rel=0.01)
    total = flops.grid_flops([36] * 5000, [32] * 25000, 1024, 8, "paper")
    assert total == pytest.approx(2.6e15, rel=0.02)


def test_flops_reject_bad_input():
    with pytest.raises(ValueError, match="variant"):
        flops.pair_macs(36, 32, 1024, 8, "nope")
    with pytest.raises(ValueError, match="k_valid"):
        flops.grid_flops([], [3], 8, 2, "paper")
    assert math.isnan(flops.tflops(1e12, 0.0))
    assert flops.tflops(2e12, 2.0) == pytest.approx(1.0)


# ---------------------------------------------------------------------- device record


def test_cpu_device_record_fields():
    rec = device.device_record(torch.device("cpu"))
    assert rec["kind"] == "cpu"
    for key in ("name", "label", "date", "cpu_model", "cpu_count", "torch_threads", "versions"):
        assert rec[key] not in (None, ""), key
    for lib in ("python", "torch", "triton", "numpy"):
        assert lib in rec["versions"]
    assert re.fullmatch(r"[a-z0-9-]+", rec["label"])
    json.dumps(rec)  # JSON-ready


class _FakeNVMLError(Exception):
    pass


def _fake_pynvml(uuids, fail_init=False, energy=True):
    m = types.SimpleNamespace(NVMLError=_FakeNVMLError, NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1, NVML_TEMPERATURE_GPU=0)
    m.NVMLError_LibraryNotFound = type("NVMLError_LibraryNotFound", (_FakeNVMLError,), {})

    def init():
        if fail_init:
            raise m.NVMLError_LibraryNotFound("libnvidia-ml.so not found")

    m.nvmlInit = init
    m.nvmlDeviceGetCount = lambda: len(uuids)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetUUID = lambda h: uuids[h].encode()
    m.nvmlDeviceGetName = lambda h: f"Fake GPU {h}"
    m.nvmlSystemGetDriverVersion = lambda: "999.1"
    m.nvmlDeviceGetClockInfo = lambda h, c: 1000 + 10 * h + c
    m.nvmlDeviceGetMaxClockInfo = lambda h, c: 2000 + c
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=123 + h, total=1000)
    m.nvmlDeviceGetPowerUsage = lambda h: 250000
    m.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700000

    def temp(h, s):
        raise _FakeNVMLError("not supported")

    m.nvmlDeviceGetTemperature = temp
    m._energy = [1000]
    if energy:
        def e(h):
            m._energy[0] += 5000  # +5 J per read
            return m._energy[0]
        m.nvmlDeviceGetTotalEnergyConsumption = e
    else:
        def e(h):
            raise _FakeNVMLError("not supported")
        m.nvmlDeviceGetTotalEnergyConsumption = e
    return m


def test_nvml_library_not_found_is_caught(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(["GPU-a"], fail_init=True))
    assert device._nvml() is None


def test_gpu_record_matches_torch_device_by_uuid(monkeypatch):
    # NVML index 0 is another GPU; torch's device 0 is NVML's index 1 (CUDA_VISIBLE_DEVICES=1).
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(["GPU-aaaa", "GPU-bbbb"]))
    monkeypatch.setattr(device, "torch_uuid", lambda i: "GPU-BBBB")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "torch name")
    rec = device.gpu_record(0)
    assert rec["name"] == "Fake GPU 1" and rec["uuid"] == "GPU-bbbb" and rec["uuid_matched"]
    assert rec["sm_clock_mhz"] == 1010 and rec["mem_clock_mhz"] == 1011
    assert rec["memory_used_bytes"] == 124 and rec["power_w"] == 250.0 and rec["driver"] == "999.1"
    assert rec["temperature_c"] is None  # unsupported field recorded as None, not an error


def test_energy_meter_counter_and_fallback(monkeypatch):
    monkeypatch.setattr(device, "torch_uuid", lambda i: None)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(["GPU-a"]))
    e = device.EnergyMeter(0).start().stop()
    assert e["method"] == "nvmlDeviceGetTotalEnergyConsumption" and e["joules"] == pytest.approx(5.0)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(["GPU-a"], energy=False))
    meter = device.EnergyMeter(0, interval_s=0.001).start()
    import time

    time.sleep(0.05)
    e = meter.stop()
    assert e["method"] == "power sampling"
    # constant 250 W: energy = 250 W x the sampled span, never more than the whole span
    assert 0 < e["joules"] <= 250.0 * e["seconds"] + 1e-9


def test_slug():
    assert device.slug("NVIDIA H200") == "nvidia-h200"
    assert device.slug("Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz") == "intel-xeon-gold-6338-cpu-2-00ghz"
    assert device.slug("***") == "device"


# ------------------------------------------------------------------------- timing


def test_time_cpu_counts_calls_and_summarises():
    calls = []
    out = timing.time_cpu(lambda: calls.append(1), repeats=4, warmup=2, budget_s=1e9)
    assert len(calls) == 6 and out["repeats"] == 4
    assert out["q20_s"] <= out["median_s"] <= out["q80_s"]
    calls.clear()
    out = timing.time_cpu(lambda: calls.append(1), repeats=50, warmup=0, budget_s=0.0, min_repeats=3)
    assert out["repeats"] == 3 and len(calls) == 3  # budget spent: stops at min_repeats


def test_time_cpu_long_first_call_is_the_only_sample_unless_more_are_required():
    calls = []
    out = timing.time_cpu(lambda: calls.append(1), repeats=5, warmup=1, budget_s=-1.0)
    assert len(calls) == 1 and out["repeats"] == 1 and out["median_s"] == out["first_s"]
    calls.clear()
    out = timing.time_cpu(lambda: calls.append(1), repeats=5, warmup=1, budget_s=-1.0, single_ok=False)
    assert len(calls) == 2 and out["repeats"] == 1  # torch.compile: the compile call is never the sample


def test_peak_memory_cpu_sees_a_big_allocation():
    out = timing.peak_memory(lambda: torch.ones(64 * 2**20 // 4).add_(1).sum(), "cpu")
    assert out["peak_bytes"] is None or out["peak_bytes"] >= 0
    assert "RSS" in out["memory_method"]


# ---------------------------------------------------- derived figures, extrapolation


def _sim_row(variant, backend, N, M, t, status="measured", **kw):
    return dict(case="similarity", variant=variant, backend=backend, N=N, M=M, pairs=N * M, K=36, l_mean=22.0,
                D=1024, H=8, dtype="float32", flops=1e9 * N * M, median_s=t, status=status,
                tflops=None if t is None else 1e9 * N * M / t / 1e12, peak_bytes=2**20, **kw)


def _fake_results():
    sim = [
        _sim_row("paper", "eager", 10, 50, 4.0),
        _sim_row("paper", "torch", 10, 50, 0.25),
        _sim_row("paper", "torch.compile", 10, 50, 0.2),
        _sim_row("paper", "triton", 10, 50, None, status="not timed", note="not timed on CPU: interpreter only"),
        _sim_row("paper", "eager", 20, 100, None, status="extrapolated"),
        _sim_row("paper", "torch", 20, 100, 0.9),
        _sim_row("paper", "torch.compile", 20, 100, None, status="error", note="RuntimeError: boom"),
        _sim_row("paper", "triton", 20, 100, None, status="not timed", note="not timed on CPU: interpreter only"),
    ]
    res = {
        "schema": report.SCHEMA, "created": "2026-11-28T14:30:00+00:00", "quick": False, "variants": ["paper", "acf-code"],
        "device": {"kind": "cpu", "name": "Test CPU 9000", "label": "test-cpu-9000", "date": "2026-11-28T14:30:00+00:00",
                   "cpu_model": "Test CPU 9000", "cpu_count": 2, "torch_threads": 2,
                   "versions": {"python": "3.11", "torch": "2.13", "triton": "3.9", "numpy": "2.4"}},
        "ceiling": [{"case": "ceiling", "what": "float32 matmul 2048x2048x2048", "primary": True, "tflops": 0.125, "median_s": 0.137}],
        "similarity": sim,
        "rerank": [{"case": "rerank", "direction": "i2t", "N": 1000, "M": 5000, "backend": "acf_fast", "status": "measured", "median_s": 0.02},
                   {"case": "rerank", "direction": "i2t", "N": 1000, "M": 5000, "backend": "numpy loop", "status": "measured", "median_s": 0.6}],
        "metrics": [{"case": "metrics", "N": 1000, "M": 5000, "backend": "acf_fast", "status": "measured", "median_s": 0.05},
                    {"case": "metrics", "N": 1000, "M": 5000, "backend": "numpy loop", "status": "extrapolated", "median_s": 2.5,
                     "note": "argsort loop on 500 images"}],
        "train": [{"case": "train_step", "variant": "paper", "backend": "eager", "batch": 16, "status": "measured", "median_s": 12.0, "model": "ACF"},
                  {"case": "train_step", "variant": "paper", "backend": "torch", "batch": 16, "status": "measured", "median_s": 1.5, "model": "ACF"}],
        "notes": ["energy: not measured"],
    }
    cases._extrapolate(res["similarity"], key=("variant", "dtype"))
    return report.annotate(res)


def test_extrapolation_is_linear_in_pairs_and_labelled():
    res = _fake_results()
    row = next(r for r in res["similarity"] if r["backend"] == "eager" and r["N"] == 20)
    assert row["status"] == "extrapolated"
    assert row["median_s"] == pytest.approx(4.0 / 500 * 2000)
    assert row["extrapolated_from"] == {"N": 10, "M": 50} and "extrapolated" in row["note"]


def test_annotate_speedups_and_ceiling_fraction():
    res = _fake_results()
    torch_small = next(r for r in res["similarity"] if r["backend"] == "torch" and r["N"] == 10)
    comp_small = next(r for r in res["similarity"] if r["backend"] == "torch.compile" and r["N"] == 10)
    assert torch_small["speedup_vs_eager"] == pytest.approx(16.0)
    assert comp_small["speedup_vs_torch"] == pytest.approx(1.25)
    assert torch_small["frac_ceiling"] == pytest.approx(torch_small["tflops"] / 0.125)
    assert res["rerank"][0]["speedup_vs_numpy"] == pytest.approx(30.0)
    assert res["metrics"][0]["speedup_vs_numpy"] == pytest.approx(50.0)
    assert res["train"][1]["speedup_vs_eager"] == pytest.approx(8.0)


# ----------------------------------------------------------------------- markdown


def test_markdown_shows_backends_side_by_side_with_ratios():
    md = markdown.render(_fake_results())
    header = next(l for l in md.splitlines() if l.startswith("| N × M | pairs"))
    for b in ("eager", "torch", "torch.compile", "triton", "torch vs eager", "torch.compile vs torch"):
        assert f" {b} |" in header, b
    row = next(l for l in md.splitlines() if l.startswith("| 10 × 50 | 500 |"))
    assert "| 4 s | 250 ms | 200 ms | — |" in row and "16×" in row and "1.25×" in row
    row = next(l for l in md.splitlines() if l.startswith("| 20 × 100 |"))
    assert "~16 s" in row and "error" in row  # 4 s / 500 pairs x 2,000 pairs
    assert "| 2,000 | 2,000 |" in row  # pairs, GFLOP (1e9 per pair in the fake)
    assert "interpreter only" in md and "Test CPU 9000" in md and "2026-11-28" in md
    assert "30×" in md and "50×" in md and "8×" in md  # re-ranker, metrics, training step ratios


def test_format_helpers():
    assert markdown.fmt_time(0.0123) == "12.3 ms" and markdown.fmt_time(2.5e-5) == "25 µs"
    assert markdown.fmt_time(None) == "—" and markdown.fmt_time(float("nan")) == "—"
    assert markdown.fmt_bytes(3 * 2**20) == "3 MiB" and markdown.fmt_ratio(12.345) == "12.3×"


# -------------------------------------------------------------- plots and README


def test_plots_written(tmp_path):
    from bench.plots import write_plots

    paths = write_plots(_fake_results(), tmp_path, "x")
    assert [p.name for p in paths] == ["x-time.png", "x-speedup.png", "x-tflops.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_readme_block_from_newest_results(tmp_path):
    res_dir = tmp_path / "results"
    old = _fake_results()
    old["created"] = old["device"]["date"] = "2026-01-01T00:00:00+00:00"
    old["device"]["name"] = "Old CPU"
    new = _fake_results()
    atomic_write_text(res_dir / "old.json", json.dumps(report.jsonable(old)))
    atomic_write_text(res_dir / "new.json", json.dumps(report.jsonable(new)))
    (res_dir / "junk.json").write_text("{not json")
    text = "# Title\n\nintro\n\n## Performance\n\n" + readme.START + "\nstale 123\n" + readme.END + "\n\n## After\n"
    path = tmp_path / "README.md"
    path.write_text(text)
    readme.update_readme(path, res_dir)
    out = path.read_text()
    assert out.startswith("# Title\n\nintro\n") and out.endswith("\n\n## After\n")
    block = out[out.index(readme.START): out.index(readme.END)]
    assert "stale 123" not in block and "Old CPU" not in block
    assert "Test CPU 9000" in block and "2026-11-28" in block and "results/new.json" in block
    assert "GPU figures" in block and "unmeasured" in block  # no GPU file: said so
    # every time in the block is one a results row holds
    held = {markdown.fmt_time(r.get("median_s")) for k in ("similarity", "rerank", "metrics", "train") for r in new[k]}
    notes = " ".join(r.get("note", "") for k in ("similarity", "rerank", "metrics", "train") for r in new[k])
    for t in re.findall(r"~?(\d[\d.,]* (?:ms|µs|s))(?![\w/])", block):
        assert t in held or t in notes, t
    readme.update_readme(path, res_dir)  # idempotent
    assert path.read_text() == out


def test_readme_block_shows_every_gpu_check_and_the_kernel_report(tmp_path):
    """Both gpu_check layouts (the committed v1 baseline and today's script) and the
    newest offline kernel report reach the block, with their own numbers."""
    res_dir = tmp_path / "results"
    atomic_write_text(res_dir / "cpu.json", json.dumps(report.jsonable(_fake_results())))
    gpu = res_dir / "gpu"
    baseline = Path(readme.__file__).parent / "results" / "gpu" / "nvidia-h200-2026-11-30-gpu_check-kernel-v1.json"
    atomic_write_text(gpu / baseline.name, baseline.read_text())
    v2 = {"device": "NVIDIA X", "date": "2027-01-02T00:00:00+00:00", "torch": "t", "triton": "3.6.0",
          "results": [{"variant": "paper", "dtype": "bf16", "v2_vs_float64": 1.25e-4, "full_end_to_end_s": 4.321,
                       "full_tflops": 238.0, "speedup_of_v2_full": {"vs_torch": 77.0},
                       "full_energy": {"joules": 2345.0}}]}
    atomic_write_text(gpu / "nvidia-x-2027-01-02-gpu_check.json", json.dumps(v2))
    kern = res_dir / "kernels"
    atomic_write_text(kern / "kernel-report-sm90-triton3.9-2026-01-01.md", "| old table |\n")
    atomic_write_text(kern / "kernel-report-sm90-triton3.9-2026-12-06.md", "| new table 4242 |\n")
    block = readme.render_block(res_dir, tmp_path)
    assert "| paper | bf16 | v2 (tiles) | 1.3e-04 | 4.32 s | 238 | 77× | 2345 |" in block
    assert "| acf-code | bfloat16 | v1 (one pair per program) | 4.4e-06 | 19.1 s | 16 | 17× | — |" in block
    assert "121 s predicted" in block  # v1 paper's full grid was not run
    assert block.index("NVIDIA X") < block.index("NVIDIA H200")  # newest first
    assert "new table 4242" in block and "old table" not in block
    assert "GPU figures" not in block and "Kernel v2 has not run on a GPU" not in block  # NVIDIA X timed v2
    (gpu / "nvidia-x-2027-01-02-gpu_check.json").unlink()
    assert "Kernel v2 has not run on a GPU" in readme.render_block(res_dir, tmp_path)


def test_readme_markers(tmp_path):
    assert readme.replace_block("# R\n", "B").endswith("## Performance\n\nB\n")
    with pytest.raises(ValueError, match="only one of the markers"):
        readme.replace_block("x " + readme.START, "B")
    with pytest.raises(ValueError, match="no results JSON"):
        readme.render_block(tmp_path, tmp_path)
    with pytest.raises(ValueError, match="not a file"):
        readme.update_readme(tmp_path / "missing.md", tmp_path)


def test_load_results_rejects_other_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"schema": 99}))
    with pytest.raises(ValueError, match="x.json"):
        report.load_results(p)


def test_jsonable_drops_nan():
    assert report.jsonable({"a": float("nan"), "b": (1, float("inf")), "c": 2.0}) == {"a": None, "b": [1, None], "c": 2.0}


# -------------------------------------------------------------------- CLI


def test_cli_parses_bench_and_sizes():
    from acf_fast.cli import build_parser

    args = build_parser().parse_args(["bench", "--quick", "--sizes", "2x3,4x5", "--cases", "similarity"])
    assert args.quick and args.func is not None and _sizes(args.sizes) == [(2, 3), (4, 5)]
    with pytest.raises(ValueError, match="--sizes"):
        _sizes("2by3")
    with pytest.raises(ValueError, match="--sizes"):
        _sizes("0x3")


def test_run_report_unknown_case(tmp_path):
    with pytest.raises(ValueError, match="--cases"):
        report.run_report(device="cpu", case_names=("nope",), out_dir=tmp_path)


def test_run_report_end_to_end_tiny(tmp_path, monkeypatch):
    monkeypatch.setitem(report.PROFILES, "cpu", dict(report.PROFILES["cpu-quick"], similarity=[(2, 3)],
                                                      rerank=[(30, 150)], metrics=[(6, 30)], train_batch=2, repeats=1))
    monkeypatch.setattr(cases, "SIMILARITY_BACKENDS", ("eager", "torch", "triton"))
    monkeypatch.setattr(cases, "similarity_case", _wrap_backends(cases.similarity_case, ("eager", "torch", "triton")))
    path = report.run_report(device="cpu", case_names=("similarity", "rerank", "metrics"), variants=("acf-code",),
                             out_dir=tmp_path, progress=False, log=lambda *a: None)
    data = report.load_results(path)
    assert data["device"]["kind"] == "cpu" and data["ceiling"][0]["tflops"] > 0
    by = {r["backend"]: r for r in data["similarity"]}
    assert by["eager"]["status"] == by["torch"]["status"] == "measured", (by["eager"], by["torch"])
    assert by["triton"]["status"] == "not timed" and "interpreter" in by["triton"]["note"]
    assert by["torch"]["max_abs_diff_vs_eager"] <= 1e-4
    assert by["torch"]["speedup_vs_eager"] > 0
    for case in ("rerank", "metrics"):  # an error row is a failure, not a pass
        assert data[case] and all(r["status"] in ("measured", "extrapolated") for r in data[case]), data[case]
    assert path.with_suffix(".md").read_text().startswith("# acf-fast benchmarks")
    assert len(list(tmp_path.glob("*.png"))) == 3


def _wrap_backends(fn, backends):
    def inner(*a, **kw):
        kw["backends"] = backends
        return fn(*a, **kw)
    return inner


def test_compile_worker_budget_reports_not_timed():
    from bench.compile_worker import compile_rows

    rows = compile_rows([(2, 3), (4, 5)], ["acf-code"], "cpu", budget_total_s=0.2, cap=1e9, repeats=1, budget_s=1.0,
                        log=lambda *a: None)
    assert {(r["N"], r["M"]) for r in rows} == {(2, 3), (4, 5)}
    for r in rows:
        assert r["status"] == "not timed" and "budget" in r["note"] and r["backend"] == "torch.compile"


def test_flop_unit_follows_the_ceiling():
    assert markdown.flop_unit({"ceiling": [{"tflops": 0.1}]}) == ("GFLOP/s", 1e3)
    assert markdown.flop_unit({"ceiling": [{"tflops": 700.0}]}) == ("TFLOP/s", 1.0)


# ------------------------------------------------ command lines over the harness


def test_similarity_cpu_cli_is_the_report_case(tmp_path, capsys):
    from bench import similarity_cpu

    out = tmp_path / "sim.json"
    assert similarity_cpu.main(["--images", "2", "--texts", "6", "--eager-texts", "3", "--dim", "32", "--heads", "2",
                                "--regions", "5", "--min-len", "2", "--max-len", "4", "--repeats", "1",
                                "--variants", "acf-code", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    by = {(r["backend"], r["M"]): r for r in rows}
    assert set(by) == {("eager", 3), ("torch", 3), ("eager", 6), ("torch", 6)}
    assert by[("eager", 3)]["status"] == by[("torch", 3)]["status"] == by[("torch", 6)]["status"] == "measured"
    assert by[("eager", 6)]["status"] == "extrapolated"
    assert by[("torch", 3)]["max_abs_diff_vs_eager"] <= 1e-5
    x = workloads.similarity_inputs(2, 6, "acf-code", K=5, l_min=2, l_max=4, D=32, heads=2)
    assert by[("torch", 6)]["flops"] == flops.grid_flops(x.k_valid.tolist(), x.l_valid.tolist(), 32, 2, "acf-code")
    assert "extrapolated" in capsys.readouterr().out


def test_train_step_cpu_cli_checks_backends_agree(capsys):
    from bench import train_step_cpu

    assert train_step_cpu.main(["--batch", "3", "--embed-dim", "8", "--heads", "2", "--regions", "4", "--words", "4",
                                "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.split()[:1] in (["eager"], ["torch"])}
    assert rows["eager"][3] == rows["torch"][3]  # the same first loss (5 decimals)
    assert float(rows["torch"][4]) < 1e-4  # and the same gradients
