"""Many processes (torchrun): each process takes a share of every mini-batch; the loss and the
trained tensors' gradients are summed over processes, so every process takes the same step.
Without torchrun every function here is the identity."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


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
