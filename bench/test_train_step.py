"""pytest-benchmark: one training step (forward, backward, Adam) per similarity backend."""
import math

import pytest

from bench.conftest import run_timed
from bench.train_step import make_train_step


@pytest.mark.parametrize("variant", ["paper", "acf-code"])
@pytest.mark.parametrize("backend", ["eager", "torch", "triton"])
def test_train_step(benchmark, bench_device, variant, backend):
    if backend == "triton" and bench_device.type != "cuda":
        pytest.skip("Triton is timed on a GPU only (the interpreter is a correctness tool)")
    batch = 64 if bench_device.type == "cuda" else 4
    step, info = make_train_step(variant, backend, batch=batch, device=bench_device)
    benchmark.group = f"train step {variant}"
    benchmark.extra_info.update(info, batch=batch, backend=backend)
    loss = run_timed(benchmark, step, bench_device, rounds=2)
    assert math.isfinite(loss)
