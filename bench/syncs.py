"""Count the operations that make the host wait for a GPU, on any device (a CPU too).

A CUDA kernel runs asynchronously: the host queues work and goes on, unless it needs a value
back (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`), or an output's size depends on the data
(boolean-mask indexing, `nonzero`, `unique`, `bincount`). Each such operation drains the queue.
`HostSyncs` records them as they are called, so a loop can be checked on a CPU for what it would
cost on a GPU. It counts every such operation, also on tensors that stay on the host; the
training step keeps its host-side bookkeeping in plain Python, so that what it counts there is
what a GPU waits for. (Copies from the host to a GPU without `non_blocking` wait too; a CPU run
cannot see those: on a GPU, `torch.cuda.set_sync_debug_mode` does.)

    with HostSyncs() as s:
        ...
    s.count, s.ops  # total, and per operation ("_local_scalar_dense", "index (bool mask)", ...)
"""
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# output sizes or Python values that depend on the data
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
           "bincount", "equal", "is_nonzero", "argwhere", "repeat_interleave"}
INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}  # sync only with a boolean mask


TO_HOST = {"tolist", "cpu", "numpy"}  # seen as calls: on a CPU tensor they dispatch nothing


class HostSyncs:
    def __init__(self):
        self.ops = Counter()
        self.modes = [_Calls(self.ops), _Ops(self.ops)]

    @property
    def count(self) -> int:
        return sum(self.ops.values())

    def __enter__(self):
        for m in self.modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self.modes):
            m.__exit__(*exc)


class _Calls(TorchFunctionMode):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in TO_HOST:
            self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops

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
