"""LocFT-BF: teach a decoder new facts by fine-tuning one tensor, breadth-first.

    python edit.py --ckpt weights/smollm2-135m --edits data/demo_edits.json      # -> out/<run>/

The method ("Fine-tuning Done Right in Model Editing"), in the order `locft_bf` runs it:
1. targets: prompt + " " + answer + EOS; the loss is cross-entropy on the answer and EOS only;
2. nothing below the edited layer L trains, so layers 0..L-1 run once over every sequence and
   each step starts from their output (exact, and the main reason this is fast);
3. localized tuning: an fp32 copy of one tensor, `model.layers.{L}.mlp.down_proj.weight` by
   default, is the only thing that trains, with Adam;
4. breadth-first: every epoch shuffles the whole edit set and walks it in mini-batches; a step
   is skipped when its batch loss is already below 1e-2, and training stops once an epoch's
   mean loss is below 1e-2.
`depth_first` is the pipeline the paper argues against (one edit at a time, each to
convergence), written the same way so the two can be compared. FT++'s regularisers (ftpp.py)
enter the loss in one line of `batch_loss`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
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
}
STOP_LOSS = 1e-2  # skip a step below this batch loss; stop when an epoch's mean is below it


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


def select_params(model, layer: int, module: str) -> dict[str, nn.Parameter]:
    """The checkpoint-named parameters that `module` names in `layer`."""
    prefix = f"model.layers.{layer}."
    return {n: p for n, p in model.named_parameters()
            if n.startswith(prefix) and any(n[len(prefix):].startswith(s) for s in MODULES[module])}


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


def prepare(model, tok, edits: list[data.Edit], hp: Hparams, cache_device=None, say=print):
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


def locft_bf(model, tok, edits: list[data.Edit], hp: Hparams, cache_device=None, say=print):
    """Fine-tune `hp.module` of layer `hp.layer` on `edits`, breadth-first. Returns
    ({name: trained fp32 tensor}, log); the model is left exactly as it was."""
    t0 = time.time()
    encoded, cache, reg = prepare(model, tok, edits, hp, cache_device, say)  # steps 1, 2
    n = len(encoded)
    bs = hp.batch_size or auto_batch_size(n)
    log = {"batch_size": bs, "prefix_seconds": time.time() - t0, "epochs": []}
    say(f"{n} training sequences, batch {bs} ({math.ceil(n / bs)} steps per epoch), up to {hp.epochs} epochs")
    shuffle = torch.Generator().manual_seed(hp.seed)
    with trainable_copies(model, select_params(model, hp.layer, hp.module)) as params:  # step 3
        opt = make_optimizer(params, hp)
        for epoch in range(1, hp.epochs + 1):  # step 4
            te, total, steps, skipped = time.time(), 0.0, 0, 0
            order = torch.randperm(n, generator=shuffle).tolist()  # the whole set, reshuffled
            for s in range(0, n, bs):
                idx = order[s:s + bs]  # a mini-batch
                loss = batch_loss(model, cache, idx, hp, reg)
                check_finite(loss, f"epoch {epoch}, step {s // bs + 1}", hp)
                total += loss.item() * len(idx)  # the epoch's mean weighs each batch by its size
                if loss.item() < STOP_LOSS:  # already learnt: no step
                    skipped += 1
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
            mean = total / n
            log["epochs"].append({"epoch": epoch, "mean_loss": mean, "steps": steps, "skipped": skipped,
                                  "seconds": time.time() - te, **(reg.epoch_parts() if reg else {})})
            eta = (time.time() - t0) / epoch * (hp.epochs - epoch)
            say(f"epoch {epoch}/{hp.epochs}: loss {mean:.4f}, steps {steps} (skipped {skipped}), "
                f"{time.time() - te:.1f}s, eta {fmt_seconds(eta)}")
            if mean < STOP_LOSS:  # early stop: the whole edit set is learnt
                break
        trained = {name: p.detach().clone() for name, p in params.items()}
    log.update(epochs_run=len(log["epochs"]), final_loss=mean, stopped_early=mean < STOP_LOSS)
    return trained, finish_log(log, edits, encoded, hp, reg, t0)


def depth_first(model, tok, edits: list[data.Edit], hp: Hparams, cache_device=None, say=print):
    """The baseline the paper argues against (EasyEdit's FT-M, edited sequentially): edits one at
    a time, in file order, in one pass; each gets a fresh Adam and at most `hp.max_steps` steps,
    and is left once its loss is below 1e-2. Targets, cache, tensor and loss as in `locft_bf`.
    With `--batch-size 1 --epochs E`, LocFT-BF gives every edit the same E steps at most."""
    t0 = time.time()
    encoded, cache, reg = prepare(model, tok, edits, hp, cache_device, say)
    per = hp.augment_prefixes + 1  # an edit's sequences: itself, then its prefixed copies
    log = {"batch_size": per, "prefix_seconds": time.time() - t0, "edits": []}
    with trainable_copies(model, select_params(model, hp.layer, hp.module)) as params:
        for i in range(len(edits)):
            idx = list(range(i * per, (i + 1) * per))
            opt = make_optimizer(params, hp)  # fresh: no moments or step count from the last edit
            steps = 0
            for steps in range(hp.max_steps + 1):
                loss = batch_loss(model, cache, idx, hp, reg)
                check_finite(loss, f"edit {i}, step {steps + 1}", hp)
                if loss.item() < STOP_LOSS or steps == hp.max_steps:  # learnt, or out of steps
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            log["edits"].append({"edit": i, "steps": steps, "final_loss": loss.item()})
            if (i + 1) % max(1, len(edits) // 10) == 0 or i + 1 == len(edits):
                el = time.time() - t0
                say(f"edit {i + 1}/{len(edits)}: loss {loss.item():.4f}, steps {steps}, {el:.1f}s, "
                    f"eta {fmt_seconds(el / (i + 1) * (len(edits) - i - 1))}")
        trained = {name: p.detach().clone() for name, p in params.items()}
    final = sum(e["final_loss"] for e in log["edits"]) / len(edits)
    log.update(epochs_run=1, final_loss=final, stopped_early=False)
    return trained, finish_log(log, edits, encoded, hp, reg, t0)


def batch_loss(model, cache: data.PrefixCache, idx: list[int], hp: Hparams, reg=None) -> torch.Tensor:
    """The objective on training sequences `idx`: layers L.. from the cache, the LM head only at
    the positions that predict a target token, cross-entropy on those tokens."""
    h, batch = cache.batch(idx, packed=reg is None)  # FT++ reads right-padded rows
    frozen = model.model.embed_tokens.weight.dtype  # bf16 on a GPU: autocast the trained fp32 copy too
    with torch.autocast(h.device.type, dtype=frozen, enabled=frozen != torch.float32):
        if reg is not None:
            return reg.loss(model, idx, h, batch, hp.loss_avg)  # FT++: smoothing, general and local KL
        logits = model.forward_from(h, hp.layer, positions=batch.positions, segments=batch.segments,
                                    logits_at=batch.predict_mask)  # (N, V), N target tokens
    ce = F.cross_entropy(logits.float(), batch.labels, reduction="none")
    if hp.loss_avg == "token":
        return ce.mean()
    return batch.per_sample_mean(ce)[0].mean()  # the authors': per edit, then over the batch


def check_finite(loss: torch.Tensor, where: str, hp: Hparams):
    if not torch.isfinite(loss):
        raise EditError(f"loss is {loss.item()} at {where}; training diverged, try a lower --lr (now {hp.lr:g})")


def fmt_seconds(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s" if s >= 60 else f"{s:.0f}s"


def finish_log(log: dict, edits, encoded, hp: Hparams, reg, t0: float) -> dict:
    log.update(n_edits=len(edits), n_sequences=len(encoded), seconds=time.time() - t0,
               hparams={**asdict(hp), "batch_size": log["batch_size"]})
    if reg is not None:
        log["ftpp"] = reg.stats
    return log


def edit(model, tok, edits, hp: Hparams, cache_device=None, say=print):
    """LocFT-BF or the depth-first baseline, as `hp.pipeline` says."""
    train = depth_first if hp.pipeline == "df" else locft_bf
    return train(model, tok, edits, hp, cache_device, say)


# ----------------------------------------------------------------------------------------------
# The command line: every input is checked here, before the model's weights are read


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: "error: argument --lr: expected one argument"
        print(f"error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    H = Hparams
    p = _Parser(description="LocFT-BF model editing: fine-tune one tensor on a set of edits.")
    p.add_argument("--ckpt", required=True, help="Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--edits", required=True, help="edit file (ZsRE, CounterFact, WikiBigEdit, edits.jsonl)")
    p.add_argument("--layer", default=H.layer,
                   help="layer to edit: an index (22), a negative index (-8), or a relative depth in (0,1), "
                        "the paper's proportional position, mapped to layer round(p*N)-1 (0.25 of 28 layers "
                        f"-> 6, of 80 -> 19). Default {H.layer} (later layers)")
    p.add_argument("--module", choices=list(MODULES), default=H.module, help="tensors to train in that layer")
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
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
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


def check_args(args) -> None:
    """Every flag that can be wrong on its own, as one line naming it."""
    positive = {"--lr": args.lr, "--batch-size": args.batch_size, "--epochs": args.epochs,
                "--max-steps": args.max_steps, "--n": args.n}
    for flag, v in positive.items():
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise EditError(f"{flag} must be positive, got {v}")
    if not 0 <= args.augment_prefixes <= len(data.PREFIXES):
        raise EditError(f"--augment-prefixes must be between 0 and {len(data.PREFIXES)}, got {args.augment_prefixes}")
    if not 0 <= args.smooth_alpha <= 1:
        raise EditError(f"--smooth-alpha must be in [0, 1], got {args.smooth_alpha}")
    for flag, v in (("--general-kl", args.general_kl), ("--local-kl", args.local_kl), ("--weight-decay", args.weight_decay)):
        if not (v >= 0 and math.isfinite(v)):
            raise EditError(f"{flag} must be >= 0, got {v}")
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
    """Refuse outputs that would overwrite, sit in, or contain the base checkpoint or each other."""
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


def run(args) -> Path:
    check_args(args)
    ckpt = Path(args.ckpt)
    margs = model_lib.read_args(ckpt)
    layer = resolve_layer(args.layer, margs.n_layers)
    edits = data.load_edits(args.edits, n=args.n, seed=args.seed)
    out = Path(args.out) if args.out else \
        Path("out") / f"{ckpt.resolve().name}-{Path(args.edits).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_paths(args, ckpt, out)
    hp = Hparams(**{f.name: getattr(args, f.name) for f in fields(Hparams) if f.name != "seed"},
                 seed=Hparams.seed if args.seed is None else args.seed)
    hp = replace(hp, layer=layer)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = model_lib.load(ckpt, device=device, dtype=args.dtype)
    names = list(select_params(model, layer, hp.module))
    print(f"editing {len(edits)} edits into {', '.join(names)} ({hp.pipeline}, lr {hp.lr:g})", flush=True)
    trained, log = edit(model, tok, edits, hp, args.cache_device)

    meta = {"format": "pt", "layer": str(layer), "module": hp.module, "n_edits": str(len(edits)),
            "seed": str(hp.seed), "hparams": json.dumps(log["hparams"]), "base_ckpt": str(ckpt.resolve()),
            "torch_version": torch.__version__, "locft_version": __version__}

    def write_out(d: Path):
        delta.save(d / "delta.safetensors", ckpt, trained, meta)
        with open(d / "edits.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in edits)
        (d / "train_log.json").write_text(json.dumps(log, indent=1))

    atomic_dir(out, write_out, args.overwrite)
    if args.export:
        atomic_dir(Path(args.export), lambda d: delta.export(ckpt, d, trained), args.overwrite)
    print(f"done: {len(edits)} edits, {log['epochs_run']} epochs, final loss {log['final_loss']:.4f}, "
          f"{log['seconds']:.1f}s -> {out}" + (f" (export: {args.export})" if args.export else ""), flush=True)
    if args.eval:  # the model holds the base weights: evaluate it, then the trained tensors
        params = dict(model.named_parameters())
        base = {n: params[n].detach().clone() for n in trained}
        report = evaluate.before_after(model, tok, edits, base, trained)
        if args.capability:
            report["capability"] = capability.before_after(model, tok, capability.resolve(args.capability), base,
                                                           trained, args.limit)
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
