"""torch.distributed under torchrun (design.md sec. 4): gloo on CPU, NCCL on GPU; a no-op for one process."""

from __future__ import annotations

import os

import torch


def distributed_rank() -> tuple[int, int]:
    """(rank, world size); under torchrun the process group is started here."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and os.environ.get("LOCAL_RANK") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (unchanged for one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
