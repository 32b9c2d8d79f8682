"""pytest-benchmark set-up for ``pytest bench/ --benchmark-json=out.json``.

Not part of the default test run (pytest.ini: testpaths = tests). The Triton
interpreter is NOT switched on here: benchmarks time real kernels only, on a GPU;
on a CPU the triton cases skip. ``--bench-device`` picks the device (default: cuda
when available). The benchmark JSON's ``machine_info`` carries our device record
under ``acf_fast_device`` (see ``bench.device.device_record``).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP, see bench.report.OMP_NOTE
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.addoption("--bench-compile", action="store_true",
                     help="also time torch.compile on a CPU (cold Inductor compiles take minutes there)")


def _device(config) -> torch.device:
    dev = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(dev)


def pytest_benchmark_update_machine_info(config, machine_info):
    from bench.device import device_record

    machine_info["acf_fast_device"] = device_record(_device(config))


@pytest.fixture(scope="session")
def bench_device(request) -> torch.device:
    dev = _device(request.config)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda asked but no CUDA device is present")
    return dev


def run_timed(benchmark, fn, device, rounds=3):
    """``benchmark.pedantic`` with one warm-up and ``rounds`` timed calls, synchronised on a GPU."""

    def call():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
