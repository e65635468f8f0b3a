"""LocFT-BF: teach a decoder new facts by fine-tuning one tensor, breadth-first.

    python edit.py --ckpt weights/smollm2-135m --edits data/demo_edits.json      # -> out/<run>/

The method ("Fine-tuning Done Right in Model Editing"), in the order `locft_bf` runs it:
1. targets: prompt + " " + answer + EOS; the loss is cross-entropy on the answer and EOS only;
2. nothing below the edited layer L trains, so layers 0..L-1 run once over every sequence and
   each step starts from their output (exact, and the main reason this is fast);
3. localized tuning: an fp32 copy of one tensor, `model.layers.{L}.mlp.down_proj.weight` by
   default (`mlp.shared_expert.down_proj.weight` on a Qwen2-MoE sparse layer), is the only thing
   that trains, with Adam;
4. breadth-first: every epoch shuffles the whole edit set and walks it in mini-batches; a step
   is skipped when its batch loss is already below 1e-2, and training stops once an epoch's
   mean loss is below 1e-2.
`depth_first` is the pipeline the paper argues against (one edit at a time, each to
convergence), written the same way so the two can be compared. FT++'s regularisers (ftpp.py)
enter the loss in one line of `batch_loss`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import capability
import data
import delta
import evaluate
import ftpp
import model as model_lib

__version__ = "0.2.0"

MODULES = {
    # --module -> tensors of layer L (name prefixes after `model.layers.{L}.`); "layer": all of them
    "down_proj": ["mlp.down_proj.weight"],
    "up_proj": ["mlp.up_proj.weight"],
    "gate_proj": ["mlp.gate_proj.weight"],
    "mlp": ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"],
    "attn": ["self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.o_proj."],
    "layer": [""],
    # Qwen2-MoE's sparse layers: the shared expert every token goes through (the routed experts
    # and the router train only with "layer")
    "shared_expert.down_proj": ["mlp.shared_expert.down_proj.weight"],
    "shared_expert.up_proj": ["mlp.shared_expert.up_proj.weight"],
    "shared_expert.gate_proj": ["mlp.shared_expert.gate_proj.weight"],
    "shared_expert": ["mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight",
                      "mlp.shared_expert.down_proj.weight"],
}
MOE_MODULE = "shared_expert.down_proj"  # the default on a sparse layer: the paper's Appendix A.2
STOP_LOSS = 1e-2  # skip a step below this batch loss; stop when an epoch's mean is below it


def say(line: str):
    print(line, flush=True)  # progress lines show at once, also through a pipe or `tee`


@dataclass
class Hparams:
    """Every training choice and its default, defined here only (the CLI's defaults come from it)."""
    layer: int | float = 0.75  # an index, or a relative depth in (0, 1): "later layers" by default
    module: str = "down_proj"
    lr: float = 2e-3
    batch_size: int | None = None  # None: auto_batch_size(number of training sequences)
    epochs: int = 25
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0  # the per-epoch shuffle
    pipeline: str = "bf"  # bf: LocFT-BF; df: the depth-first baseline
    loss_avg: str = "sample"  # sample: mean over each edit's target tokens, then over the batch
    max_steps: int = 25  # df: steps per edit at most (EasyEdit FT-M's num_steps)
    augment_prefixes: int = 0  # also train each prompt behind k unrelated prefixes
    # FT++ (ftpp.py); all 0 is plain LocFT-BF
    smooth_alpha: float = 0.0
    general_kl: float = 0.0
    general_text: str = str(Path(__file__).resolve().parent / "data" / "general_text.txt")
    local_kl: float = 0.0


class EditError(ValueError):
    """Bad input or a failed run; the message is one line naming the flag or file."""


def auto_batch_size(n: int) -> int:
    """Few edits need more steps, not more epochs: aim at >= ~10 optimiser steps per epoch."""
    return min(100, max(1, math.ceil(n / 10)))


def in_module(name: str, module: str) -> bool:
    """Whether a tensor of a layer (its name after `model.layers.{L}.`) belongs to `module`."""
    return any(name.startswith(s) for s in MODULES[module])


def select_params_by_name(params: dict, layer: int, module: str) -> dict:
    """The entries of {checkpoint name: ...} that `module` names in `layer`."""
    prefix = f"model.layers.{layer}."
    return {n: p for n, p in params.items() if n.startswith(prefix) and in_module(n[len(prefix):], module)}


def select_params(model, layer: int, module: str) -> dict[str, nn.Parameter]:
    """The checkpoint-named parameters that `module` names in `layer`."""
    return select_params_by_name(dict(model.named_parameters()), layer, module)


@contextmanager
def trainable_copies(model, names):
    """Swap the named parameters for trainable fp32 copies; put the originals back afterwards.
    The frozen rest of the model keeps its dtype and never gets a gradient."""
    def put(name, p):
        owner, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(owner), attr, p)

    originals = {n: model.get_parameter(n) for n in names}
    copies = {n: nn.Parameter(p.detach().float().clone()) for n, p in originals.items()}
    for n, p in copies.items():
        put(n, p)
    try:
        yield copies
    finally:
        for n, p in originals.items():
            put(n, p)


def make_optimizer(params: dict[str, nn.Parameter], hp: Hparams) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
    return opt(params.values(), lr=hp.lr, weight_decay=hp.weight_decay)


# ----------------------------------------------------------------------------------------------
# LocFT-BF


def prepare(model, tok, edits: list[data.Edit], hp: Hparams, cache_device=None, say=say):
    """Steps 1 and 2: the training sequences, their prefix cache at layer L, and FT++'s cached
    base distributions (None when FT++ is off), all computed while the model is the base."""
    k = hp.augment_prefixes  # each edit's k prefixed copies follow it
    pairs = data.augment_prefixes(edits, k, hp.seed) if k else [(e.prompt, e.target) for e in edits]
    encoded = [data.encode_edit(tok, p, t) for p, t in pairs]  # prompt + " " + answer + EOS
    cache = data.PrefixCache(model, encoded, tok.pad_id, hp.layer, cache_device)
    reg = None
    if ftpp.active(hp):
        per = [e for e in edits for _ in range(k + 1)]
        reg = ftpp.FTPP(model, tok, pairs, [e.subject for e in per], [e.old_answer for e in per], encoded,
                        cache, hp, say)
    return encoded, cache, reg


def locft_bf(model, tok, edits: list[data.Edit], hp: Hparams, cache_device=None, say=say, checkpoint=None):
    """Fine-tune `hp.module` of layer `hp.layer` on `edits`, breadth-first. Returns
    ({name: trained fp32 tensor}, log); the model is left exactly as it was. With `checkpoint`
    (a path), the state after every epoch is saved there, and a run finding one continues it."""
    t0 = time.time()
    encoded, cache, reg = prepare(model, tok, edits, hp, cache_device, say)  # steps 1, 2
    n = len(encoded)
    bs = hp.batch_size or auto_batch_size(n)
    log = {"batch_size": bs, "prefix_seconds": time.time() - t0, "epochs": []}
    L, N = hp.layer, model.args.n_layers
    guess = f"; about {fmt_seconds(cache.seconds * 3 * (N - L) / L)} per epoch" if L and reg is None else ""
    say(f"{n} training sequences ({sum(len(ids) for ids, _ in encoded)} tokens), batch {bs} "
        f"({math.ceil(n / bs)} steps per epoch), up to {hp.epochs} epochs{guess}")
    shuffle = torch.Generator().manual_seed(hp.seed)
    with trainable_copies(model, select_params(model, hp.layer, hp.module)) as params:  # step 3
        opt = make_optimizer(params, hp)
        first = checkpoint.restore(params, opt, shuffle, log, say) + 1 if checkpoint and checkpoint.path.exists() else 1
        for epoch in range(first, hp.epochs + 1):  # step 4
            te, total, steps, skipped = time.time(), 0.0, 0, 0
            order = torch.randperm(n, generator=shuffle).tolist()  # the whole set, reshuffled
            for s in range(0, n, bs):
                idx = order[s:s + bs]  # a mini-batch
                loss = batch_loss(model, cache, idx, hp, reg)  # with torchrun: this process's share of it
                value = all_reduce(loss.detach()).item()  # the mini-batch's loss, the same in every process
                check_finite(value, f"epoch {epoch}, step {s // bs + 1}", hp)
                total += value * len(idx)  # the epoch's mean weighs each batch by its size
                if value < STOP_LOSS:  # already learnt: no step
                    skipped += 1
                    continue
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:  # a process whose share is empty has no graph
                    loss.backward()
                all_reduce_grads(params)  # with torchrun: the sum over processes
                opt.step()
                steps += 1
            mean = total / n
            log["epochs"].append({"epoch": epoch, "mean_loss": mean, "steps": steps, "skipped": skipped,
                                  "seconds": time.time() - te, **(reg.epoch_parts() if reg else {})})
            eta = (time.time() - t0) / (epoch - first + 1) * (hp.epochs - epoch)
            say(f"epoch {epoch}/{hp.epochs}: loss {mean:.4f}, steps {steps} (skipped {skipped}), "
                f"{time.time() - te:.1f}s, eta {fmt_seconds(eta)}")
            if checkpoint:  # crash-safe: a killed run loses at most the epoch it was in
                checkpoint.save({"epoch": epoch, "opt": opt.state_dict(), "shuffle": shuffle.get_state()}, params, log)
            if mean < STOP_LOSS:  # early stop: the whole edit set is learnt
                break
        trained = {name: p.detach().clone() for name, p in params.items()}
    mean = log["epochs"][-1]["mean_loss"]
    log.update(epochs_run=len(log["epochs"]), final_loss=mean, stopped_early=mean < STOP_LOSS)
    return trained, finish_log(log, edits, encoded, hp, reg, t0)


def depth_first(model, tok, edits: list[data.Edit], hp: Hparams, cache_device=None, say=say, checkpoint=None):
    """The baseline the paper argues against (EasyEdit's FT-M, edited sequentially): edits one at
    a time, in file order, in one pass; each gets a fresh Adam and at most `hp.max_steps` steps,
    and is left once its loss is below 1e-2. Targets, cache, tensor and loss as in `locft_bf`.
    With `--batch-size 1 --epochs E`, LocFT-BF gives every edit the same E steps at most."""
    t0 = time.time()
    encoded, cache, reg = prepare(model, tok, edits, hp, cache_device, say)
    per = hp.augment_prefixes + 1  # an edit's sequences: itself, then its prefixed copies
    log = {"batch_size": per, "prefix_seconds": time.time() - t0, "edits": []}
    every = max(1, len(edits) // 10)
    with trainable_copies(model, select_params(model, hp.layer, hp.module)) as params:
        first = checkpoint.restore(params, None, None, log, say) if checkpoint and checkpoint.path.exists() else 0
        for i in range(first, len(edits)):
            idx = list(range(i * per, (i + 1) * per))
            opt = make_optimizer(params, hp)  # fresh: no moments or step count from the last edit
            steps = 0
            for steps in range(hp.max_steps + 1):
                loss = batch_loss(model, cache, idx, hp, reg)
                check_finite(loss.item(), f"edit {i}, step {steps + 1}", hp)
                if loss.item() < STOP_LOSS or steps == hp.max_steps:  # learnt, or out of steps
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            log["edits"].append({"edit": i, "steps": steps, "final_loss": loss.item()})
            if (i + 1) % every == 0 or i + 1 == len(edits):
                el = time.time() - t0
                say(f"edit {i + 1}/{len(edits)}: loss {loss.item():.4f}, steps {steps}, {el:.1f}s, "
                    f"eta {fmt_seconds(el / (i + 1 - first) * (len(edits) - i - 1))}")
                if checkpoint:
                    checkpoint.save({"epoch": i + 1}, params, log)  # the number of edits done
        trained = {name: p.detach().clone() for name, p in params.items()}
    final = sum(e["final_loss"] for e in log["edits"]) / len(edits)
    log.update(epochs_run=1, final_loss=final, stopped_early=False)
    return trained, finish_log(log, edits, encoded, hp, reg, t0)


def batch_loss(model, cache: data.PrefixCache, idx: list[int], hp: Hparams, reg=None) -> torch.Tensor:
    """The objective on training sequences `idx`: layers L.. from the cache, the LM head only at
    the positions that predict a target token, cross-entropy on those tokens. Under torchrun each
    process computes its share of `idx`, weighted so that the shares add up to the whole."""
    world, rank = world_and_rank()
    share = idx[rank::world]
    if not share:
        return torch.zeros((), device=cache.model_device)
    h, batch = cache.batch(share, packed=reg is None)  # FT++ reads right-padded rows
    frozen = model.model.embed_tokens.weight.dtype  # bf16 on a GPU: autocast the trained fp32 copy too
    with torch.autocast(h.device.type, dtype=frozen, enabled=frozen != torch.float32):
        if reg is not None:
            return reg.loss(model, idx, h, batch, hp.loss_avg)  # FT++: smoothing, general and local KL
        logits = model.forward_from(h, hp.layer, positions=batch.positions, segments=batch.segments,
                                    logits_at=batch.predict_mask)  # (N, V), N target tokens
    ce = F.cross_entropy(logits.float(), batch.labels.to(logits.device), reduction="none")
    if hp.loss_avg == "token":  # LlamaFactory's: the mean over every target token of the mini-batch
        return ce.sum() / sum(len(cache.encoded[i][0]) - cache.encoded[i][1] for i in idx)
    return batch.per_sample_mean(ce)[0].sum() / len(idx)  # the authors': per edit, then over the batch


# ----------------------------------------------------------------------------------------------
# Many processes (torchrun) and crash safety


def world_and_rank() -> tuple[int, int]:
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """The sum over processes under torchrun; `t` itself otherwise."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_grads(params: dict[str, nn.Parameter]):
    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_reduce(p.grad)


@dataclass
class Checkpoint:
    """Where a run keeps its state after every epoch, and what a run resuming it must share with
    it (the hyper-parameters, the edits, the base tensors)."""
    path: Path
    fingerprint: dict

    def save(self, state: dict, params: dict[str, nn.Parameter], log: dict):
        """Write atomically: a temporary file renamed over the last checkpoint."""
        if world_and_rank()[1] != 0:
            return
        state = {**state, "params": {n: p.detach().cpu() for n, p in params.items()}, "log": log,
                 "fingerprint": self.fingerprint}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)  # Ctrl-C mid-write: the last whole checkpoint stays

    def restore(self, params, opt, shuffle, log: dict, say) -> int:
        """Put the saved state back; returns the epochs (or edits) it had done."""
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["params"][n])
        if opt is not None:
            opt.load_state_dict(state["opt"])
            shuffle.set_state(state["shuffle"])
        log.update(state["log"])
        say(f"resuming from {self.path} after {'epoch' if opt is not None else 'edit'} {state['epoch']}")
        stopped = log.get("epochs") and log["epochs"][-1]["mean_loss"] < STOP_LOSS
        return 10**9 if stopped else state["epoch"]  # a run that had stopped early trains no more


def check_finite(loss: float, where: str, hp: Hparams):
    if not math.isfinite(loss):
        raise EditError(f"loss is {loss} at {where}; training diverged, try a lower --lr (now {hp.lr:g})")


def fmt_seconds(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


def finish_log(log: dict, edits, encoded, hp: Hparams, reg, t0: float) -> dict:
    log.update(n_edits=len(edits), n_sequences=len(encoded), seconds=time.time() - t0,
               hparams={**asdict(hp), "batch_size": log["batch_size"]})
    if reg is not None:
        log["ftpp"] = reg.stats
    return log


def edit(model, tok, edits, hp: Hparams, cache_device=None, say=say, checkpoint=None):
    """LocFT-BF or the depth-first baseline, as `hp.pipeline` says."""
    train = depth_first if hp.pipeline == "df" else locft_bf
    return train(model, tok, edits, hp, cache_device, say, checkpoint)


# ----------------------------------------------------------------------------------------------
# The command line: every input is checked here, before the model's weights are read


def parse_args(argv=None) -> argparse.Namespace:
    H = Hparams
    p = evaluate.OneLineParser(description="LocFT-BF model editing: fine-tune one tensor on a set of edits.")
    p.add_argument("--ckpt", required=True, help="Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--edits", required=True, help="edit file (ZsRE, CounterFact, WikiBigEdit, edits.jsonl)")
    p.add_argument("--layer", default=H.layer,
                   help="layer to edit: an index (22), a negative index (-8), or a relative depth in (0,1), "
                        "the paper's proportional position, mapped to layer round(p*N)-1 (0.25 of 28 layers "
                        f"-> 6, of 80 -> 19). Default {H.layer} (later layers)")
    p.add_argument("--module", choices=list(MODULES), default=None,
                   help=f"tensors to train in that layer (default {H.module}; on a Qwen2-MoE sparse layer "
                        f"{MOE_MODULE})")
    p.add_argument("--lr", type=float, default=H.lr, help=f"learning rate (default {H.lr:g})")
    p.add_argument("--batch-size", type=int, default=H.batch_size,
                   help="mini-batch size (default min(100, ceil(n/10)): at least ~10 steps per epoch)")
    p.add_argument("--epochs", type=int, default=H.epochs)
    p.add_argument("--optimizer", choices=["adam", "adamw"], default=H.optimizer)
    p.add_argument("--weight-decay", type=float, default=H.weight_decay)
    p.add_argument("--seed", type=int, default=None,
                   help=f"seeds the per-epoch shuffle (default {H.seed}); with --n it also picks a reproducible "
                        "random subset of n edits, the same one evaluate.py --n N --seed S picks")
    p.add_argument("--pipeline", choices=["bf", "df"], default=H.pipeline,
                   help="bf: LocFT-BF; df: the depth-first baseline (one edit at a time, fresh Adam per edit)")
    p.add_argument("--loss-avg", choices=["sample", "token"], default=H.loss_avg)
    p.add_argument("--max-steps", type=int, default=H.max_steps, help="df: optimiser steps per edit at most")
    p.add_argument("--n", type=int, default=None, help="use n edits: the first n, or a random n with --seed")
    p.add_argument("--augment-prefixes", type=int, default=H.augment_prefixes, metavar="K",
                   help=f"also train each prompt behind K short unrelated prefixes (0..{len(data.PREFIXES)})")
    p.add_argument("--out", default=None, help="output directory (default out/<ckpt>-<edits>-<time>/)")
    p.add_argument("--export", default=None, help="also write a whole edited checkpoint directory here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out / --export")
    g0 = p.add_mutually_exclusive_group()
    g0.add_argument("--base-delta", default=None, metavar="DELTA",
                    help="lifelong editing: start from an earlier delta; the new one holds it too and names it")
    g0.add_argument("--cumulative", nargs="+", default=None, metavar="RUN",
                    help="lifelong editing: re-fit the edits.jsonl of these earlier runs with the new edits, from the base")
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose state --out's sibling OUT.partial holds (same flags and edits)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="spread the model's layers over several devices of one machine: cuda:0,cuda:1,...")
    p.add_argument("--dtype", default=None, help="frozen model dtype: float32 (default on CPU), bfloat16, "
                                                 "auto (the checkpoint's; default on CUDA)")
    p.add_argument("--cache-device", default=None, help="prefix cache device (default: the model's; cpu for 100K edits)")
    p.add_argument("--eval", action="store_true", help="evaluate before/after right after training (eval.json)")
    p.add_argument("--capability", nargs="?", const="paper", metavar="TASKS",
                   help="with --eval: also benchmark accuracy before/after, as evaluate.py --capability ('paper' "
                        "by default, 'small', 'all' or task names)")
    p.add_argument("--limit", type=int, default=None, help="with --capability: the first N documents of each task")
    g = p.add_argument_group("FT++ regularisers (all off by default; see ftpp.py)")
    g.add_argument("--smooth-alpha", type=float, default=H.smooth_alpha, metavar="A",
                   help="label smoothing toward the old answer: (1-A) CE(new) + A CE(old), for edits that know it")
    g.add_argument("--general-kl", type=float, default=H.general_kl, metavar="L1",
                   help="weight of KL(edited || base) per token on general text")
    g.add_argument("--general-text", default=H.general_text, metavar="FILE",
                   help="sentences for --general-kl, one per line (default data/general_text.txt)")
    g.add_argument("--local-kl", type=float, default=H.local_kl, metavar="L2",
                   help="weight of KL(edited || base) on the prediction of the relation's last token")
    return p.parse_args(argv)


def resolve_layer(spec, n_layers: int) -> int:
    """--layer as an index, a negative index or a relative depth p in (0,1) -> layer round(p*N)-1."""
    valid = f"this model has layers 0..{n_layers - 1} (or -{n_layers}..-1, or a fraction in (0,1))"
    text = str(spec).strip()
    if text.lstrip("+-").isdigit():
        i = int(text)
        if not -n_layers <= i < n_layers:
            raise EditError(f"--layer {spec} is out of range: {valid}")
        return i % n_layers
    try:
        p = float(text)
    except ValueError:
        raise EditError(f"--layer {spec!r} is not a number: {valid}") from None
    if not 0.0 < p < 1.0:
        raise EditError(f"--layer {spec} is out of range: {valid}")
    # Qwen2.5-7B layer 6 is the 7th of 28 (p = 0.25); the same depth of 80 layers is the 20th, layer 19
    return min(n_layers - 1, max(0, math.floor(p * n_layers + 0.5) - 1))


def resolve_module(module: str | None, margs: model_lib.ModelArgs, layer: int) -> str:
    """--module checked against the tensors layer `layer` has; unset, Hparams.module, or on a
    sparse MoE layer (which has no mlp.down_proj) the shared expert's down_proj."""
    with torch.device("meta"):  # the layer's tensor names, without allocating or reading a weight
        names = [n for n, _ in model_lib.DecoderLayer(margs, layer).named_parameters()]
    if module is None:
        module = MOE_MODULE if layer in margs.moe_layers else Hparams.module
    has = [m for m in MODULES if any(in_module(n, m) for n in names)]
    if module not in has:
        raise EditError(f"--module {module}: layer {layer} has no such tensors; its modules are {', '.join(has)}")
    return module


def check_args(args) -> None:
    """Every flag that can be wrong on its own, as one line naming it."""
    positive = {"--batch-size": args.batch_size, "--epochs": args.epochs, "--max-steps": args.max_steps, "--n": args.n}
    for flag, v in positive.items():
        if v is not None and v <= 0:
            raise EditError(f"{flag} must be positive, got {v}")
    if not 0 < args.lr <= 1:  # NaN fails too; above 1, Adam's steps overflow and nothing is learnt
        raise EditError(f"--lr must be in (0, 1], got {args.lr}")
    if not 0 <= args.augment_prefixes <= len(data.PREFIXES):
        raise EditError(f"--augment-prefixes must be between 0 and {len(data.PREFIXES)}, got {args.augment_prefixes}")
    if args.cache_device not in (None, "disk"):
        try:
            torch.device(args.cache_device)
        except RuntimeError:
            raise EditError(f"--cache-device {args.cache_device!r} is not a device (cpu, cuda, cuda:1, disk)") from None
    if not 0 <= args.smooth_alpha <= 1:
        raise EditError(f"--smooth-alpha must be in [0, 1], got {args.smooth_alpha}")
    for flag, v in (("--general-kl", args.general_kl), ("--local-kl", args.local_kl), ("--weight-decay", args.weight_decay)):
        if not 0 <= v <= 1e6:  # NaN and overflowing weights fail too
            raise EditError(f"{flag} must be between 0 and 1e6, got {v}")
    if (args.capability or args.limit is not None) and not args.eval:
        raise EditError("--capability and --limit act with --eval only; add --eval")
    if args.limit is not None and not args.capability:
        raise EditError("--limit needs --capability (it limits the benchmark documents)")
    if args.capability:
        try:
            capability.check(args.capability, args.limit)
        except capability.CapabilityError as e:
            raise EditError(str(e)) from None
    if args.general_kl:
        path = Path(args.general_text)
        if not path.is_file():
            raise EditError(f"--general-text {path}: file does not exist")
        if not ftpp.read_sentences(path):
            raise EditError(f"--general-text {path}: no sentences (empty lines and '#' lines are skipped)")


def check_paths(args, ckpt: Path, out: Path):
    """Refuse outputs that would overwrite, sit in, or contain the base checkpoint or each other,
    and an unfinished run that is neither resumed nor overwritten."""
    c = ckpt.resolve()
    export = Path(args.export) if args.export else None
    for flag, p in (("--out", out), ("--export", export)):
        if p is None:
            continue
        r = p.resolve()
        if r == c or c in r.parents or r in c.parents:
            raise EditError(f"{flag} {p} overlaps the base checkpoint {ckpt}; the base is never written")
        if p.exists() and not args.overwrite:
            raise EditError(f"{flag} {p} exists; pass --overwrite to replace it")
    if export is not None:
        o, x = out.resolve(), export.resolve()
        if o == x or o in x.parents or x in o.parents:
            raise EditError(f"--out {out} and --export {export} overlap; give them separate directories")
    partial = partial_dir(out)
    if args.resume and not (partial / "checkpoint.pt").is_file():
        raise EditError(f"--resume: nothing to resume, {partial / 'checkpoint.pt'} does not exist" +
                        ("" if args.out else " (give the --out of the run to continue)"))
    if partial.exists() and not args.resume and not args.overwrite:
        raise EditError(f"{partial} holds an unfinished run: --resume continues it, --overwrite starts over")


def partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")  # the state of a run in progress, for --resume


def check_resume(path: Path, fingerprint: dict):
    """Refuse to continue a run made with other flags, other edits or another base."""
    saved = torch.load(path, map_location="cpu", weights_only=True)["fingerprint"]
    for key in fingerprint:
        a, b = saved.get(key), fingerprint[key]
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                k = next(k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))
                raise EditError(f"--resume: the run in {path.parent} used {key} {k}={a.get(k)!r}, this one {b.get(k)!r}")
            raise EditError(f"--resume: the run in {path.parent} was made with other {key}")


def atomic_dir(final: Path, write, overwrite: bool):
    """Build a directory next to `final`, then move it into place; nothing half-written remains."""
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


def memory_plan(margs, lengths: list[int], hp: Hparams, dtype: torch.dtype, devices: list[str], cache_device) -> dict:
    """What a run will hold, in bytes, computed from the config and the token counts alone: the
    frozen model (per device, placed as `Transformer.place` places it), the prefix cache (every
    token once), the trained tensors with their gradient and Adam's two moments (fp32), and a
    rough bound on one step's activations, which live with the trained layer."""
    shapes = model_lib.parameter_shapes(margs)
    size = torch.finfo(dtype).bits // 8
    n = margs.n_layers
    trained = sum(math.prod(s) for s in select_params_by_name(shapes, hp.layer, hp.module).values())
    bs = hp.batch_size or auto_batch_size(len(lengths))
    step_tokens = sum(sorted(lengths)[-bs:])  # the longest mini-batch there can be
    per_token = (n - hp.layer) * (8 * margs.dim + 4 * margs.intermediate_size) * 4  # saved for backward
    plan = {"model": sum(math.prod(s) for s in shapes.values()) * size, "prefix_cache": sum(lengths) * margs.dim * size,
            "trained_and_adam": trained * 4 * 4, "activations": step_tokens * per_token + step_tokens * margs.vocab_size * 8}
    need = {}
    for name, s in shapes.items():
        where = devices[model_lib.placement(name, margs, len(devices))]
        need[where] = need.get(where, 0) + math.prod(s) * size
    edited = devices[model_lib.block_of(hp.layer, n, len(devices))]
    need[edited] += plan["trained_and_adam"] + plan["activations"]
    cache = cache_device or edited
    need[cache] = need.get(cache, 0) + plan["prefix_cache"]  # "cpu" or "disk" when asked for
    plan["need"] = need
    return plan


def free_bytes(device: str) -> int | None:
    """Memory free on `device` (None when unknown): the GPU's, the host's available memory, or
    for "disk" the free space of the temporary directory."""
    if device == "disk":
        return shutil.disk_usage(tempfile.gettempdir()).free
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        return int(next(l for l in open("/proc/meminfo") if l.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def check_devices(spec: str) -> list[str]:
    """--devices: every entry a device this machine has."""
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    for d in devices:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise EditError(f"--devices: {d!r} is not a device (cuda:0, cuda:1, ... or cpu)") from None
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise EditError(f"--devices: {d} does not exist here ({torch.cuda.device_count()} CUDA devices)")
    return devices


def check_memory(plan: dict, say=say):
    gb = lambda b: f"{b / 2**30:.2f} GB"  # noqa: E731
    say(f"memory: model {gb(plan['model'])}, prefix cache {gb(plan['prefix_cache'])}, trained tensors + Adam "
          f"{gb(plan['trained_and_adam'])}, activations up to ~{gb(plan['activations'])}")
    for where, need in plan["need"].items():
        free = free_bytes(where)
        if free is not None and need > free:
            raise EditError(f"this run needs about {gb(need)} on {where} but {gb(free)} is free; try fewer edits "
                            f"(--n), a smaller --batch-size, or --cache-device cpu")


class Interrupted(Exception):
    """Ctrl-C during a run; the message says what is left."""


@dataclass
class Run:
    """What `preflight` found out about a run before any weight is read."""
    ckpt: Path
    out: Path
    edits: list
    hp: Hparams
    devices: list[str]
    world: int  # torchrun's processes (1 without it)
    rank: int
    fingerprint: dict  # what a --resume must share with the run it continues
    parent: dict | None  # --base-delta's metadata


def preflight(args) -> Run:
    """Every check that needs no weights: the flags, config.json, the tokenizer, the edit file
    (each record against the context), the output paths, the safetensors headers, --resume and
    --base-delta, and the memory plan. Raises EditError (or a loader's error) in one line."""
    check_args(args)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1 and device == "cuda":  # torchrun: one process per GPU (or several on a CPU)
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    devices = check_devices(args.devices) if args.devices else [device]
    ckpt = Path(args.ckpt)
    margs = model_lib.read_args(ckpt)
    layer = resolve_layer(args.layer, margs.n_layers)
    module = resolve_module(args.module, margs, layer)
    tok = model_lib.Tokenizer(ckpt, margs)
    edits = data.load_edits(args.edits, n=args.n, seed=args.seed)
    for run_dir in args.cumulative or []:  # the earlier runs' edits first, as they were taught
        if not (Path(run_dir) / "edits.jsonl").is_file():
            raise EditError(f"--cumulative {run_dir}: no edits.jsonl there (not an edit.py output directory)")
        edits = data.load_edits(Path(run_dir) / "edits.jsonl") + edits
    prefix = max(len(tok.encode(p, add_special_tokens=False)) for p in data.PREFIXES) + 1 if args.augment_prefixes else 0
    data.check_context(tok, edits, args.edits, margs.max_position_embeddings, 32 if args.eval else 0, prefix)
    out = Path(args.out) if args.out else \
        Path("out") / f"{ckpt.resolve().name}-{Path(args.edits).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_paths(args, ckpt, out)
    hp = Hparams(**{f.name: getattr(args, f.name) for f in fields(Hparams) if f.name not in ("seed", "layer", "module")},
                 seed=Hparams.seed if args.seed is None else args.seed, layer=layer, module=module)
    batch = hp.batch_size or auto_batch_size(len(edits) * (hp.augment_prefixes + 1))
    if len(devices) > 1 and (world > 1 or ftpp.active(hp)):
        raise EditError("--devices runs LocFT-BF in one process without FT++ (no torchrun, no FT++ options)")
    if world > 1 and (hp.pipeline == "df" or ftpp.active(hp)):
        raise EditError("torchrun runs LocFT-BF without FT++ only (--pipeline df and the FT++ options run in one process)")
    if world > batch:
        raise EditError(f"torchrun's {world} processes exceed the batch of {batch}: every process needs a share of each mini-batch")
    model_lib.check_weights(ckpt, margs)
    shapes = model_lib.parameter_shapes(margs)
    parent = delta.check(args.base_delta, shapes) if args.base_delta else None
    originals = delta.stored_tensors(ckpt, select_params_by_name(shapes, layer, hp.module))
    fingerprint = {"hparams": asdict(hp), "edits": hashlib.sha256(json.dumps([e.to_json() for e in edits]).encode()).hexdigest(),
                   "base": {n: delta.sha256(t) for n, t in originals.items()},
                   "base_delta": hashlib.sha256(Path(args.base_delta).read_bytes()).hexdigest() if parent is not None else None}
    if args.resume:
        check_resume(partial_dir(out) / "checkpoint.pt", fingerprint)
    lengths = [len(data.encode_edit(tok, e.prompt, e.target)[0]) + prefix for e in edits for _ in range(hp.augment_prefixes + 1)]
    dtype = model_lib.resolve_dtype(args.dtype, margs, devices[0])
    check_memory(memory_plan(margs, lengths, hp, dtype, devices, args.cache_device), say if rank == 0 else (lambda s: None))
    return Run(ckpt, out, edits, hp, devices, world, rank, fingerprint, parent)


def run(args) -> Path | None:
    r = preflight(args)
    talk = say if r.rank == 0 else (lambda line: None)  # under torchrun, process 0 alone prints and writes
    if r.world > 1:
        dist.init_process_group("nccl" if r.devices[0].startswith("cuda") else "gloo")
        dist.barrier()  # every process has checked the paths before process 0 creates one
    partial = partial_dir(r.out)
    if r.rank == 0:
        if partial.exists() and not args.resume:  # --overwrite: start over
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
    model, tok = model_lib.load(r.ckpt, device=r.devices, dtype=args.dtype)
    earlier = {}
    if r.parent is not None:  # lifelong: this run starts where the earlier delta left the model
        delta.apply(model, args.base_delta)
        earlier = delta.tensors(args.base_delta)
    names = list(select_params(model, r.hp.layer, r.hp.module))
    talk(f"editing {len(r.edits)} edits into {', '.join(names)} ({r.hp.pipeline}, lr {r.hp.lr:g}"
         + (f", {r.world} processes" if r.world > 1 else "") + ")")
    checkpoint = Checkpoint(partial / "checkpoint.pt", r.fingerprint)
    try:
        trained, log = edit(model, tok, r.edits, r.hp, args.cache_device, talk, checkpoint)
    except KeyboardInterrupt:
        if checkpoint.path.exists():
            raise Interrupted(f"interrupted; --resume continues from the state in {partial}") from None
        shutil.rmtree(partial, ignore_errors=True)
        raise Interrupted("interrupted; no half-written output is left") from None
    except EditError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if r.rank != 0:
        return None

    meta = {"format": "pt", "layer": str(r.hp.layer), "module": r.hp.module, "n_edits": str(len(r.edits)),
            "seed": str(r.hp.seed), "hparams": json.dumps(log["hparams"]), "base_ckpt": str(r.ckpt.resolve()),
            "torch_version": torch.__version__, "locft_version": __version__}
    if r.parent is not None:
        meta.update(parent=str(Path(args.base_delta).resolve()), parent_sha256=r.fingerprint["base_delta"],
                    parent_n_edits=r.parent.get("n_edits", "?"))
    if args.cumulative:
        meta["cumulative_of"] = json.dumps([str(Path(d).resolve()) for d in args.cumulative])
    changed = {**earlier, **trained}  # with --base-delta, the parent's tensors too: it applies to the original base

    def write_out(d: Path):
        delta.save(d / "delta.safetensors", r.ckpt, changed, meta)
        with open(d / "edits.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in r.edits)
        (d / "train_log.json").write_text(json.dumps(log, indent=1))

    atomic_dir(r.out, write_out, args.overwrite)
    shutil.rmtree(partial)
    if args.export:
        atomic_dir(Path(args.export), lambda d: delta.export(r.ckpt, d, changed), args.overwrite)
    say(f"done: {len(r.edits)} edits, {log['epochs_run']} epochs, final loss {log['final_loss']:.4f}, "
        f"{log['seconds']:.1f}s -> {r.out}" + (f" (export: {args.export})" if args.export else ""))
    if args.eval:  # the model holds the weights before this run: evaluate them, then the trained tensors
        tasks = capability.resolve(args.capability) if args.capability else ()
        report = evaluate.measure(model, tok, r.edits, None, trained, tasks, args.limit, say=say)
        evaluate.print_report(report)
        evaluate.write_report(report, r.out / "eval.json")
    return r.out


def main(argv=None) -> int:
    args = parse_args(argv)
    first = os.environ.get("RANK", "0") == "0"  # under torchrun, process 0 alone speaks
    try:
        run(args)
    except (EditError, data.EditFileError, model_lib.CheckpointError, delta.DeltaError) as e:
        if first:
            print(f"edit.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:  # outputs are built under a temporary name: none is half-written
        if first:
            print(f"edit.py: {e or 'interrupted; no half-written output is left'}", file=sys.stderr, flush=True)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
