"""How ``python -m acf_fast`` / ``acf-fast`` (``acf_fast.cli.entry``) ends its process.

Under torchrun (WORLD_SIZE > 1) a rank ends with ``os._exit`` after flushing its output,
without Python's finalisation: torch keeps the gloo group's worker threads alive after a DDP
step, and one still releasing Python-owned tensors when finalisation began was ended inside a
noexcept C++ frame (SIGABRT, "terminate called without an active exception", after all the
work was done: 4 of 53 runs of tests/test_sharded_eval.py's ``train --eval-test`` torchrun
command beside a CPU hog; none of 70 with this exit). Elsewhere the process exits normally.
Both keep main()'s exit code and print what main printed.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path, how, world):
    """``acf-fast evaluate --sims <missing>`` (exit code 2, an error message) started ``how``
    ("entry": acf_fast.cli.entry, "-m": python -m acf_fast), WORLD_SIZE = ``world``; a
    sitecustomize registers an atexit handler, which only Python's finalisation runs."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import atexit\natexit.register(lambda: print('finalised', flush=True))\n")
    env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    if world is not None:
        env["WORLD_SIZE"] = world
    missing, out = tmp_path / "missing.npy", tmp_path / "r.json"
    start = (["-c", "import sys; sys.argv[0] = 'acf-fast'; from acf_fast.cli import entry; entry()"] if how == "entry"
             else ["-m", "acf_fast"])
    proc = subprocess.run([sys.executable, *start, "evaluate", "--sims", str(missing), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "acf-fast evaluate: error:" in proc.stderr and str(missing) in proc.stderr
    assert not out.exists()
    return proc


@pytest.mark.parametrize("how", ["entry", "-m"])
@pytest.mark.parametrize("world", [None, "2"])
def test_a_torchrun_rank_exits_without_finalisation_and_keeps_its_code_and_output(tmp_path, how, world):
    proc = run(tmp_path, how, world)
    assert ("finalised" in proc.stdout) == (world is None), proc.stdout


def test_the_console_script_is_entry():
    """``acf-fast`` as installed (pip install -e, make venv) starts at entry(), like ``-m``."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "acf-fast"]
    assert ep.value == "acf_fast.cli:entry"
