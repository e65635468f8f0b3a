"""Capability scoring: capability.py against lm-evaluation-harness's own Hugging Face backend.

    python bench/capability_speed.py [--ckpt weights/smollm2-135m] [--tasks arc_easy,piqa,lambada,mmlu,gsm8k]
                                     [--limit 40] [--gsm8k-limit 8] [--threads T]

Both sides score the same documents, the first --limit of each task's data/capability file (MMLU:
of each of its 57 subjects; GSM8K: --gsm8k-limit), in one process, task by task, ours then
lm-eval's, so that both meet the same load on a shared machine:

- ours: `capability.run` on `model.load`'s fp32 model (shared prefixes read once);
- lm-eval 0.4.13: `lm_eval.evaluator.evaluate` with `lm_eval.models.huggingface.HFLM` on the same
  checkpoint directory (transformers, float32, the same batch size), each task its own YAML
  configuration with only the data source pointed at the same documents
  (`lm_eval_adapter.local_tasks`; nothing is downloaded).

With `--delta DIR/delta.safetensors` (written by edit.py) both sides measure what a harm figure
costs, the base model and the edited one on each task: lm-eval evaluates twice (the delta's tensors
copied into its model in between); capability.py keeps the hidden states entering the edited
layer in the base pass and starts the edited pass there (replay.py), as `capability.before_after`
does; generation tasks run the whole model both times. Items are compared for both weight sets.
A line before the last gives the edited weights' share alone: what the next edit of the same
model costs when the base side is kept (`evaluate.py --capability-cache`; lm-eval has its own
request cache for an unchanged model).

Seconds are scoring alone: loading the models and lm-eval's task set-up are left out. An item
differs when any of its task's metrics (acc, acc_norm, exact match per filter) differs between
the two; the largest log-likelihood difference is shown too (two implementations of the same
fp32 model). The last line is the total. A script, not a test.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import capability as C  # noqa: E402
import delta as D  # noqa: E402
from lm_eval_adapter import evaluate_local, local_tasks  # noqa: E402
from model import load  # noqa: E402
from replay import Replay, first_layer  # noqa: E402


def lm_eval_docs(name: str, docs: list[dict]) -> dict[str, list[dict]]:
    """lm-eval's task names for our documents: MMLU is one task per subject."""
    if name != "mmlu":
        return {C.TASKS[name].lm_eval: docs}
    by_subject: dict[str, list[dict]] = {}
    for d in docs:
        by_subject.setdefault(f"mmlu_{d['subject']}", []).append(d)
    return by_subject


def compare(task: C.Task, docs: list[dict], ours: dict, samples_by_task: dict, order: dict) -> tuple[int, float]:
    """(documents whose scores differ, largest |log-likelihood difference|)."""
    differ, worst = set(), 0.0
    for lm_task, samples in samples_by_task.items():
        for s in samples:
            i = order[lm_task][int(s["doc_id"])]  # our index of that document
            # lm-eval's sample holds each metric by name; a generation task's, once per filter
            pairs = ([("exact_match", f"exact_match,{s['filter']}")] if task.score is not None
                     else [(m, m) for m in task.metrics])
            if any(float(s[theirs]) != float(ours[m][i]) for theirs, m in pairs):
                differ.add(i)
            if task.score is None:
                lls = ours["loglikelihoods"][i]
                lls = lls if isinstance(lls, list) else [lls]
                worst = max([worst] + [abs(float(r[0]) - x) for r, x in zip(s["filtered_resps"], lls)])
    return len(differ), worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=str(ROOT / "weights" / "smollm2-135m"))
    ap.add_argument("--tasks", default="arc_easy,piqa,lambada,mmlu,gsm8k")
    ap.add_argument("--limit", type=int, default=40, help="documents per task (MMLU: per subject, default 1)")
    ap.add_argument("--mmlu-limit", type=int, default=1)
    ap.add_argument("--gsm8k-limit", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data", default=str(C.DATA_DIR))
    ap.add_argument("--delta", help="score the base model and this edit of it (the cost of a harm figure)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = C.resolve(args.tasks)
    limits = {"mmlu": args.mmlu_limit, "gsm8k": args.gsm8k_limit}
    docs = {n: C.load_docs(n, limits.get(n, args.limit), args.data) for n in names}
    model, tok = load(args.ckpt, dtype=torch.float32)
    hf = HFLM(pretrained=args.ckpt, device="cpu", dtype="float32", batch_size=args.batch_size)
    tm = TaskManager()
    print(f"{args.ckpt}: torch {torch.__version__}, {torch.get_num_threads()} threads, lm-eval {lm_eval.__version__}, "
          f"batch {args.batch_size}", flush=True)
    edited = D.tensors(args.delta) if args.delta else None
    if edited:
        D.check(args.delta, {n: tuple(p.shape) for n, p in model.named_parameters()})
        base = {n: p.detach().clone() for n, p in model.named_parameters() if n in edited}
        L = first_layer(edited, model.args.n_layers)
        hf_params = dict(hf.model.named_parameters())
        print(f"base and edited ({args.delta}): the edit begins at layer {L} of {model.args.n_layers}", flush=True)
    total, edited_only = {"ours": 0.0, "lm-eval": 0.0}, {"ours": 0.0, "lm-eval": 0.0}
    n_differ = n_items = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            task = C.TASKS[name]
            groups = lm_eval_docs(name, docs[name])
            index = {id(d): i for i, d in enumerate(docs[name])}  # lm-eval's (task, doc_id) -> our index
            order = {t: [index[id(d)] for d in ds] for t, ds in groups.items()}
            loaded = local_tasks(tm, groups, tmp)
            t0 = time.perf_counter()
            if edited is None:
                ours = [C.run(model, tok, task, docs[name], args.batch_size)]
            else:
                fast = Replay(model, L).record() if task.score is None else model
                ours = [C.run(fast, tok, task, docs[name], args.batch_size)]
                t1 = time.perf_counter()
                model.load_tensors(edited)
                ours.append(C.run(fast.replay() if task.score is None else model, tok, task, docs[name],
                                  args.batch_size))
                edited_only["ours"] += time.perf_counter() - t1
                model.load_tensors(base)
            t_ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            outs = [evaluate_local(hf, loaded)]
            if edited is not None:
                with torch.no_grad():
                    t1 = time.perf_counter()
                    for n, t in edited.items():
                        hf_params[n].copy_(t)
                    outs.append(evaluate_local(hf, loaded))
                    edited_only["lm-eval"] += time.perf_counter() - t1
                    for n, t in base.items():
                        hf_params[n].copy_(t)
            t_lm = time.perf_counter() - t0
            differ, worst = 0, 0.0
            for o, out in zip(ours, outs):
                d, w = compare(task, docs[name], o, {t: s for t, (_, s) in out.items()}, order)
                differ, worst = differ + d, max(worst, w)
            total["ours"] += t_ours
            total["lm-eval"] += t_lm
            n_differ += differ
            n_items += len(docs[name]) * len(ours)
            print(f"{name:<12} n={len(docs[name]):<5} capability.py {t_ours:7.1f} s   lm-eval {t_lm:7.1f} s   "
                  f"{t_lm / t_ours:5.2f}x   items that differ {differ}   max |d loglik| {worst:.1e}", flush=True)
    print(f"{n_items} items in all")
    if edited is not None:  # the next edit of the same model: the base side kept (BaseCache; lm-eval's own cache)
        print(f"the edited weights alone: capability.py {edited_only['ours']:.1f} s, lm-eval {edited_only['lm-eval']:.1f} s, "
              f"ratio {edited_only['lm-eval'] / edited_only['ours']:.2f}x")
    print(f"capability.py {total['ours']:.1f} s, lm-eval {total['lm-eval']:.1f} s, "
          f"ratio {total['lm-eval'] / total['ours']:.2f}x, items that differ {n_differ}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
