"""The Triton interpreter (``TRITON_INTERPRET=1``, set before triton is imported): whether it
runs, and one fix for triton 3.6's.

Every module that defines kernels imports this one, so the fix is in place before a kernel
is launched.
"""
from __future__ import annotations

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _squeezed_index(self) -> int:
    return int(self.handle.data.squeeze())


def fix_scalar_index() -> bool:
    """Make the interpreter's scalars usable as indices with numpy >= 2.4.

    The interpreter holds a scalar (a kernel argument, ``tl.program_id``) as a (1,) array and
    triton 3.6 turns it into a Python int with ``int(data)``, which numpy 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"). So every loop with a scalar
    bound, such as the tiles' ``range(pid, n_tiles, n_prog)``, failed under triton 3.6 (the
    GPU machine's) with a current numpy (2.5 there). Triton 3.7 on squeezes the array first;
    this installs the same conversion for the interpreter's launches.

    Only where the interpreter's own conversion fails on a (1,) array; a triton without the
    private hook is left as it is. Returns whether it patched."""
    if not INTERPRET:
        return False
    try:
        import numpy as np
        from triton.runtime import interpreter as interp

        patch_tensor, scope_type = interp._patch_lang_tensor, interp._LangPatchScope
    except (ImportError, AttributeError):
        return False
    if getattr(patch_tensor, "fixed_scalar_index", False):
        return False

    class Probe:  # stands in for tl.tensor: what does the interpreter install on it?
        def __init__(self):
            self.handle = type("Handle", (), {"data": np.array([3], dtype=np.int32)})()

    scope = scope_type()
    try:
        patch_tensor(Probe, scope)
        index = Probe.__index__
    except Exception:  # another interpreter than the one this knows: leave it
        scope.restore()
        return False
    try:
        converts = index(Probe()) == 3
    except TypeError:  # numpy's refusal
        converts = False
    finally:
        scope.restore()
    if converts:
        return False

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", _squeezed_index)

    patched.fixed_scalar_index = True
    interp._patch_lang_tensor = patched
    return True


fix_scalar_index()
