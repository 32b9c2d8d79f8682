"""Running from the checkout (pytest, ``python -m acf_fast``, ``PYTHONPATH=.`` on the GPU
machine) puts its root on sys.path, where the folder ``kernels/`` (our Triton kernels,
``acf_fast.kernels``) shadowed the PyPI package ``kernels`` that transformers 5.x imports:
a fresh install failed with "cannot import name 'CUDAProperties' from 'kernels'" as soon as
the text encoder loaded. Each case runs in a fresh interpreter, the checkout first on
sys.path."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    prog = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", prog], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_top_level_name_goes_to_the_installed_package_of_that_name(tmp_path):
    fake = tmp_path / "site" / "kernels"
    (fake / "layer").mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'the PyPI kernels'\n")
    (fake / "layer" / "__init__.py").write_text("SUB = 7\n")
    r = run(f"""
        sys.path.insert(1, {str(tmp_path / 'site')!r})  # an installed package, after the checkout
        import kernels
        from kernels.layer import SUB
        assert kernels.MARK == 'the PyPI kernels' and SUB == 7, kernels.__file__
        from acf_fast.kernels import tiles  # ours, under its own name, still
        assert tiles.__file__.startswith({str(ROOT / 'kernels')!r}), tiles.__file__
        print('ok')
    """, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_without_that_package_the_name_is_missing_and_ours_still_imports(tmp_path):
    r = run("""
        import importlib.machinery, os
        root = sys.path[0]
        others = [p for p in sys.path[1:] if os.path.abspath(p or os.curdir) != root]
        if importlib.machinery.PathFinder.find_spec('kernels', others) is not None:
            sys.path[:] = [root] + [p for p in others if 'site-packages' not in p]
        try:
            import kernels
        except ModuleNotFoundError as e:
            assert e.name == 'kernels' and 'acf_fast.kernels' in str(e), e
            assert 'kernels' not in sys.modules
        else:
            raise AssertionError(f'imported {kernels.__file__}')
        print('ok')
    """, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_transformers_hub_kernels_import_from_the_checkout(tmp_path):
    """The failure as users met it (only where transformers ships that integration)."""
    try:
        import transformers.integrations.hub_kernels  # noqa: F401  (third-party: may be absent)
    except ModuleNotFoundError:
        pytest.skip("this transformers has no hub_kernels integration")
    r = run("""
        import transformers.integrations.hub_kernels
        from transformers import BertModel
        print('ok')
    """, tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
