"""LocFT-BF: fine-tune one tensor of a decoder on a set of fact edits, breadth-first.

    python edit.py --ckpt weights/smollm2-135m --edits data/demo_edits.json      # -> out/<run>/

What the paper ("Fine-tuning Done Right in Model Editing") says matters, and where it is here:
- breadth-first pipeline: the whole edit set is shuffled every epoch and cut into mini-batches
  (`train_bf`); the depth-first baseline it argues against is `train_df`;
- localized tuning: only `model.layers.{L}.mlp.down_proj.weight` (or another `--module`) trains,
  with Adam; every other tensor is frozen and keeps the checkpoint dtype;
- the loss: cross-entropy on the target tokens only, target = " " + answer + EOS, averaged per
  sample then over the batch (`edit_loss`); a step is skipped when the batch loss is already
  below 1e-2, and training stops early when an epoch's mean loss is below 1e-2.

Speed without approximation: nothing below layer L trains, so layers 0..L-1 run once over all
edit sequences (`build_prefix_cache`); each step runs layers L.. from that cache and applies the
LM head only at the positions that predict target tokens.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import ftpp
import model as model_lib

__version__ = "0.1.0"

MODULES = {
    # --module -> tensors of layer L (suffixes of `model.layers.{L}.`); "layer" means all of them
    "down_proj": ["mlp.down_proj.weight"],
    "up_proj": ["mlp.up_proj.weight"],
    "gate_proj": ["mlp.gate_proj.weight"],
    "mlp": ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"],
    "attn": ["self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.o_proj."],
    "layer": [""],
}
DEFAULT_DEPTH = 0.75  # "later layers": the paper's recommended region for mlp.down_proj
STOP_LOSS = 1e-2  # skip a step below this batch loss; stop when an epoch's mean is below it


class EditError(ValueError):
    """Bad input or a failed run; the message is one line naming the flag or file."""


@dataclass
class EditConfig:
    layer: int | float | None = None  # index, negative index or relative depth (see resolve_layer)
    module: str = "down_proj"
    lr: float = 2e-3
    batch_size: int | None = None  # None: auto_batch_size(n)
    epochs: int = 25
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    pipeline: str = "bf"  # bf (LocFT-BF) or df (the depth-first baseline)
    loss_avg: str = "sample"  # sample: per-sample mean, then batch mean; token: mean over all tokens
    max_steps: int = 50  # df: steps per edit at most
    cache_device: str | None = None  # where the prefix cache lives; None: the model's device
    augment_prefixes: int = 0
    # FT++ regularisers (ftpp.py); all 0 = plain LocFT-BF, and ftpp is not even called
    smooth_alpha: float = 0.0
    general_kl: float = 0.0
    general_text: str | None = None
    local_kl: float = 0.0


# ----------------------------------------------------------------------------------------------
# Argument parsing


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: "error: argument --lr: expected one argument"
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description="LocFT-BF model editing: fine-tune one tensor on a set of edits.")
    p.add_argument("--ckpt", required=True, help="Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--edits", required=True, help="edit file (ZsRE, CounterFact, WikiBigEdit, edits.jsonl)")
    p.add_argument("--layer", default=None,
                   help="layer to edit: an index (22), a negative index (-8), or a relative depth in (0,1), "
                        "the paper's proportional position, mapped to layer round(p*N)-1 (0.25 of 28 layers "
                        f"-> 6, of 80 -> 19). Default {DEFAULT_DEPTH} (later layers)")
    p.add_argument("--module", default="down_proj", help=f"tensors to train in that layer: {', '.join(MODULES)}")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="mini-batch size (default min(100, ceil(n/10)): at least ~10 steps per epoch)")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--optimizer", choices=["adam", "adamw"], default="adam")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None,
                   help="seeds the per-epoch shuffle (default 0); with --n it also picks a reproducible random "
                        "subset of n edits, the same one evaluate.py --n N --seed S picks")
    p.add_argument("--pipeline", choices=["bf", "df"], default="bf",
                   help="bf: breadth-first LocFT-BF; df: depth-first baseline (batch 1, each edit to convergence)")
    p.add_argument("--loss-avg", choices=["sample", "token"], default="sample")
    p.add_argument("--max-steps", type=int, default=50, help="df: optimiser steps per edit at most")
    p.add_argument("--n", type=int, default=None, help="use n edits: the first n, or a random n with --seed")
    p.add_argument("--augment-prefixes", type=int, default=0,
                   help="also train k prefixed copies of each edit (data.augment_prefixes)")
    p.add_argument("--out", default=None, help="output directory (default out/<ckpt>-<edits>-<time>/)")
    p.add_argument("--export", default=None, help="also write a whole edited checkpoint directory here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --export")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="model dtype: auto, float32, bfloat16 (default: auto on CUDA, "
                                                 "float32 on CPU)")
    p.add_argument("--cache-device", default=None, help="prefix cache device (default: the model's; cpu for 100K edits)")
    p.add_argument("--eval", action="store_true", help="print reliability / generalization / locality before and after")
    g = p.add_argument_group("FT++ regularisers (all off by default; see ftpp.py)")
    g.add_argument("--smooth-alpha", type=float, default=0.0, metavar="A",
                   help="label smoothing toward the old answer: (1-A) CE(new) + A CE(old), for edits that know it")
    g.add_argument("--general-kl", type=float, default=0.0, metavar="L1",
                   help="weight of KL(edited || base) per token on general text")
    g.add_argument("--general-text", default=None, metavar="FILE",
                   help="sentences for --general-kl, one per line (default data/general_text.txt)")
    g.add_argument("--local-kl", type=float, default=0.0, metavar="L2",
                   help="weight of KL(edited || base) at the position predicting the prompt's last token")
    return p.parse_args(argv)


def resolve_layer(spec, n_layers: int) -> int:
    """--layer as an index, a negative index or a relative depth p in (0,1) -> layer round(p*N)-1."""
    valid = f"this model has layers 0..{n_layers - 1} (or -{n_layers}..-1, or a fraction in (0,1))"
    if spec is None:
        spec = DEFAULT_DEPTH
    try:
        i = int(spec)
        is_int = str(spec).strip().lstrip("+-").isdigit() or isinstance(spec, int)
    except (TypeError, ValueError):
        is_int = False
    if is_int:
        if not -n_layers <= i < n_layers:
            raise EditError(f"--layer {spec} is out of range: {valid}")
        return i % n_layers
    try:
        p = float(spec)
    except (TypeError, ValueError):
        raise EditError(f"--layer {spec!r} is not a number: {valid}") from None
    if not 0.0 < p < 1.0:
        raise EditError(f"--layer {spec} is out of range: {valid}")
    # Qwen2.5-7B layer 6 is the 7th of 28 (p = 0.25); the same depth of 80 layers is the 20th, layer 19
    return min(n_layers - 1, max(0, math.floor(p * n_layers + 0.5) - 1))


def auto_batch_size(n: int) -> int:
    """Few edits need more steps, not more epochs: aim at >= ~10 optimiser steps per epoch."""
    return min(100, max(1, math.ceil(n / 10)))


# ----------------------------------------------------------------------------------------------
# Which tensors train


def select_params(model, layer: int, module: str) -> dict[str, nn.Parameter]:
    """The checkpoint-named parameters that `--module` at `--layer` trains."""
    if module not in MODULES:
        raise EditError(f"--module {module!r} is unknown: use one of {', '.join(MODULES)}")
    prefix = f"model.layers.{layer}."
    names = dict(model.named_parameters())
    chosen = {n: p for n, p in names.items()
              if n.startswith(prefix) and any(n[len(prefix):].startswith(s) for s in MODULES[module])}
    if not chosen:
        raise EditError(f"--module {module} selects no tensor in layer {layer}")
    return chosen


def _set_param(model, name: str, p: nn.Parameter):
    owner, attr = name.rsplit(".", 1)
    setattr(model.get_submodule(owner), attr, p)


# ----------------------------------------------------------------------------------------------
# The frozen prefix: layers 0..L-1 run once


class PrefixCache:
    """Hidden states entering layer L for every training sequence: (N, T_max, D), right-padded."""

    row_tokens = 1024  # packed rows hold at most this many tokens (attention is quadratic in it)

    def __init__(self, h: torch.Tensor, encoded: list[tuple[list[int], int]], pad_id: int):
        self.h, self.encoded, self.pad_id = h, encoded, pad_id

    def batch(self, idx: list[int], device, packed: bool = True) -> tuple[torch.Tensor, data.Batch]:
        """The rows `idx`: packed back to back in one row (no compute on padding; the default),
        or right-padded to the batch's longest sequence."""
        seqs = [self.encoded[i] for i in idx]
        if packed:
            b = data.pack(seqs, self.row_tokens)
            h = torch.zeros(*b.ids.shape, self.h.shape[-1], dtype=self.h.dtype, device=self.h.device)
            real = b.segments >= 0  # each packed token's hidden state, from its own sequence's cache row
            rows = torch.as_tensor(idx, device=self.h.device)[b.segments[real].to(self.h.device)]
            h[real.to(self.h.device)] = self.h[rows, b.positions[real].to(self.h.device)]
            return h.to(device, non_blocking=True), b.to(device)
        b = data.collate(seqs, self.pad_id).to(device)
        T = b.ids.shape[1]  # the batch's own max length, not the whole set's
        rows = torch.as_tensor(idx, device=self.h.device)
        h = self.h.index_select(0, rows)[:, :T].to(device, non_blocking=True)
        return h, b


@torch.no_grad()
def build_prefix_cache(model, encoded, pad_id: int, layer: int, cache_device=None, batch_size: int = 64) -> PrefixCache:
    """Run layers 0..layer-1 once over all sequences. Exact: right padding + causal attention
    means no real token ever sees a pad, and nothing below `layer` changes during training."""
    dev = model.lm_head.weight.device
    cache_device = torch.device(cache_device) if cache_device else dev
    D, T_max = model.args.dim, max(len(ids) for ids, _ in encoded)
    dtype = model.model.embed_tokens.weight.dtype
    h_all = torch.zeros(len(encoded), T_max, D, dtype=dtype, device=cache_device,
                        pin_memory=cache_device.type == "cpu" and dev.type == "cuda")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths, little padding
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = data.collate([encoded[i] for i in idx], pad_id).to(dev)
        h = model.hidden_states(b.ids, layer=layer)  # (B, T, D), attention_mask=None: fused causal path
        h_all[torch.as_tensor(idx, device=cache_device), : h.shape[1]] = h.to(cache_device)
    return PrefixCache(h_all, encoded, pad_id)


# ----------------------------------------------------------------------------------------------
# The loss


def target_ce(logits: torch.Tensor, batch: data.Batch, loss_avg: str = "sample") -> torch.Tensor:
    """CE of logits (N, V) at `batch.predict_mask` against the target tokens (answer + EOS)."""
    ce = F.cross_entropy(logits.float(), batch.labels, reduction="none")  # (N,)
    if loss_avg == "token":
        return ce.mean()
    return batch.per_sample_mean(ce)[0].mean()  # the authors': per sample, then over the batch


def edit_loss(model, h: torch.Tensor, batch: data.Batch, layer: int, loss_avg: str = "sample") -> torch.Tensor:
    """The training objective for one mini-batch: layers L.. from the cached h, head only at
    target-predicting positions. Extra terms (FT++ regularisers) belong here."""
    logits = model.forward_from(h, layer, positions=batch.positions, segments=batch.segments,
                                logits_at=batch.predict_mask)  # (N, V)
    return target_ce(logits, batch, loss_avg)


# ----------------------------------------------------------------------------------------------
# Training: breadth-first (LocFT-BF) and the depth-first baseline


def step_loss(model, reg, idx, h, batch, cfg: EditConfig, parts_log: dict) -> torch.Tensor:
    """The objective of one step: plain `edit_loss`, or FT++'s when a regulariser is on."""
    if reg is None:
        return edit_loss(model, h, batch, cfg.layer, cfg.loss_avg)
    loss, parts = reg.loss(model, idx, h, batch, cfg.loss_avg)
    for k, v in parts.items():
        parts_log.setdefault(k, []).append(v.item())
    return loss


def _fmt_s(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


def _check_finite(loss: torch.Tensor, where: str, cfg: EditConfig):
    if not torch.isfinite(loss):
        raise EditError(f"loss is {loss.item()} at {where}; training diverged, try a lower --lr (now {cfg.lr:g})")


def train_bf(model, cache: PrefixCache, params, cfg: EditConfig, opt, autocast, say, reg=None) -> dict:
    n, dev = len(cache.encoded), model.lm_head.weight.device
    bs = cfg.batch_size or auto_batch_size(n)
    g = torch.Generator().manual_seed(cfg.seed)
    log = {"batch_size": bs, "epochs": []}
    t0 = time.time()
    for epoch in range(1, cfg.epochs + 1):
        te = time.time()
        perm = torch.randperm(n, generator=g).tolist()  # breadth-first: reshuffle the whole set each epoch
        losses, steps, skipped, parts = [], 0, 0, {}
        for s in range(0, n, bs):
            idx = perm[s:s + bs]
            h, batch = cache.batch(idx, dev, packed=reg is None)  # FT++ indexes padded rows
            with autocast:
                loss = step_loss(model, reg, idx, h, batch, cfg, parts)
            _check_finite(loss, f"epoch {epoch}, step {s // bs + 1}", cfg)
            losses.append(loss.item())
            if losses[-1] < STOP_LOSS:  # this batch is already learnt: do not push it further
                skipped += 1
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        mean = sum(losses) / len(losses)
        sec = time.time() - te
        log["epochs"].append({"epoch": epoch, "mean_loss": mean, "steps": steps, "skipped": skipped, "seconds": sec,
                              **{k: sum(v) / len(v) for k, v in parts.items()}})  # FT++ terms, when on
        eta = (time.time() - t0) / epoch * (cfg.epochs - epoch)
        say(f"epoch {epoch}/{cfg.epochs}: loss {mean:.4f}, steps {steps} (skipped {skipped}), {sec:.1f}s, eta {_fmt_s(eta)}")
        if mean < STOP_LOSS:  # early stop: the whole edit set is learnt
            break
    return log


def train_df(model, cache: PrefixCache, params, cfg: EditConfig, opt, autocast, say, reg=None) -> dict:
    """The depth-first baseline: batch 1, edits in order, each trained to convergence, one pass."""
    n, dev = len(cache.encoded), model.lm_head.weight.device
    log = {"batch_size": 1, "edits": []}
    t0 = time.time()
    for i in range(n):
        h, batch = cache.batch([i], dev, packed=reg is None)
        steps = 0
        while True:
            with autocast:
                loss = step_loss(model, reg, [i], h, batch, cfg, {})
            _check_finite(loss, f"edit {i}, step {steps + 1}", cfg)
            if loss.item() < STOP_LOSS or steps >= cfg.max_steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        log["edits"].append({"edit": i, "steps": steps, "final_loss": loss.item()})
        if (i + 1) % max(1, n // 10) == 0 or i + 1 == n:
            el = time.time() - t0
            say(f"edit {i + 1}/{n}: loss {loss.item():.4f}, steps {steps}, {el:.1f}s, eta {_fmt_s(el / (i + 1) * (n - i - 1))}")
    return log


def training_pairs(edits, cfg: EditConfig) -> list[tuple[str, str]]:
    if cfg.augment_prefixes <= 0:
        return [(e.prompt, e.target) for e in edits]
    if not hasattr(data, "augment_prefixes"):
        raise EditError("--augment-prefixes needs data.augment_prefixes, which this data.py does not have")
    try:
        return data.augment_prefixes(edits, cfg.augment_prefixes, cfg.seed)
    except ValueError as e:
        raise EditError(str(e)) from None


def ftpp_regularizer(model, tok, edits, pairs, encoded, cache, cfg: EditConfig):
    """FT++'s cached base distributions, built before training (with the base weights in
    place); None when every FT++ weight is 0."""
    ft = ftpp.FTPPConfig(cfg.smooth_alpha, cfg.general_kl, cfg.general_text, cfg.local_kl)
    if not ft.active:
        return None
    per_edit = len(pairs) // len(edits)  # --augment-prefixes: each edit's pairs are consecutive
    olds = [e.old_answer for e in edits for _ in range(per_edit)]
    try:
        return ftpp.FTPP(model, tok, pairs, olds, encoded, cfg.layer, ft, cache=cache, seed=cfg.seed,
                         prefix_cache=lambda enc: build_prefix_cache(model, enc, tok.pad_id, cfg.layer, cfg.cache_device))
    except ValueError as e:
        raise EditError(str(e)) from None


def edit(model, tok, edits, cfg: EditConfig, say=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the selected tensors on `edits`; returns ({name: trained fp32 tensor}, log).

    The model is left as it was (its original parameters are put back); apply the result with
    `model.load_tensors` / `apply_delta`. Gradients and Adam state exist only for the trained tensors.
    """
    say = say or (lambda s: print(s, flush=True))
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise EditError(f"--lr must be positive, got {cfg.lr}")
    if not edits:
        raise EditError("the edit set is empty")
    cfg = replace(cfg, layer=resolve_layer(cfg.layer, model.args.n_layers))
    dev = model.lm_head.weight.device
    frozen_dtype = model.model.embed_tokens.weight.dtype
    t0 = time.time()
    pairs = training_pairs(edits, cfg)
    encoded = [data.encode_edit(tok, p, t) for p, t in pairs]
    if cfg.pipeline == "bf" and cfg.batch_size is None:
        cfg = replace(cfg, batch_size=auto_batch_size(len(encoded)))  # recorded in the delta's hparams
    cache = build_prefix_cache(model, encoded, tok.pad_id, cfg.layer, cfg.cache_device)
    reg = ftpp_regularizer(model, tok, edits, pairs, encoded, cache, cfg)  # None for plain LocFT-BF
    prefix_s = time.time() - t0

    originals = select_params(model, cfg.layer, cfg.module)
    # an fp32 master copy of each trained tensor; the frozen rest stays in the checkpoint dtype
    params = {n: nn.Parameter(p.detach().float().clone()) for n, p in originals.items()}
    for n, p in params.items():
        _set_param(model, n, p)
    Opt = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = Opt(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # bf16 autocast when the frozen model is low precision (CUDA); plain fp32 otherwise
    autocast = torch.autocast(dev.type, dtype=frozen_dtype, enabled=frozen_dtype != torch.float32)
    model.train(False)  # no dropout in these models, but be explicit: eval-mode forward
    try:
        train = train_df if cfg.pipeline == "df" else train_bf
        log = train(model, cache, params, cfg, opt, autocast, say, reg)
    finally:
        for n, p in originals.items():
            _set_param(model, n, p)
    del cache
    log.update(n_edits=len(edits), n_sequences=len(encoded), prefix_seconds=prefix_s,
               seconds=time.time() - t0, config=asdict(cfg))
    if reg is not None:
        log["ftpp"] = reg.stats
    if cfg.pipeline == "bf":
        ep = log["epochs"]
        log.update(epochs_run=len(ep), final_loss=ep[-1]["mean_loss"], stopped_early=ep[-1]["mean_loss"] < STOP_LOSS)
    else:
        log.update(epochs_run=1, final_loss=sum(e["final_loss"] for e in log["edits"]) / len(log["edits"]))
    return {n: p.detach() for n, p in params.items()}, log


# ----------------------------------------------------------------------------------------------
# Saving, applying, exporting


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


def checkpoint_tensors(ckpt_dir, names) -> dict[str, tuple[Path, torch.Tensor]]:
    """The named tensors exactly as stored in the checkpoint files (their own dtype)."""
    from safetensors import safe_open

    found = {}
    for f in model_lib.checkpoint_files(ckpt_dir):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in set(names) & set(sf.keys()):
                found[name] = (f, sf.get_tensor(name))
    return found


def save_delta(path, ckpt_dir, trained: dict[str, torch.Tensor], meta: dict[str, str]):
    """delta.safetensors: the trained tensors in the checkpoint's own dtype, with the sha256 of
    each original so `apply_delta` can refuse another base."""
    from safetensors.torch import save_file

    stored = checkpoint_tensors(ckpt_dir, trained)
    tensors, meta = {}, dict(meta)
    for name, t in trained.items():
        orig = stored[name][1]
        tensors[name] = t.to(device="cpu", dtype=orig.dtype).contiguous()
        meta[f"sha256.{name}"] = tensor_sha256(orig)
    save_file(tensors, str(path), metadata=meta)


def revert_delta(model, originals: dict[str, torch.Tensor]):
    model.load_tensors(originals)


def apply_delta(model, path) -> dict[str, torch.Tensor]:
    """Apply delta.safetensors to a loaded model; refuses a delta made for another base."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise EditError(f"delta {path}: does not exist")
    params = dict(model.named_parameters())
    with safe_open(str(path), framework="pt", device="cpu") as sf:
        meta = sf.metadata() or {}
        delta = {n: sf.get_tensor(n) for n in sf.keys()}
    for name, t in delta.items():
        if name not in params:
            raise EditError(f"delta {path}: tensor {name} does not exist in this model (made for another base)")
        p = params[name]
        if tuple(p.shape) != tuple(t.shape):
            raise EditError(f"delta {path}: tensor {name} has shape {tuple(t.shape)}, this model's is {tuple(p.shape)}")
        want = meta.get(f"sha256.{name}")
        if want is None:
            raise EditError(f"delta {path}: no sha256 for {name} in its metadata; not a delta written by edit.py")
        if tensor_sha256(p.detach().to(t.dtype)) != want:
            raise EditError(f"delta {path}: tensor {name} differs from the base it was made for "
                            f"(another checkpoint, an already edited model, or a lossy --dtype)")
    return model.load_tensors(delta, keep_originals=True)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def export_checkpoint(ckpt_dir, dest, delta: dict[str, torch.Tensor]):
    """Write a whole checkpoint dir into `dest`: shards holding a changed tensor rewritten, every
    other shard and the config / tokenizer / index files copied (real copies, never links)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt_dir, dest = Path(ckpt_dir), Path(dest)
    for f in model_lib.checkpoint_files(ckpt_dir):
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            keys, meta = list(sf.keys()), sf.metadata()
            if delta.keys() & set(keys):
                tensors = {k: sf.get_tensor(k) for k in keys}
                for k in delta.keys() & set(keys):
                    tensors[k] = delta[k].to(tensors[k].dtype).contiguous()
                save_file(tensors, str(dest / f.name), metadata=meta)
                continue
        shutil.copyfile(f, dest / f.name)
    for f in ckpt_dir.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(f, dest / f.name)


def _atomic_dir(final: Path, write, overwrite: bool):
    """Build a directory next to `final`, then move it into place; nothing half-written remains."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if final.exists():
            if not overwrite:
                raise EditError(f"{final} exists; pass --overwrite to replace it")
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# The command line


def _check_paths(args, ckpt: Path, out: Path):
    """Refuse outputs that would overwrite, sit in, or contain the base checkpoint."""
    c = ckpt.resolve()
    for flag, p in (("--out", out), ("--export", Path(args.export) if args.export else None)):
        if p is None:
            continue
        r = p.resolve()
        if r == c or c in r.parents or r in c.parents:
            raise EditError(f"{flag} {p} overlaps the base checkpoint {ckpt}; the base is never written")
        if p.exists() and not args.overwrite:
            raise EditError(f"{flag} {p} exists; pass --overwrite to replace it")


def run(args) -> Path:
    ckpt = Path(args.ckpt)
    margs = model_lib.read_args(ckpt)
    if args.module not in MODULES:
        raise EditError(f"--module {args.module!r} is unknown: use one of {', '.join(MODULES)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise EditError(f"--lr must be positive, got {args.lr}")
    for flag, v in (("--batch-size", args.batch_size), ("--epochs", args.epochs), ("--max-steps", args.max_steps)):
        if v is not None and v <= 0:
            raise EditError(f"{flag} must be positive, got {v}")
    if args.augment_prefixes < 0:
        raise EditError(f"--augment-prefixes must be >= 0, got {args.augment_prefixes}")
    if not 0 <= args.smooth_alpha <= 1:
        raise EditError(f"--smooth-alpha must be in [0, 1], got {args.smooth_alpha}")
    for flag, v in (("--general-kl", args.general_kl), ("--local-kl", args.local_kl)):
        if not (v >= 0 and math.isfinite(v)):
            raise EditError(f"{flag} must be >= 0, got {v}")
    if args.general_text and not Path(args.general_text).is_file():
        raise EditError(f"--general-text {args.general_text}: file does not exist")
    layer = resolve_layer(args.layer, margs.n_layers)
    edits = data.load_edits(args.edits, n=args.n, seed=args.seed)
    if not edits:
        raise EditError(f"edits file {args.edits}: no edits")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("out") / f"{ckpt.resolve().name}-{Path(args.edits).stem}-{stamp}"
    _check_paths(args, ckpt, out)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("auto" if device.startswith("cuda") else "float32")
    model, tok = model_lib.load(ckpt, device=device, dtype=dtype)
    cfg = EditConfig(layer=layer, module=args.module, lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                     optimizer=args.optimizer, weight_decay=args.weight_decay, seed=args.seed if args.seed is not None else 0,
                     pipeline=args.pipeline, loss_avg=args.loss_avg, max_steps=args.max_steps,
                     cache_device=args.cache_device, augment_prefixes=args.augment_prefixes,
                     smooth_alpha=args.smooth_alpha, general_kl=args.general_kl, general_text=args.general_text,
                     local_kl=args.local_kl)
    names = list(select_params(model, layer, args.module))
    print(f"editing {len(edits)} edits into {', '.join(names)} ({args.pipeline}, lr {cfg.lr:g}, "
          f"batch {cfg.batch_size or auto_batch_size(len(edits)) if args.pipeline == 'bf' else 1})", flush=True)
    trained, log = edit(model, tok, edits, cfg)
    cfg = EditConfig(**log["config"])  # with the resolved batch size

    meta = {"format": "pt", "layer": str(layer), "module": args.module, "n_edits": str(len(edits)),
            "seed": str(cfg.seed), "hparams": json.dumps(asdict(cfg)), "base_ckpt": str(ckpt.resolve()),
            "torch_version": torch.__version__, "locft_version": __version__}

    def write_out(d: Path):
        save_delta(d / "delta.safetensors", ckpt, trained, meta)
        with open(d / "edits.jsonl", "w") as f:
            for e in edits:
                f.write(json.dumps(e.to_json(), ensure_ascii=False) + "\n")
        (d / "train_log.json").write_text(json.dumps(log, indent=1))

    _atomic_dir(out, write_out, args.overwrite)
    from safetensors.torch import load_file

    delta = load_file(str(out / "delta.safetensors"))  # exactly what apply_delta / --export use
    if args.export:
        _atomic_dir(Path(args.export), lambda d: export_checkpoint(ckpt, d, delta), args.overwrite)
    print(f"done: {len(edits)} edits, {log['epochs_run']} epochs, final loss {log['final_loss']:.4f}, "
          f"{log['seconds']:.1f}s -> {out}" + (f" (export: {args.export})" if args.export else ""), flush=True)
    if args.eval:
        import evaluate  # lazily: evaluate imports this module

        params = dict(model.named_parameters())
        base = {n: params[n].detach().clone() for n in delta}
        edited = {n: t.to(device=params[n].device, dtype=params[n].dtype) for n, t in delta.items()}
        report = evaluate.before_after(model, tok, edits, base, edited)
        evaluate.print_report(report)
        evaluate.write_report(report, out / "eval.json")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (EditError, data.EditFileError, model_lib.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
