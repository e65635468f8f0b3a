"""A delta file: the tensors an edit changed, and proof of the base they belong to.

    delta.safetensors   {checkpoint name: trained tensor (fp32, exactly as trained)}
    metadata            sha256.<name> and dtype.<name>: the original tensor as the checkpoint
                        stores it; plus whatever the writer adds (layer, hyper-parameters, ...)

`apply` refuses a delta made for another base (or an already edited model) by hashing the
model's tensor in the checkpoint's dtype; it returns the replaced values, so
`model.load_tensors(originals)` restores the base bit for bit. A delta trained on top of an
earlier one (`edit.py --base-delta`) also holds that parent's tensors, so it too applies to the
original base; its metadata names the parent. `export` writes a whole
checkpoint directory in the checkpoint's own dtype, which transformers or vLLM load as usual.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import checkpoint_files


class DeltaError(ValueError):
    """A delta file that cannot be applied; the message names the file and the problem."""


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


def stored_tensors(ckpt_dir, names) -> dict[str, torch.Tensor]:
    """The named tensors exactly as the checkpoint files store them (their own dtype)."""
    found = {}
    for f in checkpoint_files(ckpt_dir):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in set(names) & set(sf.keys()):
                found[name] = sf.get_tensor(name)
    return found


def save(path, ckpt_dir, trained: dict[str, torch.Tensor], meta: dict[str, str]):
    """Write the trained tensors in fp32 (what was trained is what gets evaluated), with the
    fingerprint of each original."""
    meta = dict(meta)
    for name, orig in stored_tensors(ckpt_dir, trained).items():
        meta[f"sha256.{name}"] = sha256(orig)
        meta[f"dtype.{name}"] = str(orig.dtype).removeprefix("torch.")
    save_file({n: t.detach().to("cpu", torch.float32).contiguous() for n, t in trained.items()}, str(path), meta)


def check(path, shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """Read only the delta's header and refuse, in one line, a file that is not a delta for a
    model with these parameter `shapes` (see model.parameter_shapes). Returns its metadata."""
    path = Path(path)
    if not path.is_file():
        raise DeltaError(f"delta {path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as sf:
            meta, header = sf.metadata() or {}, {n: tuple(sf.get_slice(n).get_shape()) for n in sf.keys()}
    except (SafetensorError, OSError) as e:
        raise DeltaError(f"delta {path}: not a readable safetensors file ({e})") from None
    layers = sum(1 for n in shapes if n.endswith(".input_layernorm.weight"))
    for name, shape in header.items():
        if name not in shapes:
            raise DeltaError(f"delta {path}: tensor {name} does not exist in this model (made for another base; "
                             f"this one has layers 0..{layers - 1})")
        if shape != shapes[name]:
            raise DeltaError(f"delta {path}: tensor {name} has shape {shape}, this model's is {shapes[name]}")
        if f"sha256.{name}" not in meta:
            raise DeltaError(f"delta {path}: no sha256 for {name} in its metadata; not a delta written by edit.py")
    return meta


def tensors(path) -> dict[str, torch.Tensor]:
    """The delta's tensors, as stored (fp32); check the file first."""
    with safe_open(str(path), framework="pt", device="cpu") as sf:
        return {n: sf.get_tensor(n) for n in sf.keys()}


def apply(model, path) -> dict[str, torch.Tensor]:
    """Put the delta's tensors into `model`; returns the values they replaced."""
    params = dict(model.named_parameters())
    meta = check(path, {n: tuple(p.shape) for n, p in params.items()})
    new = tensors(path)
    for name, t in new.items():
        stored_dtype = getattr(torch, meta.get(f"dtype.{name}", str(t.dtype).removeprefix("torch.")))
        if sha256(params[name].detach().to(stored_dtype)) != meta[f"sha256.{name}"]:
            raise DeltaError(f"delta {path}: tensor {name} differs from the base it was made for "
                             f"(another checkpoint, an already edited model, or a lossy --dtype)")
    return model.load_tensors(new, keep_originals=True)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def export(ckpt_dir, dest, tensors: dict[str, torch.Tensor]):
    """Write a whole checkpoint into the existing directory `dest`: the shards holding a changed
    tensor rewritten (in the checkpoint's dtype), every other shard and the config, tokenizer and
    index files copied (real copies, never links)."""
    ckpt_dir, dest = Path(ckpt_dir), Path(dest)
    for f in checkpoint_files(ckpt_dir):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            changed = tensors.keys() & set(sf.keys())
            if changed:
                new = {k: sf.get_tensor(k) for k in sf.keys()}
                for k in changed:
                    new[k] = tensors[k].to(new[k].dtype).contiguous()
                save_file(new, str(dest / f.name), metadata=sf.metadata())
                continue
        shutil.copyfile(f, dest / f.name)
    for f in ckpt_dir.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(f, dest / f.name)
