"""Process-group helpers for training: a world of one without a launcher, barriers and reductions that are
no-ops when no process group runs."""
from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as tdist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_env() -> None:
    """Without a launcher the rendezvous variables are missing and DeepSpeed would go looking for MPI, so a
    world of one is declared: RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, MASTER_ADDR=127.0.0.1, a free MASTER_PORT.
    A launcher's variables (WORLD_SIZE set) are left as they are."""
    if "WORLD_SIZE" in os.environ:
        return
    for key, val in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, val)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed() -> tuple[int, int, int]:
    """Start the process group (once) and return (rank, world_size, local_rank); see set_single_process_env."""
    set_single_process_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)  # before the process group, so NCCL binds each rank to its own GPU
    elif "OMP_NUM_THREADS" not in os.environ:  # split the cores between the processes of this node
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    if not tdist.is_initialized():
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    return tdist.get_rank(), tdist.get_world_size(), local_rank


def shutdown() -> None:
    """End the process group, if one runs."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place (unchanged without a process group); returns `t`."""
    if tdist.is_initialized():
        tdist.all_reduce(t)
    return t
