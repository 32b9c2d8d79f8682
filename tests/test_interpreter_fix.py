"""kernels/interpreter.py: triton 3.6's interpreter turned a scalar into an index with
``int(data)`` of a (1,) array, which numpy 2.4 refuses; every tile loop then failed under
triton 3.6 with a current numpy. The installed triton here may be a fixed one (3.7 on), so
its hook is replaced by triton 3.6's line for these tests."""
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the fix concerns the Triton interpreter (run without --device cuda)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter as interp  # noqa: E402

from acf_fast.kernels import interpreter as fix  # noqa: E402


def _triton36_hook(original):
    """triton 3.6's _patch_lang_tensor: the installed one with 3.6's __index__ on top."""
    def hook(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))  # triton 3.6, verbatim
    return hook


@triton.jit
def _count_tiles(out_ptr, n_tiles):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    acc = 0
    for _ in range(pid, n_tiles, n_prog):  # scalar bounds, as the tiles' persistent loop
        acc += 1
    tl.store(out_ptr + pid, acc)


def _refuses_one_element_arrays() -> bool:
    try:
        int(np.array([3]))
    except TypeError:
        return True
    return False


@pytest.fixture
def triton36(monkeypatch):
    """The interpreter's hook as triton 3.6 ships it, for one test."""
    monkeypatch.setattr(interp, "_patch_lang_tensor", _triton36_hook(interp._patch_lang_tensor))


def test_the_loop_over_tiles_runs_on_triton36s_interpreter(triton36):
    out = torch.full((3,), -1, dtype=torch.int32)
    if _refuses_one_element_arrays():  # numpy >= 2.4: the bug as the GPU machine (numpy 2.5) has it
        with pytest.raises(Exception, match="0-dimensional"):
            _count_tiles[(3,)](out, 7)
    assert fix.fix_scalar_index() == _refuses_one_element_arrays()
    assert fix.fix_scalar_index() is False  # once
    _count_tiles[(3,)](out, 7)
    assert out.tolist() == [3, 2, 2]


def test_a_fixed_interpreter_is_left_as_it_is(monkeypatch):
    def squeezing(tensor, scope):  # triton 3.7 on
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interp, "_patch_lang_tensor", squeezing)
    assert fix.fix_scalar_index() is False
    assert interp._patch_lang_tensor is squeezing


def test_an_unknown_interpreter_is_left_as_it_is(monkeypatch):
    def other(tensor, scope, extra):  # a signature this does not know
        raise AssertionError("not to be called on a launch")

    monkeypatch.setattr(interp, "_patch_lang_tensor", other)
    assert fix.fix_scalar_index() is False
    assert interp._patch_lang_tensor is other
