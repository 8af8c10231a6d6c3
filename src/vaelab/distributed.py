"""torch.distributed glue: process-group setup under ``torchrun``, rank helpers, sums.

vaelab runs unchanged in one process or under ``torchrun --nproc_per_node=N``
(which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
Backend: NCCL on CUDA, gloo on CPU. A timeout makes a dead rank end the job
with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Context", "setup", "teardown", "all_reduce_sum"]

DEFAULT_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class Context:
    """Where this process sits: ``rank`` of ``world_size``; rank 0 writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> Context:
    """Join the process group when launched by torchrun; a no-op context otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        timeout = float(os.environ.get("VAELAB_DIST_TIMEOUT", DEFAULT_TIMEOUT_SECONDS))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout)
        )
    return Context(rank=rank, world_size=world_size, local_rank=local_rank)


def teardown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Sum ``tensor`` over ranks (in place and returned); identity in one process."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor

