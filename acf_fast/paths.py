"""Path checks done before any work: inputs exist and are what they claim, outputs
never land on an input, on a folder, or on each other.

Every command checks its paths here first, so a bad path is one clear error naming
the option (``--out``, ``--sims``, ...) and the path, raised before anything is
computed or written:

    require_file(args.sims, "--sims")
    check_outputs({"--out": args.out}, inputs={"--sims": args.sims})
    require_empty_folder(run, "--out", hint="pass --resume to continue it")

Two spellings of one file (relative, ``..``, a symlink, a hard link) are the same
file: paths are compared resolved, and by device and inode where both exist.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

PathLike = Union[str, os.PathLike]


def require_file(path: PathLike, flag: str) -> Path:
    """``path`` as a Path if it is an existing file; FileNotFoundError when missing,
    ValueError when it is a folder (or not a regular file)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; expected a file")
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{flag} {path} is not a regular file")
    return path


def require_folder(path: PathLike, flag: str) -> Path:
    """``path`` as a Path if it is an existing folder; FileNotFoundError / ValueError otherwise."""
    path = Path(path)
    if path.is_file():
        raise ValueError(f"{flag} {path} is a file; expected a folder")
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    return path


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: equal resolved paths, or (both existing)
    the same device and inode (hard links)."""
    if Path(a).resolve() == Path(b).resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Mapping[str, Optional[PathLike]],
                  inputs: Mapping[str, Union[None, PathLike, Iterable[PathLike]]]) -> None:
    """Refuse output paths that would overwrite an input, are folders, sit under a file,
    or coincide with another output. ``None`` entries are skipped; an input may be a
    list of paths (e.g. every file of a data folder)."""
    named = [(flag, Path(p)) for flag, p in outputs.items() if p is not None]
    for flag, path in named:
        if path.is_dir():
            raise ValueError(f"{flag} {path} is a folder; give a file path inside it")
        parent = path.resolve().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
        for in_flag, value in inputs.items():
            if value is None:
                continue
            for src in ([value] if isinstance(value, (str, os.PathLike)) else value):
                if same_file(path, src):
                    raise ValueError(f"{flag} {path} is the input {in_flag} {src}; an output never overwrites "
                                     "an input: choose another path")
    for i, (flag, path) in enumerate(named):
        for other_flag, other in named[i + 1:]:
            if same_file(path, other):
                raise ValueError(f"{flag} and {other_flag} are the same file {path}; give them different paths")


def require_empty_folder(path: PathLike, flag: str, hint: str) -> Path:
    """``path`` if it is absent or an empty folder; ValueError otherwise (``hint`` says
    what to do instead, e.g. "pass --resume to continue it")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; expected a folder")
    if path.is_dir() and any(path.iterdir()):
        raise ValueError(f"{flag} {path} is not empty; {hint}")
    return path
