"""Process groups for the probe: N local processes spawned here, or the ranks torchrun started.

gloo on CPU, nccl on CUDA. Collectives go through `all_reduce_sum`, which moves a tensor to the
device the backend can reduce on (nccl cannot reduce CPU tensors) and back.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.fabric.plugins.environments.lightning import find_free_network_port

from aimv2.errors import UserError


def pick_device(accelerator: str, rank: int = 0) -> torch.device:
    if accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("accelerator=cuda but no CUDA device is available")
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _entry(rank: int, fn: Callable, world: int, accelerator: str, init: str, args: tuple) -> None:
    backend = "nccl" if pick_device(accelerator, rank).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        if backend == "gloo":  # the CPU's cores are shared by the local processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world: int, accelerator: str, *args) -> None:
    """Run `fn(rank, world, *args)` in `world` new processes joined in one process group."""
    init = f"tcp://127.0.0.1:{find_free_network_port()}"
    mp.spawn(_entry, args=(fn, world, accelerator, init, args), nprocs=world, join=True)


def comm_device(accelerator: str, rank: int) -> torch.device:
    return pick_device(accelerator, rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum over ranks, on `tensor`'s own device (in place when it is already there)."""
    moved = tensor.to(device)
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor
