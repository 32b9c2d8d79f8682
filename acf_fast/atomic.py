"""Atomic file writes: every result, cache and checkpoint goes through here.

A write goes to a temp file in the target's folder and is moved over the target
with ``os.replace`` (an atomic rename), so an interrupted job never leaves a
half-written file; on error the temp file is removed and the target is untouched.

This module is the one home of atomic writes: import these functions from here,
never through another module or under another name.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temp path in ``path``'s folder; on success move it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write(path, write: Callable[[str], None], suffix: str = "") -> None:
    """Call ``write(tmp_path)`` (a str), then move the temp file onto ``path``."""
    with atomic_path(path, suffix=suffix) as tmp:
        write(str(tmp))


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def atomic_write_json(path, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent))


def atomic_write_lines(path, lines: Iterable[str]) -> None:
    """Each line followed by a newline, UTF-8."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")


def atomic_save_npy(path, arr: np.ndarray) -> None:
    """``np.save`` without pickle (the temp name ends in .npy, so numpy appends nothing)."""
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, arr, allow_pickle=False)
