"""Test set-up: the Triton interpreter must be switched on before any kernel module
is imported (PLATFORM_FACTS: @triton.jit reads it at decoration time), and the
text encoder must never reach a hub.

``--device cuda`` runs the same tests on a GPU (interpreter off)."""
import os
import sys


def _wanted_device(argv):
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--device="):
            return a.split("=", 1)[1]
    return "cpu"


_DEVICE = _wanted_device(sys.argv)
if _DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="cpu (Triton interpreter) or cuda")


@pytest.fixture(scope="session")
def device(request):
    dev = request.config.getoption("--device")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda asked but no CUDA device is present")
    return torch.device(dev)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models' ops each wait on a thread barrier with
    two, and on a busy 2-core machine a tiny training step ran ~30x slower that way."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and config.getoption("--device").startswith("cuda"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with --device cuda)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs only on a CUDA device")
    config.addinivalue_line("markers", "slow: longer CPU tests")
