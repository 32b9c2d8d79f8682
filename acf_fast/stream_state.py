"""Resumable progress of a streaming evaluation (:mod:`acf_fast.stream`).

A stream never holds S: it re-reads the grid in passes (ground truth, ranks and top-k,
then the two reverse-position passes of the re-ranker), and between tiles all it knows
is a few (N or M) × k tensors. Those are what this module saves: one safetensors file
per fold, ``fold<f>.safetensors`` in the key folder of the evaluation's fingerprint
(:class:`acf_fast.chunk_cache.KeyFolder`: the scorer's identity, the grid, the tiling and
the re-ranking settings), with the pass and the next row tile in its metadata. The file
is replaced atomically after a row tile (at most every ``every_s`` seconds) and at the
end of every pass, so a stream killed at any point resumes from its last save and gives
the same result, bit for bit, as one that ran through: counts are integers and the
top-k merges run in the same tile order on the same values (a scorer must be
deterministic; the resumed stream re-checks a saved ground-truth tile).

    result = stream_evaluate(scorer, N, M, work=folder, fingerprint={"model": digest, ...}, ...)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .atomic import atomic_write
from .chunk_cache import KeyFolder

# the passes of acf_fast.stream.stream_ranks in order; a saved state names the pass it is in
STAGES = ("ranks", "reverse_i2t", "reverse_t2i", "done")
EVERY_S = 60.0  # seconds between two saves inside a pass


class StreamState(KeyFolder):
    """The saved progress of one streaming evaluation under ``work/<key of fingerprint>``.

    Args:
        work: folder of the key folders (created; key folders nobody holds are deleted,
            as the chunk cache does).
        fingerprint: JSON-able dict of everything the saved tensors depend on: the
            scorer's identity (model, data, backend, precision, ...) and the stream's
            grid, tiling and re-ranking settings (:func:`acf_fast.stream.stream_evaluate`
            adds those to its caller's).
        every_s: least seconds between two saves inside a pass (the end of a pass always
            saves).
    """

    def __init__(self, work, fingerprint: dict, every_s: float = EVERY_S):
        if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or not every_s >= 0:
            raise ValueError(f"every_s must be a number >= 0, got {every_s!r}")
        super().__init__(work, dict(fingerprint, kind="stream"))
        self.every_s = float(every_s)

    def fold(self, f: int) -> "FoldState":
        return FoldState(self.root / f"fold{f}.safetensors", self.every_s)


class FoldState:
    """One fold's saved pass: (stage, next row tile, tensors)."""

    def __init__(self, path: Path, every_s: float):
        self.path = Path(path)
        self.every_s = every_s
        self._last = time.monotonic()

    def load(self) -> Optional[Tuple[str, int, Dict[str, torch.Tensor]]]:
        """(stage, next row tile, tensors on the CPU), or None when nothing is saved (or
        the file is unreadable: the fold starts over)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            stage, nxt = meta["stage"], int(meta["next"])
        except (OSError, KeyError, ValueError, SafetensorError):
            return None
        if stage not in STAGES or nxt < 0:
            return None
        return stage, nxt, tensors

    def save(self, stage: str, nxt: int, tensors: Dict[str, torch.Tensor], *, force: bool = False) -> bool:
        """Replace the saved state with (stage, next row tile, tensors) when ``force`` or
        ``every_s`` have passed since the last save; returns whether it wrote."""
        from safetensors.torch import save_file

        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        if not force and time.monotonic() - self._last < self.every_s:
            return False
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic_write(self.path, lambda tmp: save_file(cpu, tmp, metadata={"stage": stage, "next": str(int(nxt))}),
                     suffix=".safetensors")
        self._last = time.monotonic()
        return True
