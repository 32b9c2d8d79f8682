"""Atomic file writes: every result, cache and checkpoint goes through here.

A write goes to a temp file in the target's folder and is moved over the target
with ``os.replace`` (an atomic rename), so an interrupted job never leaves a
half-written file; on error the temp file is removed and the target is untouched.

The result keeps what a plain overwrite would keep: an existing file's permission
bits (a new file gets 0o666 less the umask, as ``open`` gives, not ``mkstemp``'s
0o600), and a symlink stays a symlink: the file it points to is replaced.

This module is the one home of atomic writes: import these functions from here,
never through another module or under another name.
"""
from __future__ import annotations

import json
import os
import secrets
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import numpy as np


def _temp_file(target: Path, suffix: str) -> Path:
    """Create an empty, new temp file beside ``target`` with open()'s default mode
    (0o666 less the umask); returns its path."""
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temp path in ``path``'s folder; on success move it over ``path``
    (over the file a symlink ``path`` points to), keeping an existing file's mode."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_file(target, suffix)
    new_mode = stat.S_IMODE(os.stat(tmp).st_mode)  # the umask's, as open() gives
    try:
        yield tmp
        try:
            keep = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            keep = new_mode
        # set after writing: some writers (safetensors) make the file anew, mode 0600
        os.chmod(tmp, keep)
        os.replace(tmp, target)
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
