"""Make ``acf_fast.kernels`` importable when running from the source tree.

Installed, setup.py maps the top-level ``kernels/`` folder onto the subpackage
``acf_fast.kernels``. The GPU machine installs nothing and runs with
``PYTHONPATH=.``, where ``acf_fast/kernels`` does not exist: this finder points
that one name at ``<repo>/kernels`` so the same import works in both places,
without ever exposing a top-level package called ``kernels``.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_NAME = "acf_fast.kernels"


class _KernelsFinder(importlib.abc.MetaPathFinder):
    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _NAME:
            return None
        return importlib.util.spec_from_file_location(
            _NAME, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)]
        )


def install() -> None:
    package_dir = Path(__file__).resolve().parent
    if (package_dir / "kernels" / "__init__.py").exists():
        return  # installed layout: the real subpackage is there
    folder = package_dir.parent / "kernels"
    if not (folder / "__init__.py").exists():
        return
    if not any(isinstance(f, _KernelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _KernelsFinder(folder))
