"""torch.distributed under torchrun (design.md sec. 4): gloo on CPU, NCCL on GPU; a no-op for one process."""

from __future__ import annotations

import atexit
import os
import sys

import torch


def distributed_rank() -> tuple[int, int]:
    """(rank, world size); under torchrun the process group is started here."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and os.environ.get("LOCAL_RANK") else "gloo")
        # left to the interpreter's exit, the group's destructor can race its own threads and abort the process
        atexit.register(_leave_process_group)
    return dist.get_rank(), dist.get_world_size()


_finished = False  # set once the command succeeded on every rank and the group is gone


def _leave_process_group() -> None:
    """At exit: destroy a group still there (a failed command); after a command that succeeded everywhere, end the
    process at once. Left to the interpreter's teardown, the C++ side of the group and of torchrun's store can
    abort the process after all the work is written ("terminate called without an active exception"), which
    torchrun reports as a failed run."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if _finished:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def leave_process_group() -> None:
    """After a command has succeeded on every rank: all ranks meet at a barrier and destroy the process group
    together, so that no rank tears its connections down while another still uses them."""
    global _finished
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _finished = True


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
