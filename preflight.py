"""Everything `edit.py` checks before it reads a single weight: the flags, config.json, the
tokenizer, the edit file (each record against the context), the output paths, the safetensors
headers, --resume and --base-delta, and the memory plan. A problem ends the run in one line
that names the flag or file (`EditError`), before any time or memory is spent.

The hyper-parameters arrive as an `edit.Hparams` (the only method used is `batch_for`), so
the imports go one way: edit -> preflight."""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import budget
import capability
import data
import delta
import distributed
import evaluate
import ftpp
import model as model_lib
import retain
from devices import device_name, free_bytes


class EditError(ValueError):
    """Bad input or a failed run; the message is one line naming the flag or file."""


def say(line: str):
    print(line, flush=True)  # progress lines show at once, also through a pipe or `tee`


@dataclass
class Run:
    """What `preflight` found out about a run before any weight is read."""
    ckpt: Path
    out: Path
    edits: list
    hp: object  # edit.Hparams, with the layer and module resolved for this model
    devices: list[str]
    world: int  # torchrun's processes (1 without it)
    rank: int
    fingerprint: dict  # what a --resume must share with the run it continues
    parent: dict | None  # --base-delta's metadata


def preflight(args, hp) -> Run:
    """Every check that needs no weights, in the order a user would fix them. Raises EditError
    (or a loader's error) in one line."""
    check_args(args)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    devices = check_devices(args.devices) if args.devices else [process_device(args.device)]
    ckpt = Path(args.ckpt)
    margs = model_lib.read_args(ckpt)
    layer = resolve_layer(hp.layer, margs.n_layers)  # --layer and --module against this model
    hp = replace(hp, layer=layer, module=resolve_module(hp.module, margs, layer, type(hp).module))
    if hp.retain and not hp.retain_file:  # the default pool: the edit file's records that are not edited
        hp = replace(hp, retain_from=hp.retain_from or str(args.edits))
    tok = model_lib.Tokenizer(ckpt, margs)
    edits = data.load_edits(args.edits, n=args.n, seed=args.seed)
    for run_dir in args.cumulative or []:  # the earlier runs' edits first, as they were taught
        if not (Path(run_dir) / "edits.jsonl").is_file():
            raise EditError(f"--cumulative {run_dir}: no edits.jsonl there (not an edit.py output directory)")
        edits = data.load_edits(Path(run_dir) / "edits.jsonl") + edits
    prefix = max(len(tok.encode(p, add_special_tokens=False)) for p in data.PREFIXES) + 1 if args.augment_prefixes else 0
    data.check_context(tok, edits, args.edits, margs.max_position_embeddings, 32 if args.eval else 0, prefix)
    if hp.retain:  # a pool holding an evaluated prompt is refused here, before any weight is read
        try:
            retain.pool(edits, hp, say if rank == 0 else (lambda s: None))
        except retain.PoolError as e:
            raise EditError(str(e)) from None
    out = Path(args.out) if args.out else \
        Path("out") / f"{ckpt.resolve().name}-{Path(args.edits).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_paths(args, ckpt, out)
    batch = hp.batch_for(len(edits) * (hp.augment_prefixes + 1))
    if args.devices and (world > 1 or len(devices) > 1 and ftpp.active(hp)):
        raise EditError("--devices runs LocFT-BF in one process without FT++ (no torchrun, no FT++ options)")
    if world > 1 and (hp.pipeline == "df" or ftpp.active(hp)):
        raise EditError("torchrun runs LocFT-BF without FT++ only (--pipeline df and the FT++ options run in one process)")
    if world > batch:
        raise EditError(f"torchrun's {world} processes exceed the batch of {batch}: every process needs a share of each mini-batch")
    model_lib.check_weights(ckpt, margs)
    shapes = model_lib.parameter_shapes(margs)
    parent = delta.check(args.base_delta, shapes) if args.base_delta else None
    fingerprint = {"hparams": hparams_fingerprint(hp), "edits": sha256_json([e.to_json() for e in edits]),
                   "base": {n: delta.sha256(t) for n, t in delta.stored_tensors(ckpt, model_lib.select_params_by_name(shapes, hp.layer, hp.module)).items()},
                   "base_delta": hashlib.sha256(Path(args.base_delta).read_bytes()).hexdigest() if parent is not None else None}
    if args.resume:
        check_resume(partial_dir(out) / "checkpoint.pt", fingerprint)
    lengths = [len(data.encode_edit(tok, e.prompt, e.target)[0]) + prefix for e in edits for _ in range(hp.augment_prefixes + 1)]
    dtype = model_lib.resolve_dtype(args.dtype, margs, devices[0])
    if dtype == torch.float16 and rank == 0:
        say("note: float16 autocast has no loss scaling here; small gradients underflow (bfloat16, the GPU default "
            "for float16 checkpoints, does not)")
    check_memory(memory_plan(margs, lengths, hp, dtype, devices, args.cache_device), say if rank == 0 else (lambda s: None))
    return Run(ckpt, out, edits, hp, devices, world, rank, fingerprint, parent)


# ----------------------------------------------------------------------------------------------
# The command line: edit.py's flags, each checked on its own


def parse_args(argv, H) -> argparse.Namespace:
    """edit.py's flags; `H` (edit.Hparams()) gives every training default."""
    p = evaluate.OneLineParser(description="LocFT-BF model editing: fine-tune one tensor on a set of edits.")
    p.add_argument("--ckpt", required=True, help="Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--edits", required=True, help="edit file (ZsRE, CounterFact, WikiBigEdit, edits.jsonl)")
    p.add_argument("--layer", default=H.layer,
                   help="layer to edit: an index (22), a negative index (-8), or a relative depth in (0,1), "
                        "the paper's proportional position, mapped to layer round(p*N)-1 (0.25 of 28 layers "
                        f"-> 6, of 80 -> 19). Default {H.layer} (later layers)")
    p.add_argument("--module", choices=list(model_lib.MODULES), default=None,
                   help=f"tensors to train in that layer (default {H.module}; on a Qwen2-MoE sparse layer "
                        f"{model_lib.MOE_MODULE})")
    p.add_argument("--lr", type=float, default=H.lr, help=f"learning rate (default {H.lr:g})")
    p.add_argument("--batch-size", type=int, default=H.batch_size,
                   help="mini-batch size (default min(32, ceil(n/10)): ~10 steps per epoch or more)")
    p.add_argument("--epochs", type=int, default=H.epochs, help=f"at most (default {H.epochs}); see --patience")
    p.add_argument("--patience", type=int, default=H.patience, metavar="P",
                   help=f"stop when P epochs learn no new edit and cut the loss by less than --min-gain "
                        f"(default {H.patience}; 0: off)")
    p.add_argument("--authors-budget", nargs=0, action=Preset, const=budget.AUTHORS,
                   help="the LocFT authors' budget: 25 epochs of batch 100, no plateau stop (the same as "
                        "--epochs 25 --batch-size 100 --patience 0; a later flag overrides; theirs is --lr 5e-4 too)")
    p.add_argument("--min-gain", type=float, default=H.min_gain, metavar="G",
                   help=f"with --patience: the relative loss cut that counts as progress (default {H.min_gain:g})")
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
    p.add_argument("--dtype", default=None, help="frozen model dtype: float32 (default on CPU), bfloat16, auto (the "
                                                 "checkpoint's; default on CUDA, but bfloat16 for float16 checkpoints)")
    p.add_argument("--cache-device", default=None, help="prefix cache device (default: the model's; cpu for 100K edits)")
    p.add_argument("--eval", action="store_true", help="evaluate before/after right after training (eval.json)")
    p.add_argument("--capability", nargs="?", const="paper", metavar="TASKS",
                   help="with --eval: also benchmark accuracy before/after, as evaluate.py --capability ('paper' "
                        "by default, 'small', 'harm', 'all' or task names)")
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
    g = p.add_argument_group("retain (off by default; see retain.py): unrelated prompts keep the base model's answers")
    g.add_argument("--retain", action="store_true",
                   help="train the edits jointly with a pool of unrelated prompts held to the base model's own "
                        "answers; alone, the recommended settings and the --edits file's unedited records")
    g.add_argument("--retain-weight", type=float, default=H.retain_weight, metavar="W",
                   help=f"weight of the retain KL (default {H.retain_weight:g})")
    g.add_argument("--retain-pool", type=int, default=H.retain_pool, metavar="N",
                   help="prompts in the pool (default: one per edit)")
    g.add_argument("--retain-tokens", type=int, default=H.retain_tokens, metavar="K",
                   help=f"tokens of each base answer the KL holds (default {H.retain_tokens})")
    g.add_argument("--retain-related", action="store_true",
                   help="from records, first (in turn for each edit) prompts of records sharing an edit's relation, "
                        "its prompt with the subject taken out")
    g2 = g.add_mutually_exclusive_group()
    g2.add_argument("--retain-from", default=None, metavar="FILE",
                    help="an edit file whose records give the pool (their prompts and locality prompts; those "
                         "evaluated or naming an edited subject are dropped); default the --edits file")
    g2.add_argument("--retain-file", default=None, metavar="FILE",
                    help="the pool's prompts, one per line; refused if one is an evaluated prompt")
    args = p.parse_args(argv)
    tuned = [f for f, given in (("--retain-weight", args.retain_weight != H.retain_weight), ("--retain-pool", args.retain_pool),
                                ("--retain-tokens", args.retain_tokens != H.retain_tokens),
                                ("--retain-from", args.retain_from), ("--retain-file", args.retain_file),
                                ("--retain-related", args.retain_related)) if given]
    if tuned and not args.retain:
        p.error(f"{tuned[0]} acts with --retain only; add --retain")
    return args


class Preset(argparse.Action):
    """A flag that stands for several: sets each of `const` (dest -> value) as if given."""

    def __call__(self, parser, namespace, values, option_string=None):
        for dest, value in self.const.items():
            setattr(namespace, dest, value)


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


def resolve_module(module: str | None, margs: model_lib.ModelArgs, layer: int, default: str) -> str:
    """--module checked against the tensors layer `layer` has; unset, `default` (Hparams.module),
    or on a sparse MoE layer (which has no mlp.down_proj) the shared expert's down_proj."""
    with torch.device("meta"):  # the layer's tensor names, without allocating or reading a weight
        names = [n for n, _ in model_lib.DecoderLayer(margs, layer).named_parameters()]
    if module is None:
        module = model_lib.MOE_MODULE if layer in margs.moe_layers else default
    has = [m for m in model_lib.MODULES if any(model_lib.in_module(n, m) for n in names)]
    if module not in has:
        raise EditError(f"--module {module}: layer {layer} has no such tensors; its modules are {', '.join(has)}")
    return module


def check_args(args) -> None:
    """Every flag that can be wrong on its own, as one line naming it."""
    positive = {"--batch-size": args.batch_size, "--epochs": args.epochs, "--max-steps": args.max_steps, "--n": args.n}
    for flag, v in positive.items():
        if v is not None and v <= 0:
            raise EditError(f"{flag} must be positive, got {v}")
    if args.patience < 0:
        raise EditError(f"--patience must be 0 (off) or positive, got {args.patience}")
    if not 0 <= args.min_gain < 1:
        raise EditError(f"--min-gain must be in [0, 1), got {args.min_gain}")
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
    if not 0 <= args.retain_weight <= 1e6:
        raise EditError(f"--retain-weight must be between 0 and 1e6, got {args.retain_weight}")
    for flag, v in (("--retain-pool", args.retain_pool), ("--retain-tokens", args.retain_tokens)):
        if v is not None and v <= 0:
            raise EditError(f"{flag} must be positive, got {v}")
    if args.retain_related and args.retain_file:
        raise EditError("--retain-related draws from records; --retain-file gives prompts without relations")
    for flag, path in (("--retain-from", args.retain_from), ("--retain-file", args.retain_file)):
        if path and not Path(path).is_file():
            raise EditError(f"{flag} {path}: file does not exist")
    if args.general_kl:
        path = Path(args.general_text)
        if not path.is_file():
            raise EditError(f"--general-text {path}: file does not exist")
        if not ftpp.read_sentences(path):
            raise EditError(f"--general-text {path}: no sentences (empty lines and '#' lines are skipped)")


def process_device(flag: str | None) -> str:
    """This process's device: --device, else cuda when there is one, else cpu. Under torchrun
    "cuda" is the process's own GPU, cuda:LOCAL_RANK; refused in one line: more processes on this
    machine than it has GPUs, and one GPU named for several processes (NCCL takes one each)."""
    device = flag or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise EditError(f"--device {device!r} is not a device (cpu, cuda, cuda:1)") from None
    if d.type != "cuda":
        return device
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if (d.index or 0) >= gpus:
        raise EditError(f"--device {device}: this machine has {gpus} CUDA devices")
    here = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if distributed.launched() else 1
    if here > 1 and d.index is not None:
        raise EditError(f"--device {device} under torchrun: all {here} processes of this machine would share it; "
                        f"give --device cuda (process i takes cuda:i)")
    if here > gpus:
        raise EditError(f"torchrun started {here} processes on this machine, which has {gpus} CUDA devices: "
                        f"one process per GPU (--nproc-per-node {gpus}), or --device cpu")
    return f"cuda:{os.environ['LOCAL_RANK']}" if distributed.launched() and d.index is None else device


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


# ----------------------------------------------------------------------------------------------
# Outputs and --resume: nothing the user owns is overwritten unasked


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


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


def hparams_fingerprint(hp) -> dict:
    """The hyper-parameters as a --resume compares them: FT++'s general text by its content, so a
    moved checkout (or a copied file) still resumes."""
    fp = asdict(hp)
    fp["general_text"] = hashlib.sha256(Path(hp.general_text).read_bytes()).hexdigest() if hp.general_kl else None
    for name in ("retain_from", "retain_file"):  # the pool's source, by content too
        fp[name] = hashlib.sha256(Path(fp[name]).read_bytes()).hexdigest() if fp[name] else None
    return fp


def check_resume(path: Path, fingerprint: dict):
    """Refuse to continue a run made with other flags, other edits or another base. Reads the
    small fingerprint.json beside the checkpoint (checkpoint.start writes it before the first
    epoch), not the checkpoint with its tensors."""
    small = path.with_name("fingerprint.json")
    saved = json.loads(small.read_text()) if small.is_file() else \
        torch.load(path, map_location="cpu", weights_only=True)["fingerprint"]  # a run of an older version
    for key in fingerprint:
        a, b = saved.get(key), fingerprint[key]
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                k = next(k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))
                raise EditError(f"--resume: the run in {path.parent} used {key} {k}={a.get(k)!r}, this one {b.get(k)!r}")
            raise EditError(f"--resume: the run in {path.parent} was made with other {key}")


# ----------------------------------------------------------------------------------------------
# The memory plan


def memory_plan(margs, lengths: list[int], hp, dtype: torch.dtype, devices: list[str], cache_device) -> dict:
    """What a run will hold, in bytes, computed from the config and the token counts alone: the
    frozen model (per device, placed as `Transformer.place` places it), the prefix cache (every
    token once; in host memory or on disk for a GPU run, plus one batch's pinned buffer), the
    trained tensors with their gradient and Adam's two moments (fp32), and a rough bound on one
    step's activations, which live with the trained layer."""
    shapes = model_lib.parameter_shapes(margs)
    size = torch.finfo(dtype).bits // 8
    n = margs.n_layers
    devices, cache_device = [device_name(d) for d in devices], cache_device and device_name(cache_device)
    trained = sum(math.prod(s) for s in model_lib.select_params_by_name(shapes, hp.layer, hp.module).values())
    bs = hp.batch_for(len(lengths))
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
    if cache in ("cpu", "disk") and edited.startswith("cuda"):  # a batch's pinned buffer, a power of two
        need["cpu"] = need.get("cpu", 0) + (1 << (step_tokens * margs.dim * size - 1).bit_length())
    plan["need"] = need
    return plan


def check_memory(plan: dict, say=say):
    gb = lambda b: f"{b / 2**30:.2f} GB"  # noqa: E731
    say(f"memory: model {gb(plan['model'])}, prefix cache {gb(plan['prefix_cache'])}, trained tensors + Adam "
        f"{gb(plan['trained_and_adam'])}, activations up to ~{gb(plan['activations'])}")
    for where, need in plan["need"].items():
        free = free_bytes(where)
        if free is not None and need > free:
            raise EditError(f"this run needs about {gb(need)} on {where} but {gb(free)} is free; try fewer edits "
                            f"(--n), a smaller --batch-size, or --cache-device cpu")
