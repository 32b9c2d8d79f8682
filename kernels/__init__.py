"""Triton kernels of acf-fast, imported as ``acf_fast.kernels``.

One module per fused computation, each with its kernels, launch function and
autograd.Function (Liger-Kernel's layout). Importing this package does not
import triton; the modules that define kernels do.
"""
if __name__ == "kernels":
    # Imported under the top-level name: the checkout's root is on sys.path (``python -m``
    # from the checkout, pytest, ``PYTHONPATH=.`` on the GPU machine), so this folder
    # shadows the PyPI package ``kernels`` (Hugging Face's, which transformers 5.x imports
    # when it is installed: "cannot import name 'CUDAProperties' from 'kernels'"). Hand the
    # name over to that package, or fail as if this folder were not there.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the checkout's kernels/ folder is acf_fast.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import system returns what sys.modules holds after this file runs
    _spec.loader.exec_module(_module)
