"""Sharded scoring of a split on ``torch.distributed``: one evaluation, several processes.

    torchrun --nproc_per_node=G -m acf_fast evaluate --data D --split test --checkpoint C --out r.json

``torchrun`` starts G processes (ranks) and sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT; :func:`ranks` joins their process group (NCCL on CUDA, each
rank on ``cuda:LOCAL_RANK``; gloo on the CPU) through :mod:`acf_fast.train.distributed`,
the helpers DDP training uses. Without WORLD_SIZE > 1 it is the one process, untouched.

Inside :func:`acf_fast.scoring.score_split` (still the one function that scores a
split), :func:`fill_sharded` replaces ``ChunkCache.fill``:

- The image chunks [a, b) of ``chunk_images`` rows are dealt round-robin: chunk i goes
  to rank i % world. Every rank loads the model and encodes the texts once (each rank
  scores its images against every text; encoding a text is a projection of its cached
  features, about the cost of scoring one image against all texts, so encoding them
  on every rank costs less than shipping W between ranks); images are encoded only by
  the rank that scores them, once per chunk.
- Each rank keeps its finished chunks in the same :class:`~acf_fast.chunk_cache.ChunkCache`
  under ``--work``. The key folder depends only on the checkpoint, data, backend,
  precision, device type and chunking, not on the rank or the number of ranks, and
  the chunks of different ranks are different files: ranks of one node share the key
  folder under a shared lock (never an exclusive one, so they neither wait for nor
  refuse each other), a rerun resumes every rank's saved chunks, and chunks saved by
  a single-process run (or by a run with another number of ranks) are reused by
  whichever rank owns them now. On several nodes ``--work`` may be local to each node
  (each node keeps its own ranks' chunks) or shared.
- Rank 0 receives the other ranks' chunks (``send`` / ``recv`` in chunk order, on the
  process group's device) into S; it alone ranks, re-ranks and writes the outputs. The
  chunks are the same rows scored by the same code as in one process, so S is the
  same bit for bit, and so are the metrics and re-ranked lists.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional, Union

import numpy as np
import torch

from .machine import resolve_device
from .train import distributed
from .train.distributed import DistInfo

# A rank that has finished its chunks waits for the slowest one (whose chunks may all be
# missing after a resume) in recv/send: torch's default of 10 (NCCL) or 30 minutes would
# abort a long evaluation. A rank that dies is noticed by torchrun, which stops the others.
TIMEOUT = timedelta(hours=12)


@dataclass
class Ranks(DistInfo):
    """Where this process stands (rank 0 = main, of ``world`` processes; see
    :class:`acf_fast.train.distributed.DistInfo`) and the device it scores on
    (``cuda:LOCAL_RANK`` for several ranks on CUDA; with one process, the ``--device``
    string as given, resolved later by ``score_split``)."""

    device: Union[str, torch.device] = "auto"


def rank_device(name, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank`` on its node: ``name`` resolved, and on
    CUDA ``cuda:LOCAL_RANK``. ValueError for an explicit ``cuda:N`` other than that,
    or more ranks on the node than CUDA devices."""
    dev = resolve_device(name)
    if dev.type != "cuda":
        return dev
    if dev.index is not None and dev.index != local_rank:
        raise ValueError(f"--device {name}: with several ranks each rank scores on cuda:LOCAL_RANK (this rank's is "
                         f"cuda:{local_rank}); pass --device cuda or auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK = {local_rank} but this node has {count} CUDA device(s): start at most {count} "
                         "processes per node (torchrun --nproc_per_node)")
    return torch.device("cuda", local_rank)


@contextmanager
def ranks(device="auto"):
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1)
    and leave it at the end; yields :class:`Ranks`. Under torchrun a group the caller
    already joined is used and left alone. Without WORLD_SIZE > 1, the single process
    (even inside a group joined otherwise, where one rank may evaluate alone)."""
    if distributed.env_world_size() <= 1:
        yield Ranks(device=device)
        return
    local_rank = distributed.env_local_rank()
    dev = rank_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    info = distributed.setup(dev, timeout=TIMEOUT)
    try:
        yield Ranks(info.rank, info.world, info.local_rank, info.owns_group, dev)
    finally:
        distributed.teardown(info)


def fill_sharded(cache, compute: Callable[[int, int], object], group: Ranks, *, progress: bool = True,
                 desc: str = "scoring", on_chunk: Optional[Callable[[int, int], None]] = None):
    """This rank's chunks of ``cache`` (a :class:`~acf_fast.chunk_cache.ChunkCache`),
    read when saved, else ``compute(a, b)`` and saved (then ``on_chunk(a, b)``), then
    gathered on rank 0. Collective: every rank of ``group`` calls it.

    Returns (S (N, M) float32 array on rank 0, None on the others; info {"chunks",
    "reused", "computed" (summed over the ranks), "work", "ranks"}), as ``ChunkCache.fill``.
    """
    import torch.distributed as dist
    from tqdm.auto import tqdm

    rank, world = group.rank, group.world
    N, M = cache.shape
    ranges = list(cache.ranges())
    mine = [i for i in range(len(ranges)) if i % world == rank]
    S = np.empty((N, M), dtype=np.float32) if rank == 0 else None
    kept = {}  # the other ranks' rows, until sent
    reused = computed = 0
    try:
        total = sum(ranges[i][1] - ranges[i][0] for i in mine)
        with tqdm(total=total, unit="row", desc=f"{desc} (rank 0 of {world})", disable=not (progress and rank == 0)) as bar:
            for i in mine:
                a, b = ranges[i]
                rows, new = cache.get(a, b, compute, on_chunk)
                computed += new
                reused += not new
                if S is not None:
                    S[a:b] = rows
                else:
                    kept[i] = rows
                bar.update(b - a)
    finally:
        cache.close()
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = torch.tensor([reused, computed], dtype=torch.int64, device=comm)
    dist.all_reduce(counts)
    info = {"chunks": len(ranges), "reused": int(counts[0]), "computed": int(counts[1]), "work": str(cache.root),
            "ranks": world}
    if rank != 0:
        for i in mine:  # in chunk order, as rank 0 receives them
            dist.send(torch.from_numpy(kept.pop(i)).to(comm), dst=0)
        return None, info
    for i, (a, b) in enumerate(ranges):
        if i % world:
            buf = torch.empty((b - a, M), dtype=torch.float32, device=comm)
            dist.recv(buf, src=i % world)
            S[a:b] = buf.cpu().numpy()
    return S, info
