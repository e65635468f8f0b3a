"""What depends on where a run's tensors live: the frozen model's dtype for training and for
evaluation, one name per device, and the memory free on it."""
from __future__ import annotations

import shutil
import tempfile

import torch

from tokenizer import CheckpointError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None, args, device) -> torch.dtype:
    """The frozen model's dtype for training (`dtype` is --dtype, None when not given): float32
    on a CPU (bf16 matrix products are several times slower there, and less exact); on a GPU
    the checkpoint's own dtype, except bfloat16 for a float16 checkpoint: training runs under
    autocast without loss scaling, and in float16's range the edited layers' small activation
    gradients underflow to zero, while bf16 has float32's range. "auto" is the checkpoint's
    dtype anywhere, float16 included. A `torch.dtype` is taken as is."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype is None:
        dtype = "float32" if torch.device(device).type == "cpu" else \
            "bfloat16" if args.torch_dtype in ("float16", "fp16") else "auto"
    if dtype == "auto":
        dtype = args.torch_dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is unknown: use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def evaluation_dtype(dtype, args, device, n_params: int, held: int = 0) -> torch.dtype:
    """The dtype evaluation scores in: --dtype when given; else float32 wherever the fp32 weights
    fit (always on a CPU; on a GPU when they take at most 80% of its free memory, counting what
    the model already holds there), else the training rule. In bf16 a prompt's greedy answer
    can depend on what it is batched with (a near tie flips with the padding); in fp32 the
    scores do not depend on --batch-size."""
    if dtype is None and torch.device(device).type == "cuda":
        free = free_bytes(device)
        if free is not None and 4 * n_params <= 0.8 * (free + held):
            return torch.float32
    return resolve_dtype(dtype, args, device)


def to_evaluation_dtype(model, dtype, device):
    """Cast a loaded model (edit.py --eval, after training) to `evaluation_dtype`, in place."""
    params = list(model.parameters())
    n, held = sum(p.numel() for p in params), sum(p.nbytes for p in params)
    return model.to(evaluation_dtype(dtype, model.args, device, n, held))


def device_name(device: str) -> str:
    """One name per device, so that the plan adds up what shares one: "cuda" is the current GPU
    ("cuda:0" unless torch was told otherwise), "cpu:0" is "cpu"; "disk" stays "disk"."""
    if device == "disk":
        return device
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        return f"cuda:{torch.cuda.current_device() if torch.cuda.is_available() else 0}"
    return "cpu" if d.type == "cpu" else str(d)


def free_bytes(device: str) -> int | None:
    """Memory free on `device` (None when unknown): the GPU's, the host's available memory, or
    for "disk" the free space of the temporary directory."""
    if device == "disk":
        return shutil.disk_usage(tempfile.gettempdir()).free
    if torch.device(device).type == "cuda":  # the driver's free memory and what torch's cache holds unused
        d = torch.device(device)
        return torch.cuda.mem_get_info(d)[0] + torch.cuda.memory_reserved(d) - torch.cuda.memory_allocated(d)
    try:
        return int(next(l for l in open("/proc/meminfo") if l.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration):
        return None
