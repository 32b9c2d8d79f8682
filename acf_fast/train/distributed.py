"""torch.distributed glue: DDP under ``torchrun`` (one process per GPU) or gloo on CPU.

``torchrun --nproc_per_node=G -m acf_fast train ...`` sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT; :func:`setup` reads them. Each rank takes
its own shard of every epoch's permutation (``DistributedSampler``), so the global
batch is ``batch_size × world_size``; DDP averages the gradients. Validation and
checkpoints happen on rank 0 only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group and must destroy it

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE as ``torchrun`` sets it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    """LOCAL_RANK as ``torchrun`` sets it: this process's index on its node (0 without)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup(device: torch.device, timeout: Optional[timedelta] = None) -> DistInfo:
    """Join the process group described by the environment (or an existing one).

    ``timeout``: how long a collective or send/recv may wait for the other ranks
    (torch's default when None: 10 minutes for NCCL, 30 for gloo)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), env_local_rank(), False)
    world = env_world_size()
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, **({} if timeout is None else {"timeout": timeout}))
    return DistInfo(dist.get_rank(), dist.get_world_size(), env_local_rank(), True)


def teardown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DDP-wrap ``module`` when running distributed, else return it as is."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids: Optional[list] = [device.index] if device.type == "cuda" else None
    # Some weights may get no gradient in a configuration (e.g. acf-code has no
    # fusion weights, a frozen encoder none at all): let DDP look for them.
    return DDP(module, device_ids=ids, find_unused_parameters=True)


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
