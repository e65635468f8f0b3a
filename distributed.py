"""Many processes (torchrun): each process takes a share of every mini-batch; the loss and the
trained tensors' gradients are summed over processes, so every process takes the same step.
Without torchrun every function here is the identity."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn


def launched() -> bool:
    """Started by torchrun (its environment is set), with one process or more."""
    return "LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ


def init(device: str):
    """Join torchrun's process group: NCCL with each process on its own GPU, set before anything
    touches CUDA (so "cuda" and NCCL's communicator mean that GPU, not GPU 0), gloo on CPUs."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    dist.barrier()  # every process has checked the paths before process 0 creates one


def world_and_rank() -> tuple[int, int]:
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """The sum over processes under torchrun; `t` itself otherwise."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_grads(params: dict[str, nn.Parameter]):
    for p in params.values():
        if p.grad is None:  # a process whose share of the batch was empty
            p.grad = torch.zeros_like(p)
        all_reduce(p.grad)
