"""Run any lm-evaluation-harness task on this project's model, edited or not.

    pip install lm_eval==0.4.13
    python lm_eval_adapter.py --ckpt weights/smollm2-135m --delta out/run/delta.safetensors \\
        --tasks arc_easy,hellaswag --limit 100

or from Python:

    import lm_eval
    from lm_eval_adapter import ProjectLM
    lm = ProjectLM("weights/smollm2-135m", delta="out/run/delta.safetensors")
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], limit=100)

`ProjectLM` is lm-eval's `LM` interface over `model.load` (plus a delta): log-likelihoods and
greedy generation go through `capability.py`, so they are the ones `evaluate.py --capability`
computes, tokenised as lm-eval's Hugging Face model tokenises. lm-eval fetches each task's data
set from the Hugging Face hub unless it is cached; offline, point a task at local files
(`dataset_path: json`), as tests/test_capability.py does. Greedy decoding only (do_sample
false); no chat templates. lm_eval is imported here and in the tests only, never by the library.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

from lm_eval import utils as lm_utils
from lm_eval.api.model import LM

import capability
import delta as delta_lib
from model import load


class ProjectLM(LM):
    def __init__(self, ckpt=None, delta=None, model=None, tokenizer=None, device="cpu", dtype=None,
                 batch_size: int = 32, gen_batch_size: int = 16):
        """Either a checkpoint directory (and optionally a delta file to apply), or a loaded
        (model, tokenizer) pair from `model.load`, used as it is."""
        super().__init__()
        if model is None:
            model, tokenizer = load(ckpt, device=device, dtype=dtype)
            if delta:
                delta_lib.apply(model, delta)
        self.model, self.tok = model, tokenizer
        self.batch_size, self.gen_batch_size = batch_size, gen_batch_size

    @property
    def prefix_token_id(self) -> int:  # what lm-eval conditions on when a context is empty
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.model.args.max_position_embeddings

    def _pair(self, context: str, continuation: str):
        if context:
            return capability.encode_pair(self.tok, context, continuation)
        cont = self.tok.encode(continuation, add_special_tokens=False)
        return (cont[:1], cont[1:]) if cont and cont[0] == self.prefix_token_id else ([self.prefix_token_id], cont)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*r.args[:2]) for r in requests]
        return capability.score_tokens(self.model, self.tok, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole text's log-likelihood, in disjoint windows of the model's context length."""
        windows, owner = [], []
        for i, r in enumerate(requests):
            for w in lm_utils.get_rolling_token_windows(token_list=self.tok.encode(r.args[0]),
                                                        prefix_token=self.prefix_token_id,
                                                        max_seq_len=self.max_length, context_len=1):
                windows.append(lm_utils.make_disjoint_window(w))
                owner.append(i)
        total = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, capability.score_tokens(self.model, self.tok, windows, self.batch_size)):
            total[i] += ll
        return total

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = defaultdict(list)  # requests with the same generation settings decode together
        for i, r in enumerate(requests):
            context, kwargs = r.args[:2]
            kwargs = dict(kwargs or {})
            if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                raise ValueError("ProjectLM decodes greedily only (do_sample false, temperature 0)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_gen = kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or capability.MAX_GEN_TOKS
            groups[(tuple(until), int(max_gen))].append((i, context))
        out = [""] * len(requests)
        for (until, max_gen), items in groups.items():
            texts = capability.generate_until(self.model, self.tok, [c for _, c in items], until, max_gen,
                                              self.gen_batch_size)
            for (i, _), t in zip(items, texts):
                out[i] = t
        return out


def local_tasks(tm, docs_by_task: dict[str, list[dict]], tmp_dir) -> dict:
    """lm-eval tasks (by their lm-eval names, from TaskManager `tm`) with only the data source
    replaced: each reads a local JSONL file of the given documents for every split it uses, so
    lm-eval prompts, scores and filters them exactly as its own configuration says, offline.
    The task setup is simple_evaluate's (num_fewshot the task's default, else 0; fewshot seed
    1234); its call is skipped because it surveys the whole environment on every run."""
    from pathlib import Path

    from lm_eval.tasks._yaml_loader import load_yaml

    configs = []
    for name, docs in docs_by_task.items():
        data = Path(tmp_dir) / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        config = load_yaml(tm.task_index[name].yaml_path, resolve_func=True)
        splits = {config.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")} - {None}
        config.update(task=name, dataset_path="json", dataset_name=None, dataset_kwargs={
            "data_files": {s: str(data) for s in splits}, "cache_dir": str(Path(tmp_dir) / "hf-datasets")})
        configs.append(config)
    loaded = tm.load(configs)
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=1234)
    return loaded


def evaluate_local(lm, loaded) -> dict:
    """lm-eval's evaluation loop on tasks from `local_tasks`: per task its config and its
    per-document samples, by document then filter."""
    from lm_eval.evaluator import evaluate

    out = evaluate(lm=lm, task_dict=loaded, log_samples=True, bootstrap_iters=0)
    return {name: (out["configs"][name], sorted(samples, key=lambda s: (s["doc_id"], s["filter"])))
            for name, samples in out["samples"].items()}


def main(argv=None) -> int:
    import lm_eval

    ap = argparse.ArgumentParser(description="lm-evaluation-harness tasks on a checkpoint, optionally edited")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--delta", help="delta.safetensors written by edit.py")
    ap.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--num-fewshot", type=int)
    args = ap.parse_args(argv)
    lm = ProjectLM(args.ckpt, delta=args.delta)
    results = lm_eval.simple_evaluate(model=lm, tasks=args.tasks.split(","), limit=args.limit,
                                      num_fewshot=args.num_fewshot)
    print(lm_eval.utils.make_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
