"""Checkpoints: the model as safetensors (``ACF.save``), the training state as a
``torch.save`` file that loads with ``weights_only=True``.

Run folder layout:
    best.safetensors      model with the best dev rsum so far
    last.safetensors      model at the end of the last finished epoch
    last_state.pt         optimizer, scheduler, epoch, step, best rsum, RNG states
    encoder.safetensors   text-encoder weights (fine-tuned runs only; best/last alike
                          -> best_encoder.safetensors / last_encoder.safetensors)

Every file is written to a temporary file in the same folder and moved into place
with ``os.replace``, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..atomic import atomic_write

STATE_NAME = "last_state.pt"


def rng_state() -> dict:
    """torch (CPU and CUDA), numpy and python RNG states as weights_only-safe objects."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save_encoder(path: Path, module: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp))


def load_encoder(path: Path, module: torch.nn.Module) -> None:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint {path} not found")
    module.load_state_dict(load_file(str(path)))


def save_state(run: Path, state: dict) -> None:
    """Write ``state`` (plain containers and tensors only) to ``run/last_state.pt``."""
    atomic_write(Path(run) / STATE_NAME, lambda tmp: torch.save(state, tmp))


def load_state(run: Path, map_location="cpu") -> Optional[dict]:
    """The training state of ``run``, or None when the run has none yet."""
    path = Path(run) / STATE_NAME
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)
