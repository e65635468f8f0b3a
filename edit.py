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
   mean loss is below 1e-2 (or when more epochs stop helping: budget.py);
5. the end: which edits are learnt, read off one teacher-forced pass (learnt.py).
`depth_first` is the pipeline the paper argues against (one edit at a time, each to
convergence), written the same way so the two can be compared. FT++'s regularisers (ftpp.py)
and the retain term (retain.py) each enter the loss in one line of `batch_loss`. Around the
method, and kept out of it: every check before a weight is read (preflight.py), crash-safe
state and atomic outputs (checkpoint.py), torchrun (distributed.py).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import budget
import capability
import checkpoint as ckpt_lib
import data
import delta
import devices
import distributed
import evaluate
import ftpp
import learnt as learnt_lib
import model as model_lib
import retain
from distributed import all_reduce, all_reduce_grads, world_and_rank
import preflight
from preflight import EditError, say

__version__ = "0.2.0"

STOP_LOSS = 1e-2  # skip a step below this batch loss; stop when an epoch's mean is below it


@dataclass
class Hparams:
    """Every training choice and its default, defined here only (the CLI's defaults come from it)."""
    layer: int | float = 0.75  # an index, or a relative depth in (0, 1): "later layers" by default
    module: str = "down_proj"
    lr: float = 2e-3
    batch_size: int | None = None  # None: auto_batch_size(number of training sequences)
    epochs: int = 100  # at most; budget.py stops a run earlier once the set is learnt or more epochs stop helping
    patience: int = 10  # plateau: this many epochs without a new edit learnt or a min_gain cut of the loss
    min_gain: float = 0.1
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
    # retain (retain.py): unrelated prompts keep the base model's answers; off by default
    retain: bool = False
    retain_weight: float = 1.0
    retain_pool: int | None = None  # prompts in the pool; None: one per edit
    retain_tokens: int = 4  # the first k tokens of each base continuation
    retain_related: bool = False  # from records, first those sharing an edit's relation
    retain_from: str | None = None  # an edit file whose records (those not edited) give the pool
    retain_file: str | None = None  # or the user's prompts, one per line

    def batch_for(self, n: int) -> int:
        """The mini-batch size for `n` training sequences."""
        return self.batch_size or auto_batch_size(n)


def auto_batch_size(n: int) -> int:
    """Edits need optimiser steps, not only epochs: >= ~10 steps per epoch, and at most 32 edits
    per step (docs/budget.md: after 10 epochs of 1,000 edits, 361 are learnt in batches of 32, 79 in batches of 100)."""
    return min(32, max(1, math.ceil(n / 10)))


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
    """Steps 1 and 2: the training sequences, their prefix cache at layer L, FT++'s cached base
    distributions and the retain pool's (None when off), all computed while the model is the base."""
    k = hp.augment_prefixes  # each edit's k prefixed copies follow it
    pairs = data.augment_prefixes(edits, k, hp.seed) if k else [(e.prompt, e.target) for e in edits]
    encoded = [data.encode_edit(tok, p, t) for p, t in pairs]  # prompt + " " + answer + EOS
    cache = data.PrefixCache(model, encoded, tok.pad_id, hp.layer, cache_device)
    reg = None
    if ftpp.active(hp):
        per = [e for e in edits for _ in range(k + 1)]
        reg = ftpp.FTPP(model, tok, pairs, [e.subject for e in per], [e.old_answer for e in per], encoded,
                        cache, hp, say)
    keep = retain.Retain(model, tok, retain.pool(edits, hp, say), len(encoded), hp, cache_device) if hp.retain else None
    return encoded, cache, reg, keep


def locft_bf(model, tok, edits: list[data.Edit], hp: Hparams, cache_device=None, say=say, checkpoint=None):
    """Fine-tune `hp.module` of layer `hp.layer` on `edits`, breadth-first. Returns
    ({name: trained fp32 tensor}, log); the model is left exactly as it was. With `checkpoint`
    (a path), the state after every epoch is saved there, and a run finding one continues it."""
    t0 = time.time()
    encoded, cache, reg, keep = prepare(model, tok, edits, hp, cache_device, say)  # steps 1, 2
    n = len(encoded)
    bs = hp.batch_for(n)
    log = {"batch_size": bs, "prefix_seconds": time.time() - t0, "epochs": []}
    L, N = hp.layer, model.args.n_layers
    guess = f"; about {fmt_seconds(cache.seconds * 3 * (N - L) / L)} per epoch" if L and reg is None else ""
    say(f"{n} training sequences ({sum(len(ids) for ids, _ in encoded)} tokens), batch {bs} "
        f"({math.ceil(n / bs)} step{'s' * (n > bs)} per epoch), up to {hp.epochs} epochs{guess}")
    shuffle = torch.Generator().manual_seed(hp.seed)
    with trainable_copies(model, model_lib.select_params(model, hp.layer, hp.module)) as params:  # step 3
        opt = make_optimizer(params, hp)
        first = checkpoint.restore(params, opt, shuffle, log, say) + 1 if checkpoint and checkpoint.path.exists() else 1
        stepped = None  # where the last optimiser step was taken
        for epoch in range(first, hp.epochs + 1):  # step 4
            te, total, steps, skipped, hits = time.time(), 0.0, 0, 0, 0
            order = torch.randperm(n, generator=shuffle).tolist()  # the whole set, reshuffled
            for s in range(0, n, bs):
                idx, where = order[s:s + bs], f"epoch {epoch}, step {s // bs + 1}"  # a mini-batch
                learnt = []  # batch_loss puts the share's sequences already learnt here (learnt.py)
                loss = batch_loss(model, cache, idx, hp, reg, learnt, keep)  # with torchrun: this process's share
                both = all_reduce(torch.stack([loss.detach().float(), learnt[0].float().to(loss.device)]))
                value, learnt_b = both.tolist()  # the mini-batch's loss and learnt count, the same in every process
                hits += int(learnt_b)
                check_finite(value, where, params, stepped, model, hp)
                total += value * len(idx)  # the epoch's mean weighs each batch by its size
                if value < STOP_LOSS:  # already learnt: no step
                    skipped += 1
                    continue
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:  # a process whose share is empty has no graph
                    loss.backward()
                all_reduce_grads(params)  # with torchrun: the sum over processes
                opt.step()
                steps, stepped = steps + 1, where
            check_finite(0.0, f"the end of epoch {epoch}", params, stepped, model, hp, tensors=True)  # its last step
            mean = total / n
            log["epochs"].append({"epoch": epoch, "mean_loss": mean, "learnt": hits, "steps": steps,
                                  "skipped": skipped, "seconds": time.time() - te, **(reg.epoch_parts() if reg else {}),
                                  **(keep.epoch_parts() if keep else {})})
            log["stop"] = budget.stop(log["epochs"], hp, STOP_LOSS)  # None: train on
            eta = (time.time() - t0) / (epoch - first + 1) * (hp.epochs - epoch)
            say(f"epoch {epoch}/{hp.epochs}: loss {mean:.4f}, learnt {hits}/{n}, steps {steps} (skipped "
                f"{skipped}), {time.time() - te:.1f}s, at most {fmt_seconds(eta)} left" + (f"; {log['stop']}" if log["stop"] else ""))
            if checkpoint:  # crash-safe: a killed run loses at most the epoch it was in
                checkpoint.save({"epoch": epoch, "opt": opt.state_dict(), "shuffle": shuffle.get_state()}, params, log)
            if log["stop"]:
                break
        trained = {name: p.detach().clone() for name, p in params.items()}
        log["learnt"] = learnt_lib.report(model, tok, cache, edits, hp.augment_prefixes + 1, hp.layer, say)
    mean = log["epochs"][-1]["mean_loss"]
    log.update(epochs_run=len(log["epochs"]), final_loss=mean, stopped_early=mean < STOP_LOSS)
    budget.advise(log, hp, say)  # at the epoch cap with edits not learnt: what to change
    return trained, finish_log(log, edits, encoded, hp, reg, keep, t0)


def depth_first(model, tok, edits: list[data.Edit], hp: Hparams, cache_device=None, say=say, checkpoint=None):
    """The baseline the paper argues against (EasyEdit's FT-M, edited sequentially): edits one at
    a time, in file order, in one pass; each gets a fresh Adam and at most `hp.max_steps` steps,
    and is left once its loss is below 1e-2. Targets, cache, tensor and loss as in `locft_bf`.
    With `--batch-size 1 --epochs E`, LocFT-BF gives every edit the same E steps at most."""
    t0 = time.time()
    encoded, cache, reg, keep = prepare(model, tok, edits, hp, cache_device, say)
    per = hp.augment_prefixes + 1  # an edit's sequences: itself, then its prefixed copies
    log = {"batch_size": per, "prefix_seconds": time.time() - t0, "edits": []}
    every = max(1, len(edits) // 10)
    with trainable_copies(model, model_lib.select_params(model, hp.layer, hp.module)) as params:
        first = checkpoint.restore(params, None, None, log, say) if checkpoint and checkpoint.path.exists() else 0
        for i in range(first, len(edits)):
            idx = list(range(i * per, (i + 1) * per))
            opt = make_optimizer(params, hp)  # fresh: no moments or step count from the last edit
            steps, stepped = 0, None
            for steps in range(hp.max_steps + 1):
                loss = batch_loss(model, cache, idx, hp, reg, keep=keep)
                value = loss.item()
                check_finite(value, f"edit {i}, step {steps + 1}", params, stepped, model, hp)
                if value < STOP_LOSS or steps == hp.max_steps:  # learnt, or out of steps
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                stepped = f"edit {i}, step {steps + 1}"
            check_finite(0.0, f"the end of edit {i}", params, stepped, model, hp, tensors=True)
            log["edits"].append({"edit": i, "steps": steps, "final_loss": value})
            if (i + 1) % every == 0 or i + 1 == len(edits):
                el = time.time() - t0
                say(f"edit {i + 1}/{len(edits)}: loss {value:.4f}, steps {steps}, {el:.1f}s, "
                    f"eta {fmt_seconds(el / (i + 1 - first) * (len(edits) - i - 1))}")
                if checkpoint:
                    checkpoint.save({"epoch": i + 1}, params, log)  # the number of edits done
        trained = {name: p.detach().clone() for name, p in params.items()}
    final = sum(e["final_loss"] for e in log["edits"]) / len(edits)
    log.update(epochs_run=1, final_loss=final, stopped_early=False)
    return trained, finish_log(log, edits, encoded, hp, reg, keep, t0)


def batch_loss(model, cache: data.PrefixCache, idx: list[int], hp: Hparams, reg=None, learnt=None,
               keep=None) -> torch.Tensor:
    """The objective on training sequences `idx`: layers L.. from the cache, the LM head only at
    the positions that predict a target token, cross-entropy on those tokens. Under torchrun each
    process computes its share of `idx`, weighted so that the shares add up to the whole. Given a
    list `learnt`, the number of the share's sequences already learnt (learnt.py) is appended."""
    if keep is not None:  # retain.py: the pool prompts of this mini-batch keep the base model's answers
        return batch_loss(model, cache, idx, hp, reg, learnt) + keep.loss(model, idx)
    world, rank = world_and_rank()
    share = idx[rank::world]
    if not share:
        if learnt is not None:
            learnt.append(torch.zeros((), device=cache.model_device))
        return torch.zeros((), device=cache.model_device)
    h, batch = cache.batch(share, packed=reg is None)  # FT++ reads right-padded rows
    frozen = model.model.embed_tokens.weight.dtype  # bf16 on a GPU: autocast the trained fp32 copy too
    with torch.autocast(h.device.type, dtype=frozen, enabled=frozen != torch.float32):
        if reg is not None:
            return reg.loss(model, idx, h, batch, hp.loss_avg, learnt)  # FT++: smoothing, general and local KL
        logits = model.forward_from(h, hp.layer, positions=batch.positions, segments=batch.segments,
                                    logits_at=batch.predict_at)  # (N, V), N target tokens
    if learnt is not None:  # free: the argmax of logits this step computes anyway
        learnt.append(learnt_lib.per_sequence(logits.detach(), batch).sum())
    ce = F.cross_entropy(logits.float(), batch.labels.to(logits.device), reduction="none")
    if hp.loss_avg == "token":  # LlamaFactory's: the mean over every target token of the mini-batch
        return ce.sum() / sum(len(cache.encoded[i][0]) - cache.encoded[i][1] for i in idx)
    return batch.per_sample_mean(ce)[0].sum() / len(idx)  # the authors': per edit, then over the batch


def check_finite(loss: float, where: str, params, stepped: str | None, model, hp: Hparams, tensors=False):
    """Stop a run whose loss (or, with `tensors`, trained tensor) is not finite, saying which,
    where, and what fits. Adam writes a non-finite gradient into the tensor at once (and with
    lr <= 1 nothing else does), so a non-finite tensor names the gradient of the last step."""
    bad = [n for n, p in params.items() if not torch.isfinite(p).all()] if tensors or not math.isfinite(loss) else []
    overflow = f"an overflow in {str(model.model.embed_tokens.weight.dtype).removeprefix('torch.')}"
    if bad:
        raise EditError(f"the gradient of {bad[0]} was not finite at {stepped} (its loss was), so Adam made the "
                        f"tensor non-finite: not the learning rate but the backward pass ({overflow} or a GPU "
                        f"kernel's fault; try --dtype float32)")
    if not math.isfinite(loss) and stepped is None:
        raise EditError(f"the loss is {loss} at {where}, before any update: the frozen model's output is not finite "
                        f"(a NaN or inf in the checkpoint's weights, or {overflow}; try --dtype float32)")
    if not math.isfinite(loss):
        raise EditError(f"the loss is {loss} at {where}, the trained tensors finite: training diverged, "
                        f"try a lower --lr (now {hp.lr:g})")


def fmt_seconds(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


def finish_log(log: dict, edits, encoded, hp: Hparams, reg, keep, t0: float) -> dict:
    log.update(n_edits=len(edits), n_sequences=len(encoded), seconds=time.time() - t0,
               hparams={**asdict(hp), "batch_size": log["batch_size"]})
    if reg is not None:
        log["ftpp"] = reg.stats
    if keep is not None:
        log["retain"] = keep.stats
    return log


def edit(model, tok, edits, hp: Hparams, cache_device=None, say=say, checkpoint=None):
    """LocFT-BF or the depth-first baseline, as `hp.pipeline` says."""
    train = depth_first if hp.pipeline == "df" else locft_bf
    return train(model, tok, edits, hp, cache_device, say, checkpoint)


# ----------------------------------------------------------------------------------------------
# The command line: every input is checked (preflight.py) before the model's weights are read


def run(args) -> Path | None:
    """Check everything, load the model, train, write OUT/ (delta.safetensors, edits.jsonl,
    train_log.json) in one atomic step, and with --eval score the base and the edited weights."""
    hp = Hparams(**{f.name: getattr(args, f.name) for f in fields(Hparams) if f.name != "seed"},
                 seed=Hparams.seed if args.seed is None else args.seed)
    r = preflight.preflight(args, hp)
    talk = say if r.rank == 0 else (lambda line: None)  # under torchrun, process 0 alone prints and writes
    if distributed.launched():  # torchrun, with one process or more
        distributed.init(r.devices[0])
    checkpoint = ckpt_lib.start(r.out, r.fingerprint, args.resume, STOP_LOSS)
    model, tok = model_lib.load(r.ckpt, device=r.devices, dtype=args.dtype)
    earlier = {}
    if r.parent is not None:  # lifelong: this run starts where the earlier delta left the model
        delta.apply(model, args.base_delta)
        earlier = delta.tensors(args.base_delta)
    talk(f"editing {len(r.edits)} edits into {', '.join(model_lib.select_params(model, r.hp.layer, r.hp.module))} "
         f"({r.hp.pipeline}, lr {r.hp.lr:g}" + (f", {r.world} processes" if r.world > 1 else "") + ")")
    with ckpt_lib.keep_or_clean(checkpoint):
        trained, log = edit(model, tok, r.edits, r.hp, args.cache_device, talk, checkpoint)
    if r.rank != 0:
        return None
    meta = {"format": "pt", "layer": str(r.hp.layer), "module": r.hp.module, "n_edits": str(len(r.edits)),
            "seed": str(r.hp.seed), "hparams": json.dumps(log["hparams"]), "base_ckpt": str(r.ckpt.resolve()),
            "torch_version": torch.__version__, "locft_version": __version__}
    if r.parent is not None:  # lifelong: the new delta holds the parent's tensors too and names it
        meta.update(parent=str(Path(args.base_delta).resolve()), parent_sha256=r.fingerprint["base_delta"],
                    parent_n_edits=r.parent.get("n_edits", "?"))
    if args.cumulative:
        meta["cumulative_of"] = json.dumps([str(Path(d).resolve()) for d in args.cumulative])
    changed = {**earlier, **trained}

    def write_out(d: Path):
        delta.save(d / "delta.safetensors", r.ckpt, changed, meta)
        with open(d / "edits.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in r.edits)
        (d / "train_log.json").write_text(json.dumps(log, indent=1))

    ckpt_lib.atomic_dir(r.out, write_out, args.overwrite)
    shutil.rmtree(checkpoint.path.parent)
    if args.export:
        ckpt_lib.atomic_dir(Path(args.export), lambda d: delta.export(r.ckpt, d, changed), args.overwrite)
    say(f"done: {len(r.edits)} edits, {log['epochs_run']} epochs, final loss {log['final_loss']:.4f}, "
        f"{log['seconds']:.1f}s -> {r.out}" + (f" (export: {args.export})" if args.export else ""))
    if args.eval:  # the model holds the weights before this run: evaluate them, then the trained tensors
        if len(r.devices) == 1:  # in fp32 where it fits: scores that do not depend on the batch size
            devices.to_evaluation_dtype(model, args.dtype, r.devices[0])
        tasks = capability.resolve(args.capability) if args.capability else ()
        report = evaluate.measure(model, tok, r.edits, None, trained, tasks, args.limit, say=say)
        evaluate.print_report(report)
        evaluate.write_report(report, r.out / "eval.json")
    return r.out


def main(argv=None) -> int:
    args = preflight.parse_args(argv, Hparams())
    first = os.environ.get("RANK", "0") == "0"  # under torchrun, process 0 alone speaks
    try:
        run(args)
    except (EditError, data.EditFileError, model_lib.CheckpointError, delta.DeltaError) as e:
        if first:
            print(f"edit.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (ckpt_lib.Interrupted, KeyboardInterrupt) as e:  # outputs are built under a temporary name
        if first:
            print(f"edit.py: {e or 'interrupted; no half-written output is left'}", file=sys.stderr, flush=True)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0



if __name__ == "__main__":
    sys.exit(main())
