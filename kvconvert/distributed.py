"""torch.distributed plumbing shared by conversion and healing under ``torchrun``.

Launched by ``torchrun --nproc-per-node N -m kvconvert ...`` every process finds WORLD_SIZE,
RANK and LOCAL_RANK in its environment; without them everything here is a no-op for one
process (rank 0 of 1), so the same code runs both ways.
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any

import torch

#: How long a collective may wait. Rank 0 alone samples the training text, evaluates and
#: writes the output while the other ranks wait in a broadcast or a barrier; NCCL's default
#: (10 minutes) is shorter than writing a large checkpoint. A rank that dies is still caught
#: at once: torchrun stops the others.
TIMEOUT = timedelta(hours=2)


def world_size() -> int:
    """The number of processes torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for CUDA under torchrun, else ``device``."""
    if device.type == "cuda" and world_size() > 1 and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def dist_setup(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when launched by torchrun.

    NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on CPU.
    """
    import torch.distributed as dist

    if world_size() <= 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_device(device))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        atexit.register(_leave)
    return dist.get_rank(), dist.get_world_size()


def _leave() -> None:
    """Destroy the process group while the interpreter is still whole. Left to interpreter
    shutdown, gloo's worker threads can outlive it, and the rank dies with SIGABRT
    ("terminate called without an active exception") after its work is done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def broadcast_tokens(tokens: torch.Tensor | None, world: int, device: torch.device) -> torch.Tensor:
    """Rank 0's 2-D token ids on every rank (``tokens`` is ignored on the others).

    ``device`` is where the collective runs (NCCL needs CUDA tensors); the result is on CPU.
    """
    if world == 1:
        assert tokens is not None
        return tokens
    import torch.distributed as dist

    is_src = dist.get_rank() == 0
    shape = torch.tensor(list(tokens.shape) if is_src else [0, 0], dtype=torch.long, device=device)
    dist.broadcast(shape, src=0)
    if is_src:
        buf = tokens.to(device, torch.long).contiguous()
    else:
        buf = torch.empty(*shape.tolist(), dtype=torch.long, device=device)
    dist.broadcast(buf, src=0)
    return buf.cpu()


def sum_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of a tensor over the ranks (every rank gets it)."""
    if world == 1:
        return value
    import torch.distributed as dist

    out = value.clone()
    dist.all_reduce(out)
    return out


def mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """The mean of a tensor over the ranks (every rank gets it)."""
    return value if world == 1 else sum_over_ranks(value, world) / world


def from_rank0(value: Any, world: int) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
