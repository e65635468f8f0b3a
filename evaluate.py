"""Measuring an edit the way it is used: greedy decoding, then exact match.

The authors' protocol (the "Wild" evaluation the paper follows), for reliability and
generalization: each prompt is fed raw (no chat template), the model decodes greedily for at
most 32 new tokens and stops at ".", "\\n" or EOS; the answer is the new text before the first
"." or "\\n" (so "3.5" reads as "3", as in their code), compared with the target by exact match
after SQuAD normalisation.

    reliability      the edit prompt now yields the new target            (authors' protocol)
    generalization   its paraphrases do too                                (authors' protocol)
    locality         unrelated prompts yield the same output as before     (this project's)
                     the edit, and as a second figure their given answer
    bleed            unrelated prompts now answered with an edit's target  (this project's; bleed.py)

The paper measures harm by Capability (benchmark accuracy) rather than locality; the locality
figures and the teacher-forced ones are this project's additions. Teacher-forced figures, the
older convention, are labelled as such: the share of answer tokens (EOS not counted) that are
the model's argmax given the gold prefix; for locality, the share of positions of the base
model's own greedy continuation where the edited model's argmax equals the base model's.

One model is in memory: the base weights are evaluated, then the edited tensors are copied in.
On a CPU the model runs in float32, as `edit.py` trains it, so `edit.py --eval` and this script
score the same tensor the same way.

    python evaluate.py --ckpt weights/smollm2-135m --delta out/demo/delta.safetensors --edits data/demo_edits.json

`--capability` adds the paper's measure of harm, benchmark accuracy before and after the edit
(capability.py): `--capability` alone is the paper's set (MMLU, NQ-open, SST-2, GSM8K), `small`
a set that discriminates on small models, `harm` a preset sized to see a loss of 1-2 points on
the default models (with KL and perplexity on held-out text); `--limit N` scores the first N
documents of each task.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

import capability
import delta
from basecache import BaseCache
from bleed import bleed
from data import Edit, EditFileError, check_context, collate, encode_edit, load_edits
from devices import evaluation_dtype
from generate import EDIT_STOP, MAX_NEW_TOKENS, cut_at_stop, greedy
from model import CheckpointError, Tokenizer, load, parameter_shapes, read_args

# ----------------------------------------------------------------------------------------------
# Answers: SQuAD normalisation

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)  # ASCII only, as in the SQuAD script: "“Paris”" keeps its quotes


def normalize_answer(s: str) -> str:
    """SQuAD v1.1: lower-case, drop ASCII punctuation, drop the words a/an/the, squeeze
    whitespace. Accents and non-ASCII punctuation are kept, as in the original."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, target: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(target)


# ----------------------------------------------------------------------------------------------
# Probes: what each edit is asked, grouped by what it measures


class Probe(NamedTuple):
    edit: int  # index of the edit it belongs to
    prompt: str
    answer: str  # the edit's target; for locality the data set's answer ("" when unknown)


def probes(edits: list[Edit]) -> dict[str, list[Probe]]:
    return {"reliability": [Probe(i, e.prompt, e.target) for i, e in enumerate(edits)],
            "generalization": [Probe(i, r, e.target) for i, e in enumerate(edits) for r in e.rephrases],
            "locality": [Probe(i, p, a) for i, e in enumerate(edits) for p, a in e.locality]}


def by_group(fn, groups: dict[str, list]) -> dict[str, list]:
    """`fn` over every group's items in one call (one batched pass), split back by group."""
    results = iter(fn([x for items in groups.values() for x in items]))
    return {name: [next(results) for _ in items] for name, items in groups.items()}


@torch.inference_mode()
def teacher_forced_argmax(model, encoded: list[tuple[list[int], int]], pad_id: int, batch_size=64) -> list[list[int]]:
    """For each (ids, n_prompt): the model's argmax at each position that predicts a token after
    the prompt, given the true tokens before it."""
    dev = model.device
    out: list[list[int]] = [[] for _ in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        batch = collate([encoded[i] for i in rows], pad_id).to(dev)
        pred = model(batch.ids, attention_mask=batch.attention_mask, logits_at=batch.predict_at).argmax(-1).tolist()
        for i in rows:  # one transfer per batch, split on the host
            n = len(encoded[i][0]) - encoded[i][1]
            out[i], pred = pred[:n], pred[n:]
    return out


def score_weights(model, tok, groups: dict[str, list[Probe]], base: dict | None = None, batch_size=64,
                  max_new_tokens=MAX_NEW_TOKENS) -> dict:
    """Everything the model's current weights say about the probes. `base` is this function's
    result for the unedited model (None: this is the unedited model)."""
    ids = by_group(lambda ps: greedy(model, tok, ps, max_new_tokens, EDIT_STOP, batch_size),
                   {g: [p.prompt for p in items] for g, items in groups.items()})
    answers = {g: [cut_at_stop(tok.decode(x)) for x in xs] for g, xs in ids.items()}
    base = base or {"ids": ids, "answers": answers}
    def gold(p):  # prompt + " " + answer without the EOS: the accuracy counts answer tokens only
        ids, n_prompt = encode_edit(tok, p.prompt, p.answer)
        return ids[:-1], n_prompt

    # teacher forcing: along the gold answer, and along the base model's own greedy output
    tf = {g: [gold(p) for p in groups[g]] for g in ("reliability", "generalization")}
    tf["locality"] = [(tok.encode(p.prompt) + x, len(tok.encode(p.prompt)))
                      for p, x in zip(groups["locality"], base["ids"]["locality"])]
    preds = by_group(lambda seqs: teacher_forced_argmax(model, seqs, tok.pad_id, batch_size), tf)
    base_preds = base.get("preds", preds)["locality"]

    def acc(pred, seq):
        gold = seq[0][seq[1]:]
        return sum(a == b for a, b in zip(pred, gold)) / len(gold)

    em = {g: [exact_match(a, p.answer) for a, p in zip(answers[g], groups[g])] for g in groups}
    some, own = bleed(groups["locality"], [p.answer for p in groups["reliability"]], answers["locality"],
                      base["answers"]["locality"], normalize_answer)  # bleed.py: answered with an edit's target
    scores = {
        "reliability (greedy EM)": em["reliability"],
        "generalization (greedy EM)": em["generalization"],
        "locality (output unchanged)": [a == b for a, b in zip(answers["locality"], base["answers"]["locality"])],
        "locality (EM vs given answer)": [m if p.answer.strip() else None for m, p in zip(em["locality"], groups["locality"])],
        "locality bleed (some edit's target)": some,
        "locality bleed (its own edit's target)": own,
        "reliability (teacher-forced token acc)": [acc(x, s) for x, s in zip(preds["reliability"], tf["reliability"])],
        "generalization (teacher-forced token acc)": [acc(x, s) for x, s in zip(preds["generalization"], tf["generalization"])],
        "locality (teacher-forced, base predictions kept)": [
            sum(a == b for a, b in zip(x, bx)) / len(bx) for x, bx in zip(preds["locality"], base_preds)],
    }
    return {"ids": ids, "answers": answers, "preds": preds, "scores": scores}


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ----------------------------------------------------------------------------------------------
# Perplexity drift on a text


def text_metrics(model, tok, text: str, base: dict | None, edited: dict | None, window: int = 256) -> dict:
    """Perplexity of each weight set on `text` and the mean per-token KL(base || edited), over
    non-overlapping windows of `window` tokens (capability.drift: only the tensors in
    `base`/`edited` are swapped per batch of windows, so one model is in memory)."""
    windows = capability.text_windows(tok, [text], window)
    d = capability.drift(model, tok, windows, base, edited)
    count = int(d["tokens"].sum())
    out = {"tokens": count, "windows": len(windows), "window": window,
           "perplexity": {"base": math.exp(d["nll_base"].sum() / count)}}
    if edited is not None:
        out["perplexity"]["edited"] = math.exp(d["nll_edited"].sum() / count)
        out["kl_base_edited_per_token"] = float(d["kl"].sum() / count)
    return out


# ----------------------------------------------------------------------------------------------
# One model, both weight sets


def before_after(model, tok, edits: list[Edit], base: dict[str, torch.Tensor] | None,
                 edited: dict[str, torch.Tensor] | None, text: str | None = None, batch_size: int = 64,
                 max_new_tokens: int = MAX_NEW_TOKENS, say=lambda s: print(s, flush=True)) -> dict:
    """Evaluate the base and the edited weights in one run with one model in memory.

    `base` / `edited` map parameter names to tensors (usually only the edited ones); each is
    copied into the model before its evaluation, and the model is left holding `edited`.
    `base=None`: the model's current weights are the base. `edited=None`: base only.
    """
    t0 = time.time()
    if base is None and edited is not None:  # keep the current values to swap back
        params = dict(model.named_parameters())
        base = {n: params[n].detach().clone() for n in edited}
    if base:
        model.load_tensors(base)
    groups = probes(edits)
    say(f"evaluating the base model on {sum(map(len, groups.values()))} prompts ({len(edits)} edits, "
        f"{str(next(model.parameters()).dtype).removeprefix('torch.')})")
    runs = {"base": score_weights(model, tok, groups, None, batch_size, max_new_tokens)}
    if edited is not None:
        say(f"evaluating the edited model ({time.time() - t0:.0f}s so far)")
        model.load_tensors(edited)
        runs["edited"] = score_weights(model, tok, groups, runs["base"], batch_size, max_new_tokens)
    text_report = text_metrics(model, tok, text, base, edited) if text is not None else None
    if edited is not None:
        model.load_tensors(edited)

    metrics = {}
    for label, values in runs["base"]["scores"].items():
        metrics[label] = {name: _mean(run["scores"][label]) for name, run in runs.items()}
        metrics[label]["n"] = sum(v is not None for v in values)
    per_edit = [{"prompt": e.prompt, "target": e.target, "old_answer": e.old_answer, "rephrases": [], "locality": []}
                for e in edits]
    for group, key in (("reliability", None), ("generalization", "rephrases"), ("locality", "locality")):
        for j, p in enumerate(groups[group]):
            item = {name: run["answers"][group][j] for name, run in runs.items()}
            if key is None:
                per_edit[p.edit].update(item)
            else:
                per_edit[p.edit][key].append({"prompt": p.prompt, **({"answer": p.answer} if key == "locality" else {}),
                                              **item})
    param = next(model.parameters())
    return {
        "metrics": metrics,
        "text": text_report,
        "settings": {"edits": len(edits), "decoding": "greedy", "max_new_tokens": max_new_tokens,
                     "stop": "EOS or first '.' / '\\n' in the new text (answer cut before it)",
                     "normalisation": "SQuAD (lower-case, ASCII punctuation, a/an/the, whitespace)",
                     "teacher_forced": "answer tokens only, EOS excluded; locality: edited argmax == base argmax "
                                       "along the base model's greedy output",
                     "batch_size": batch_size, "dtype": str(param.dtype).removeprefix("torch."),
                     "device": str(param.device), "seconds": round(time.time() - t0, 2)},
        "edits": per_edit,
    }


def measure(model, tok, edits: list[Edit], before: dict | None, edited: dict, tasks=(), limit: int | None = None,
            data_dir=capability.DATA_DIR, base_cache: dict | None = None, text: str | None = None,
            say=lambda s: None) -> dict:
    """The whole before/after report of one edit: the edit metrics (with `text`, the drift on it)
    and, with `tasks`, capability. `before=None`: the model's current weights; the model is left
    holding them."""
    if before is None:
        params = dict(model.named_parameters())
        before = {n: params[n].detach().clone() for n in edited}
    report = before_after(model, tok, edits, before, edited, text=text, say=say)
    if tasks:
        report["capability"] = capability.before_after(model, tok, list(tasks), before, edited, limit,
                                                       data_dir=data_dir, say=say, base_cache=base_cache)
    model.load_tensors(before)
    return report


def headline(report: dict) -> dict:
    """The figures a table or a plot shows, edited model first: reliability, generalization, both
    localities, and each capability average ("Cap" is the paper's) with its change and interval."""
    m = report["metrics"]
    row = {"reliability": m["reliability (greedy EM)"]["edited"],
           "generalization": m["generalization (greedy EM)"]["edited"],
           "locality_unchanged": m["locality (output unchanged)"]["edited"],
           "locality_teacher_forced": m["locality (teacher-forced, base predictions kept)"]["edited"],
           "locality_em": m["locality (EM vs given answer)"]["edited"],
           "bleed": m["locality bleed (some edit's target)"]["edited"],
           "bleed_own": m["locality bleed (its own edit's target)"]["edited"]}
    if report.get("text"):
        row.update(perplexity_base=report["text"]["perplexity"]["base"], perplexity=report["text"]["perplexity"]["edited"],
                   kl_per_token=report["text"]["kl_base_edited_per_token"])
    for name, a in report.get("capability", {}).get("averages", {}).items():
        row.update({f"{name}_base": a["base"], f"{name}": a["edited"], f"{name}_change": a["change"],
                    f"{name}_ci95": a["ci95"]})
    for name, t in report.get("capability", {}).get("tasks", {}).items():
        row[f"{name}_{t['primary']}"] = t["metrics"][t["primary"]]["edited"]
    return row


# ----------------------------------------------------------------------------------------------
# Report


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_report(report: dict, file=None, examples: int = 5) -> None:
    if "metrics" in report:
        print_edit_metrics(report, file, examples)
    if "capability" in report:
        print(("\n" if "metrics" in report else "") + capability.format_table(report["capability"]),
              file=file or sys.stdout)


def print_edit_metrics(report: dict, file=None, examples: int = 5) -> None:
    has_edited = any("edited" in row for row in report["metrics"].values())
    w = max(len(k) for k in report["metrics"]) + 2
    lines = [f"{'metric':<{w}}{'base':>8}" + (f"{'edited':>9}" if has_edited else "") + f"{'n':>7}"]
    for label, row in report["metrics"].items():
        lines.append(f"{label:<{w}}{_fmt(row['base']):>8}" + (f"{_fmt(row.get('edited')):>9}" if has_edited else "")
                     + f"{row['n']:>7}")
    t = report.get("text")
    if t:
        p = t["perplexity"]
        lines.append(f"{'perplexity (--text)':<{w}}{p['base']:>8.2f}" + (f"{p['edited']:>9.2f}" if "edited" in p else "")
                     + f"{t['tokens']:>7}")
        if "kl_base_edited_per_token" in t:
            lines.append(f"{'KL(base || edited) per token':<{w}}{'':>8}{t['kl_base_edited_per_token']:>9.4f}{t['tokens']:>7}")
    if has_edited and examples:  # a few edits as a person reads them: what the model says now
        lines.append("")
        for e in report.get("edits", [])[:examples]:
            lines.append(f"{e['prompt']!r}: {e['base']!r} -> {e['edited']!r} (target {e['target']!r})")
    print("\n".join(lines), file=file or sys.stdout)


def write_report(report: dict, path) -> None:
    """Write the report as JSON atomically: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# CLI


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors as one line ("evaluate.py: error: argument --lr: ...") and no usage block."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv=None) -> int:
    ap = OneLineParser(description="Before/after evaluation of an edit: greedy reliability, generalization, "
                                   "locality (--edits) and benchmark capability (--capability).")
    ap.add_argument("--ckpt", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--delta", help="delta.safetensors written by edit.py; without it only the base is evaluated")
    ap.add_argument("--edits", help="edit file (.json or .jsonl, any known layout)")
    ap.add_argument("--n", type=int, help="evaluate n edits (the first n, or a random n with --seed)")
    ap.add_argument("--seed", type=int, help="with --n: pick a reproducible random subset")
    ap.add_argument("--capability", nargs="?", const="paper", metavar="TASKS",
                    help="benchmark accuracy as lm-evaluation-harness scores it: 'paper' (the default: mmlu, nq, "
                         "sst2, gsm8k), 'small', 'harm' (docs/capability.md), 'all' or task names, comma-separated, "
                         f"'task:N' for its first N documents ({', '.join([*capability.TASKS, *capability.TEXTS])})")
    ap.add_argument("--limit", type=int, help="with --capability: the first N documents of each task (MMLU: of each "
                                              "subject), as lm-eval's --limit")
    ap.add_argument("--capability-data", default=str(capability.DATA_DIR),
                    help="directory of the <task>.jsonl files (default data/capability/, made by make capability)")
    ap.add_argument("--capability-cache", metavar="DIR",
                    help="with --capability: keep the base model's results there and reuse them in later runs")
    ap.add_argument("--out", help="write the full report (metrics, per-edit outputs, capability) as JSON here")
    ap.add_argument("--text", help="with --edits, a text file: perplexity of base and edited model and KL(base || edited)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (the default wherever the fp32 model fits: scores then do "
                                                  "not depend on --batch-size), bfloat16, auto (the checkpoint's)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = ap.parse_args(argv)
    try:
        # everything that can be known without the weights is checked before they are read
        if args.batch_size <= 0 or args.max_new_tokens <= 0:
            raise ValueError("--batch-size and --max-new-tokens must be positive")
        if not args.edits and not args.capability:
            raise ValueError("nothing to evaluate: give --edits, --capability or both")
        if args.limit is not None and not args.capability:
            raise ValueError("--limit needs --capability (it limits the benchmark documents)")
        if args.text and not args.edits:
            raise ValueError("--text needs --edits")
        tasks = capability.check(args.capability, args.limit, args.capability_data) if args.capability else []
        margs = read_args(args.ckpt)
        tok = Tokenizer(args.ckpt, margs)
        edits = load_edits(args.edits, n=args.n, seed=args.seed) if args.edits else None
        if edits:
            check_context(tok, edits, args.edits, margs.max_position_embeddings, args.max_new_tokens)
        text = None
        if args.text:
            try:
                text = Path(args.text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"--text {args.text}: cannot read ({e})") from None
            if len(text.split()) < 2:
                raise ValueError(f"--text {args.text}: the text is shorter than two words")
        if args.delta:
            delta.check(args.delta, parameter_shapes(margs))
        n_params = sum(math.prod(s) for s in parameter_shapes(margs).values())
        model, tok = load(args.ckpt, device=args.device, dtype=evaluation_dtype(args.dtype, margs, args.device, n_params))
        # the base's capability results (and replay states) from earlier runs, if asked and kept
        cache = BaseCache(args.capability_cache, model) if args.capability_cache and tasks else None
        base = edited = None
        if args.delta:
            base = delta.apply(model, args.delta)
            params = dict(model.named_parameters())
            edited = {n: params[n].detach().clone() for n in base}
        report = {"settings": {}}
        if edits is not None:
            report = before_after(model, tok, edits, base, edited, text=text, batch_size=args.batch_size,
                                  max_new_tokens=args.max_new_tokens)
        if tasks:
            report["capability"] = capability.before_after(model, tok, tasks, base, edited, args.limit,
                                                           data_dir=args.capability_data, base_cache=cache)
    except (EditFileError, CheckpointError, ValueError, OSError) as e:  # DeltaError, CapabilityError: ValueErrors
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evaluate.py: interrupted; no report was written", file=sys.stderr)
        return 130
    report["settings"].update(ckpt=str(args.ckpt), delta=args.delta, edits_file=args.edits and str(args.edits),
                              n=args.n, seed=args.seed)
    print_report(report)
    if args.out:
        write_report(report, args.out)
        print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
