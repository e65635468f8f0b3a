"""Edit a model with a rival method, in the paper's lifelong protocol: sequential batches.

    python baselines/run.py --method memit --ckpt weights/smollm2-135m --edits zsre.json --out out/memit
    python evaluate.py --ckpt weights/smollm2-135m --delta out/memit/delta.safetensors --edits zsre.json

Methods: memit, alphaedit, rect, ultraedit, ft_l (see baselines/__init__.py). The edits are
applied batch after batch (--batch, 100 by default), each batch on the model the earlier ones
left; after every batch the state is saved in OUT.partial, so --resume continues a killed run.
The output is what edit.py writes: delta.safetensors (every changed tensor, with the method,
its hyper-parameters and the covariance corpus's hash in the metadata), edits.jsonl and
train_log.json; AlphaEdit and UltraEdit also leave their lifelong state beside the delta
(state.safetensors), which --base-delta reads to continue editing from a finished run.

Every method edits toward the same target tokens as LocFT-BF, from the same raw prompt; --eos
adds the EOS to them (off: the methods' own papers' setting). The model runs in float32.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import checkpoint as ckpt_lib  # noqa: E402
import data  # noqa: E402
import delta  # noqa: E402
import edit  # noqa: E402
import evaluate  # noqa: E402
import model as model_lib  # noqa: E402
import preflight  # noqa: E402
from baselines import alphaedit, cov, ft_l, hparams, locate, memit, ultraedit  # noqa: E402
from preflight import EditError, say  # noqa: E402

LOCATE = ("memit", "rect", "alphaedit")  # the methods that need subjects, templates and C0
STATE = "state.safetensors"  # AlphaEdit's / UltraEdit's lifelong state, beside the delta


def parse_args(argv=None) -> argparse.Namespace:
    p = evaluate.OneLineParser(description="Edit a model with MEMIT, AlphaEdit, RECT, UltraEdit or FT-L, "
                                           "sequentially in batches; writes what edit.py writes.")
    p.add_argument("--method", required=True, choices=hparams.METHODS)
    p.add_argument("--ckpt", required=True, help="Hugging Face checkpoint directory (safetensors)")
    p.add_argument("--edits", required=True, help="edit file (ZsRE, CounterFact, WikiBigEdit, edits.jsonl)")
    p.add_argument("--out", default=None, help="output directory (default out/<ckpt>-<edits>-<method>-<time>/)")
    p.add_argument("--batch", type=int, default=100, help="edits per sequential batch (default 100)")
    p.add_argument("--eos", action="store_true", help="train the target's EOS too, as LocFT-BF does (default off: "
                                                       "the methods' papers' setting)")
    p.add_argument("--n", type=int, default=None, help="use n edits: the first n, or a random n with --seed")
    p.add_argument("--seed", type=int, default=None, help="with --n: a reproducible random subset (as edit.py --seed)")
    p.add_argument("--template-seed", type=int, default=0, help="seeds the sampled context templates (MEMIT, "
                                                                "AlphaEdit, RECT); default 0")
    p.add_argument("--cov-text", default=None, help="text for C0 (MEMIT, AlphaEdit, RECT): .jsonl with a \"text\" "
                                                    "field per line, or documents separated by blank lines; default "
                                                    "BoolQ's Wikipedia passages")
    p.add_argument("--cov-tokens", type=int, default=100_000, help="tokens of it to use (default 100000; 0: all)")
    p.add_argument("--cov-cache", default=None, help=f"where C0 is cached (default {cov.DEFAULT_CACHE})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one hyper-parameter (a JSON value), e.g. --set v_lr=0.5 --set layers=[6,7,8]; "
                        "recorded in the delta's metadata")
    p.add_argument("--base-delta", default=None, metavar="DELTA", help="continue from an earlier run of the same "
                                                                       "method: its delta and the state beside it")
    p.add_argument("--resume", action="store_true", help="continue the run whose state OUT.partial holds")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", default="cpu", help="default cpu (where the methods are tested; cuda is untested)")
    return p.parse_args(argv)


def edited_tensors(method: str, hp: dict) -> list[str]:
    """The checkpoint names of the tensors a method changes."""
    if method == "ultraedit":
        return [f"model.layers.{l}.mlp.{m}.weight" for m, ls in hp["modules"].items() for l in ls]
    layers = [hp["layer"]] if method == "ft_l" else hp["layers"]
    return [f"model.layers.{l}.mlp.down_proj.weight" for l in layers]


def override(hp: dict, source: dict, method: str, items: list[str]):
    """--set KEY=VALUE: each value parsed as JSON and checked against the default's type."""
    for item in items:
        key, _, value = item.partition("=")
        if key not in hp:
            raise EditError(f"--set {item}: {method} has no hyper-parameter {key!r} (it has {', '.join(hp)})")
        try:
            new = json.loads(value)
        except json.JSONDecodeError:
            raise EditError(f"--set {item}: {value!r} is not a JSON value (numbers, [lists], \"strings\", null)") from None
        old, number = hp[key], (int, float)
        fits = (isinstance(new, number) and not isinstance(new, bool)) if isinstance(old, number) or old is None \
            else isinstance(new, type(old))
        if not fits and not (old is None and new is None):
            raise EditError(f"--set {item}: {key} should be like {json.dumps(old)}")
        hp[key] = new
        source.setdefault("overrides", {})[key] = new


def preflight_run(args):
    """Every check that needs no weights; returns what the run needs. Raises in one line."""
    for flag, v in (("--batch", args.batch), ("--n", args.n)):
        if v is not None and v <= 0:
            raise EditError(f"{flag} must be positive, got {v}")
    if args.cov_tokens < 0:
        raise EditError(f"--cov-tokens must be 0 (all) or positive, got {args.cov_tokens}")
    if args.cov_text and args.method not in LOCATE:
        raise EditError(f"--cov-text: {args.method} uses no covariance (only memit, alphaedit, rect do)")
    ckpt = Path(args.ckpt)
    margs = model_lib.read_args(ckpt)
    tok = model_lib.Tokenizer(ckpt, margs)
    edits = data.load_edits(args.edits, n=args.n, seed=args.seed)
    data.check_context(tok, edits, args.edits, margs.max_position_embeddings)
    reqs = locate.requests(tok, edits, args.edits, args.eos) if args.method in LOCATE else None
    hp, source = hparams.resolve(args.method, margs.model_type, margs.n_layers, margs.intermediate_size)
    override(hp, source, args.method, args.set)
    shapes = model_lib.parameter_shapes(margs)
    names = edited_tensors(args.method, hp)
    missing = [n for n in names if n not in shapes]
    if missing:
        raise EditError(f"{args.method} edits {missing[0]}, which {ckpt} does not have (a sparse MoE layer?)")
    if args.method in LOCATE:
        docs, src = cov.read_corpus(args.cov_text)
        cov.tokenize(tok, docs, args.cov_tokens or None, margs.intermediate_size, src)  # refuses a short text now
    out = Path(args.out) if args.out else Path("out") / (f"{ckpt.resolve().name}-{Path(args.edits).stem}-{args.method}"
                                                          f"{'-eos' if args.eos else ''}-{time.strftime('%Y%m%d-%H%M%S')}")
    args.export = None  # check_paths also checks edit.py's --export
    preflight.check_paths(args, ckpt, out)
    model_lib.check_weights(ckpt, margs)
    parent = None
    if args.base_delta:
        parent = delta.check(args.base_delta, shapes)
        if parent.get("method") != args.method:
            raise EditError(f"--base-delta {args.base_delta}: made by {parent.get('method', 'edit.py')}, "
                            f"not {args.method}")
        if args.method in ("alphaedit", "ultraedit") and not (Path(args.base_delta).parent / STATE).is_file():
            raise EditError(f"--base-delta {args.base_delta}: no {STATE} beside it ({args.method}'s lifelong state)")
    originals = delta.stored_tensors(ckpt, names)
    fingerprint = {"method": args.method, "hparams": hp, "eos": args.eos, "batch": args.batch,
                   "template_seed": args.template_seed, "cov": [args.cov_text, args.cov_tokens],
                   "edits": preflight.sha256_json([e.to_json() for e in edits]),
                   "base": {n: delta.sha256(t) for n, t in sorted(originals.items())},
                   "base_delta": hashlib.sha256(Path(args.base_delta).read_bytes()).hexdigest() if parent else None}
    if args.resume:
        preflight.check_resume(preflight.partial_dir(out) / "checkpoint.pt", fingerprint)
    return ckpt, tok, edits, reqs, hp, source, names, out, parent, fingerprint


class Method:
    """One method's per-batch step and lifelong state, behind one call: `edit_batch(start, end)`."""

    def __init__(self, name, model, tok, edits, reqs, hp, args, ckpt, log):
        self.name, self.model, self.tok, self.edits, self.reqs, self.hp = name, model, tok, edits, reqs, hp
        self.state: dict[str, torch.Tensor] = {}  # what must survive between batches (and runs)
        if name in LOCATE:
            self.templates = locate.context_templates(model, tok, args.template_seed)
            log["templates"] = self.templates
            self.C0, log["cov"] = cov.second_moments_cached(model, tok, ckpt, hp["layers"], args.cov_text,
                                                            args.cov_tokens or None, args.cov_cache, say)
        if name == "alphaedit":
            self.P = {}
            log["nullspace_rank"] = {}
            for l in hp["layers"]:
                self.P[l], rank = alphaedit.projection(self.C0[l], hp["nullspace_threshold"])
                log["nullspace_rank"][str(l)] = rank
                self.state[f"Cp.{l}"] = torch.zeros(self.C0[l].shape, dtype=torch.float64)
            say(f"AlphaEdit null space (eigenvalues of C0 below {hp['nullspace_threshold']:g}): rank "
                + ", ".join(f"{r} at layer {l}" for l, r in log["nullspace_rank"].items())
                + f" of {model.args.intermediate_size}")
        if name == "ultraedit":
            self.norms: dict[str, ultraedit.RunningNorm] = {}
        answers = locate.answers(tok, edits, args.eos)
        self.encoded = []
        for e, a in zip(edits, answers):
            ids, n_prompt = data.encode_edit(tok, e.prompt, e.target)
            self.encoded.append((ids[:n_prompt] + a, n_prompt))

    def edit_batch(self, start: int, end: int) -> dict:
        m, hp = self.model, self.hp
        if self.name in ("memit", "rect"):
            return memit.edit_batch(m, self.tok, self.reqs[start:end], self.templates, hp, self.C0, say)
        if self.name == "alphaedit":
            Cp = {l: self.state[f"Cp.{l}"] for l in hp["layers"]}
            return alphaedit.edit_batch(m, self.tok, self.reqs[start:end], self.templates, hp, self.P, Cp, say)
        if self.name == "ultraedit":
            log = ultraedit.edit_batch(m, self.encoded[start:end], hp, self.norms, say)
            self.state = {f"{k}.{part}": t for k, n in self.norms.items() for part, t in n.state().items()}
            return log
        enc = self.encoded[start:end]
        return ft_l.edit_batch(m, [ids[:n] for ids, n in enc], [ids[n:] for ids, n in enc], hp, say)

    def load_state(self, state: dict[str, torch.Tensor]):
        self.state = dict(state)
        if self.name == "ultraedit":
            for key in {k.split(".")[0] for k in state}:
                self.norms[key] = ultraedit.RunningNorm(1)
                self.norms[key].load({p: state[f"{key}.{p}"] for p in ("n", "mean", "var", "std")})


def run(args) -> Path:
    ckpt, tok, edits, reqs, hp, source, names, out, parent, fingerprint = preflight_run(args)
    checkpoint = ckpt_lib.start(out, fingerprint, args.resume, stop_loss=0.0)
    model, tok = model_lib.load(ckpt, device=args.device, dtype=torch.float32)
    params = dict(model.named_parameters())
    n_batches = -(-len(edits) // args.batch)
    log = {"method": args.method, "hparams": hp, "hparams_source": source, "eos": args.eos, "batch": args.batch,
           "template_seed": args.template_seed, "n_edits": len(edits), "batches": []}
    say(f"{args.method}: {len(edits)} edits in {n_batches} batches of {args.batch} into {', '.join(names)} "
        f"({source['rule']}; target{' + EOS' if args.eos else ''})")
    with ckpt_lib.keep_or_clean(checkpoint):
        t0 = time.time()
        method = Method(args.method, model, tok, edits, reqs, hp, args, ckpt, log)  # templates and C0: the base's
        log["setup_seconds"] = time.time() - t0
        if parent is not None:  # lifelong: continue from an earlier run's weights and state
            delta.apply(model, args.base_delta)
            if (Path(args.base_delta).parent / STATE).is_file():
                method.load_state(load_file(str(Path(args.base_delta).parent / STATE)))
        first = 0
        if args.resume:
            saved = torch.load(checkpoint.path, map_location="cpu", weights_only=True)
            model.load_tensors(saved["params"])
            method.load_state(saved["state"])
            log, first = saved["log"], saved["epoch"]
            say(f"resuming from {checkpoint.path} after batch {first}")
        for b in range(first, n_batches):
            tb = time.time()
            start, end = b * args.batch, min(len(edits), (b + 1) * args.batch)
            entry = method.edit_batch(start, end)
            seconds = time.time() - tb
            log["batches"].append({"batch": b + 1, "edits": [start, end], "seconds": seconds, **entry})
            done_s = sum(x["seconds"] for x in log["batches"])
            say(f"batch {b + 1}/{n_batches}: {end - start} edits in {seconds:.0f}s ({seconds / (end - start):.2f}s per edit), "
                f"eta {edit.fmt_seconds(done_s / len(log['batches']) * (n_batches - b - 1))}")
            checkpoint.save({"epoch": b + 1, "state": method.state}, {n: params[n] for n in names}, log)
    log["seconds"] = sum(x["seconds"] for x in log["batches"]) + log["setup_seconds"]
    log["seconds_per_edit"] = log["seconds"] / len(edits)
    meta = {"format": "pt", "method": args.method, "hparams": json.dumps(hp), "hparams_source": json.dumps(source),
            "eos": str(args.eos), "batch": str(args.batch), "n_edits": str(len(edits)),
            "template_seed": str(args.template_seed), "templates": json.dumps(log.get("templates")),
            "corpus_sha256": log.get("cov", {}).get("corpus_sha256", ""), "corpus_tokens": str(log.get("cov", {}).get("tokens", "")),
            "base_ckpt": str(ckpt.resolve()), "torch_version": torch.__version__, "locft_version": edit.__version__}
    if "nullspace_rank" in log:
        meta["nullspace_rank"] = json.dumps(log["nullspace_rank"])
    if parent is not None:
        meta.update(parent=str(Path(args.base_delta).resolve()), parent_sha256=fingerprint["base_delta"],
                    parent_n_edits=parent.get("n_edits", "?"))
    changed = {n: params[n].detach().float().cpu() for n in names}

    def write_out(d: Path):
        delta.save(d / "delta.safetensors", ckpt, changed, meta)
        if method.state:
            save_file({k: v.contiguous() for k, v in method.state.items()}, str(d / STATE), {"method": args.method})
        with open(d / "edits.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in edits)
        (d / "train_log.json").write_text(json.dumps(log, indent=1))

    ckpt_lib.atomic_dir(out, write_out, args.overwrite)
    shutil.rmtree(checkpoint.path.parent)
    say(f"done: {len(edits)} edits with {args.method}, {log['seconds']:.0f}s ({log['seconds_per_edit']:.2f}s per edit) -> {out}")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (EditError, data.EditFileError, model_lib.CheckpointError, delta.DeltaError, cov.CorpusError) as e:
        print(f"run.py: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (ckpt_lib.Interrupted, KeyboardInterrupt) as e:
        print(f"run.py: {e or 'interrupted; no half-written output is left'}", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
