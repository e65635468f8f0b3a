"""Count the operations that make the host wait for a GPU, on any device (a CPU too).

A CUDA kernel runs asynchronously: the host queues work and goes on, unless it needs a value
back (`.item()`, `bool(t)`), or an output's size depends on the data (boolean-mask indexing,
`nonzero`, `unique`, `bincount`). Each such operation drains the queue. `HostSyncs` records
them as they are dispatched, so a loop can be checked on a CPU for what it would cost on a GPU.
It counts every such operation, also on tensors that stay on the host; the training step keeps
its host-side bookkeeping in plain Python, so that what it counts there is what a GPU waits for.

    with HostSyncs() as s:
        ...
    s.count, s.ops  # total, and per operation ("_local_scalar_dense", "index (bool mask)", ...)
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# output sizes or Python values that depend on the data
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
           "bincount", "equal", "is_nonzero", "argwhere", "repeat_interleave"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}  # sync only with a boolean mask


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "repeat_interleave" and (kwargs or {}).get("output_size") is not None:
            pass  # the output size is given: no sync
        elif name in SYNCING:
            self.ops[name] += 1
        elif name in INDEXING:
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                self.ops[f"{name} (bool mask)"] += 1
        return func(*args, **(kwargs or {}))
