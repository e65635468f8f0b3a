"""Capability: what the model can still do after an edit, measured as lm-evaluation-harness does.

The paper judges harm by the edited model's accuracy on MMLU, Natural Questions, SST-2, GSM8K
(and WMT16, which is not available offline) through lm-evaluation-harness. Each task here builds
the same prompts, asks the model the same questions and scores the answers the same way as
lm-eval 0.4.13's task of that name (see `lm_eval_adapter.py` and its test, which run the real
lm-eval on the same documents and compare item by item). A task asks for one of two things:

    log-likelihood   log P(continuation | context), and whether greedy decoding would produce
                     the continuation; multiple choice takes the argmax over the choices
                     (acc) and over log-likelihood per character of the choice (acc_norm)
    generation       greedy decoding until a stop string, then lm-eval's answer extraction
                     and exact match

Tokens exactly as lm-eval's Hugging Face model makes them: context and continuation are encoded
together and split where the context's own encoding ends; special tokens (BOS) as the
checkpoint's tokenizer adds them by default (lm-eval 0.4.13 with `add_bos_token` unset).

Data: `data/capability/<task>.jsonl`, made by `make capability` (data/capability/convert.py).
"""
from __future__ import annotations

import json
import re
import string
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from generate import greedy, left_pad

LM_EVAL = "0.4.13"  # the lm-evaluation-harness release whose task configs these follow
DATA_DIR = Path(__file__).resolve().parent / "data" / "capability"
MAX_GEN_TOKS = 256  # lm-eval's default for generation tasks that do not set one


class CapabilityError(ValueError):
    """Bad --capability / --limit input or a missing data file; the message is one line."""


# ----------------------------------------------------------------------------------------------
# What a task asks of the model


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation, the whole text
    is encoded once and the continuation is what follows the context's own encoding."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def score_tokens(model, tok, requests: list[tuple[list[int], list[int]]], batch_size: int = 32):
    """(log P(cont | ctx), whether every cont token is the argmax) for each (ctx ids, cont ids).

    The model reads ctx + cont[:-1]. Requests whose rows are the same token sequence share one
    forward: the choices of a multiple-choice question that are one token each (MMLU's " A"..
    " D", SST-2's " negative"/" positive") are all read off the context's last position.
    """
    rows: dict[tuple, int] = {}
    want = []  # per request: (row, position of its first predicted token, cont)
    for ctx, cont in requests:
        seq = tuple(ctx + cont[:-1])
        want.append((rows.setdefault(seq, len(rows)), len(seq) - len(cont), cont))
    seqs = list(rows)
    users = defaultdict(list)
    for i, (r, _, cont) in enumerate(want):
        if cont:
            users[r].append(i)
    out = [(0.0, True)] * len(requests)  # an empty continuation: log 1, trivially greedy
    dev = model.device  # the embedding's: inputs go there
    order = sorted(users, key=lambda r: (len(seqs[r]), seqs[r]))  # little padding, deterministic
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        ids, mask = left_pad(tok, [list(seqs[r]) for r in batch])
        T = ids.shape[1]
        first = {r: min(want[i][1] for i in users[r]) for r in batch}
        # only the positions that predict a cont token, as flat (B*T) indices
        at = [b * T + t for b, r in enumerate(batch) for t in range(T - len(seqs[r]) + first[r], T)]
        logits = model(ids.to(dev, non_blocking=True), attention_mask=mask.to(dev, non_blocking=True),
                       logits_at=torch.tensor(at)).float()  # (N, V)
        # every request's rows and tokens, gathered at once: one transfer to the host per batch
        k, target, start = [], [], 0
        for r in batch:
            for i in users[r]:
                _, pos, cont = want[i]
                k += range(start + pos - first[r], start + pos - first[r] + len(cont))
                target += cont
            start += len(seqs[r]) - first[r]
        k, target = (torch.tensor(x).to(logits.device, non_blocking=True) for x in (k, target))
        logp, hit = torch.stack([logits[k, target] - torch.logsumexp(logits[k], -1),
                                 (logits[k].argmax(-1) == target).float()]).cpu()
        n = 0
        for r in batch:
            for i in users[r]:
                cont = want[i][2]
                out[i] = (logp[n:n + len(cont)].sum().item(), bool(hit[n:n + len(cont)].all()))
                n += len(cont)
    return out


def loglikelihoods(model, tok, pairs: list[tuple[str, str]], batch_size: int = 32):
    """lm-eval's `loglikelihood` request: (log P(continuation | context), is_greedy) per pair."""
    return score_tokens(model, tok, [encode_pair(tok, c, x) for c, x in pairs], batch_size)


def cut_at(text: str, until) -> str:
    """lm-eval's cut: the text before the first stop string, not stripped."""
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


def generate_until(model, tok, contexts: list[str], until, max_gen_toks: int = MAX_GEN_TOKS, batch_size: int = 16):
    """lm-eval's `generate_until` request, greedy: each context's continuation before its stop."""
    new = greedy(model, tok, contexts, max_gen_toks, tuple(until), batch_size)
    return [cut_at(tok.decode(ids), until) for ids in new]


# ----------------------------------------------------------------------------------------------
# Answer extraction and matching, as lm-eval's filters and its exact_match metric


def regex_filter(text: str, pattern: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval's "regex" filter: the `group_select`-th match (a tuple: its first non-empty group)."""
    found = re.findall(pattern, text)
    if not found:
        return fallback
    m = found[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), fallback)
    return m.strip()


def exact_match(prediction: str, reference: str, regexes_to_ignore=(), ignore_case=False,
                ignore_punctuation=False) -> bool:
    """lm-eval's exact_match: delete each regex's matches from both, then case and ASCII
    punctuation; no other normalisation (spaces count)."""
    p, r = prediction, reference
    for rx in regexes_to_ignore:
        p, r = re.sub(rx, "", p), re.sub(rx, "", r)
    if ignore_case:
        p, r = p.lower(), r.lower()
    if ignore_punctuation:
        table = str.maketrans("", "", string.punctuation)
        p, r = p.translate(table), r.translate(table)
    return p == r


# ----------------------------------------------------------------------------------------------
# The tasks. Each turns a document (a line of its JSONL file) into lm-eval's request.


@dataclass
class Choice:
    """A multiple-choice document: one context and a continuation per choice, or (WinoGrande)
    a context per choice and one shared continuation."""
    contexts: list[str]
    continuations: list[str]
    choices: list[str]  # acc_norm divides each log-likelihood by its choice's length in characters
    gold: int

    def pairs(self):
        if len(self.contexts) == 1:
            return [(self.contexts[0], c) for c in self.continuations]
        return [(c, self.continuations[0]) for c in self.contexts]


def choice(context: str, choices: list[str], gold: int, delimiter: str = " ") -> Choice:
    return Choice([context], [delimiter + c for c in choices], choices, gold)


def mmlu(doc) -> Choice:  # lm-eval mmlu_<subject> (default template), 0-shot
    subject = doc["subject"].replace("_", " ")
    text = (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            f"{doc['question'].strip()}\n" + "".join(f"{l}. {c}\n" for l, c in zip("ABCD", doc["choices"]))
            + "Answer:")
    return choice(text, ["A", "B", "C", "D"], doc["answer"])


def sst2(doc) -> Choice:
    return choice(f"{doc['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                  ["negative", "positive"], doc["label"])


def boolq(doc) -> Choice:
    return choice(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], doc["label"])


def arc(doc) -> Choice:
    return choice(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"],
                  doc["choices"]["label"].index(doc["answerKey"]))


def piqa(doc) -> Choice:
    return choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])


def _hellaswag_clean(text: str) -> str:  # WikiHow artefacts, as lm-eval's hellaswag/utils.py
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def hellaswag(doc) -> Choice:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return choice(_hellaswag_clean(doc["activity_label"] + ": " + ctx),
                  [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def winogrande(doc) -> Choice:
    """Partial scoring: the sentence up to the blank, filled with each option, is the context;
    the rest of the sentence is the continuation scored under each."""
    blank = doc["sentence"].index("_")
    contexts = [doc["sentence"][:blank] + o for o in (doc["option1"], doc["option2"])]
    return Choice(contexts, [" " + doc["sentence"][blank + 1:].strip()], contexts, {"1": 0, "2": 1}[doc["answer"]])


def lambada(doc) -> tuple[str, str]:  # lm-eval lambada_openai: is the last word the greedy continuation
    words = doc["text"].split(" ")
    return " ".join(words[:-1]), " " + words[-1]


NQ_ARTICLES = r"\b(?:The |the |An |A |The |a |an )"


def nq(doc) -> str:  # lm-eval nq_open, 0-shot
    return f"Answer these questions:\n\nQ: {doc['question']}?\nA:"


def nq_score(text: str, doc) -> dict:
    answer = text.strip()  # the remove_whitespace filter
    hit = any(exact_match(answer, a, [NQ_ARTICLES], ignore_case=True, ignore_punctuation=True) for a in doc["answer"])
    return {"answers": {"remove_whitespace": answer}, "exact_match,remove_whitespace": float(hit)}


# gsm8k_cot's eight fixed chain-of-thought exemplars (Wei et al.), as its YAML lists them
GSM8K_SHOTS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]
GSM8K_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def gsm8k(doc) -> str:  # lm-eval gsm8k_cot: 8-shot, "Q: ...\nA:"
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in GSM8K_SHOTS)
    return shots + f"Q: {doc['question']}\nA:"


def gsm8k_score(text: str, doc) -> dict:
    gold = doc["answer"].split("####")[-1].strip()
    answers = {"strict-match": regex_filter(text, r"The answer is (\-?[0-9\.\,]+)."),
               "flexible-extract": regex_filter(text, r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)}
    return {"answers": answers, **{f"exact_match,{f}": float(exact_match(a, gold, GSM8K_IGNORE, ignore_case=True))
                                   for f, a in answers.items()}}


@dataclass(frozen=True)
class Task:
    name: str  # ours, and the data file's: data/capability/<name>.jsonl
    lm_eval: str  # lm-eval's task of the same prompts and scoring
    version: str  # that task's metadata version in lm-eval 0.4.13
    request: Callable  # doc -> Choice | (context, continuation) | generation prompt
    metrics: tuple[str, ...]  # lm-eval's result keys (",none" left out)
    primary: str  # the one that enters the averages
    until: tuple[str, ...] = ()  # generation: stop strings
    score: Callable | None = None  # generation: (text, doc) -> {"answers": ..., metric: 0/1}
    split: str = ""  # the data set and split lm-eval scores


TASKS = {t.name: t for t in [
    Task("mmlu", "mmlu", "1.0 (group 2)", mmlu, ("acc",), "acc", split="cais/mmlu test"),
    Task("sst2", "sst2", "1.0", sst2, ("acc",), "acc", split="glue sst2 validation"),
    Task("nq", "nq_open", "4.0", nq, ("exact_match,remove_whitespace",), "exact_match,remove_whitespace",
         until=("\n", ".", ","), score=nq_score, split="nq_open validation"),
    Task("gsm8k", "gsm8k_cot", "3.0", gsm8k, ("exact_match,strict-match", "exact_match,flexible-extract"),
         "exact_match,strict-match", until=("Q:", "</s>", "<|im_end|>"), score=gsm8k_score, split="gsm8k main test"),
    Task("arc_easy", "arc_easy", "1.0", arc, ("acc", "acc_norm"), "acc_norm", split="ai2_arc ARC-Easy test"),
    Task("arc_challenge", "arc_challenge", "1.0", arc, ("acc", "acc_norm"), "acc_norm",
         split="ai2_arc ARC-Challenge test"),
    Task("hellaswag", "hellaswag", "1.0", hellaswag, ("acc", "acc_norm"), "acc_norm", split="hellaswag validation"),
    Task("piqa", "piqa", "1.0", piqa, ("acc", "acc_norm"), "acc_norm", split="piqa validation"),
    Task("winogrande", "winogrande", "1.0", winogrande, ("acc",), "acc", split="winogrande_xl validation"),
    Task("boolq", "boolq", "2.0", boolq, ("acc",), "acc", split="super_glue boolq validation"),
    Task("lambada", "lambada_openai", "1.0", lambada, ("acc",), "acc", split="lambada_openai test"),
]}
SETS = {
    "paper": ["mmlu", "nq", "sst2", "gsm8k"],  # the paper's Capability (less WMT16, not available offline)
    "small": ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada"],
}
SETS["all"] = SETS["paper"] + SETS["small"]


def resolve(spec: str) -> list[str]:
    """"paper", "small", "all" or task names, comma-separated, in order, each once."""
    names = []
    for part in (p.strip() for p in spec.split(",")):
        if part in SETS:
            names += SETS[part]
        elif part in TASKS:
            names.append(part)
        else:
            raise CapabilityError(f"--capability: unknown task {part!r}; known tasks: {', '.join(TASKS)}; "
                                  f"sets: {', '.join(SETS)}")
    return list(dict.fromkeys(names))


def check(spec: str, limit: int | None, data_dir: Path = DATA_DIR) -> list[str]:
    """The task names of a --capability value, once --limit and every data file are known good."""
    names = resolve(spec)
    if limit is not None and limit < 1:
        raise CapabilityError(f"--limit must be at least 1, got {limit}")
    for n in names:
        if not (Path(data_dir) / f"{n}.jsonl").is_file():
            load_docs(n, limit, data_dir)  # raises the missing-file message
    return names


def load_docs(name: str, limit: int | None = None, data_dir: Path = DATA_DIR) -> list[dict]:
    """The task's documents; with `limit`, the first `limit` (MMLU: of each subject), as lm-eval's --limit."""
    if limit is not None and limit < 1:
        raise CapabilityError(f"--limit must be at least 1, got {limit}")
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise CapabilityError(f"{path}: missing; make the capability data with: make capability "
                              f"(or python data/capability/convert.py {name})")
    try:
        with open(path, encoding="utf-8") as f:
            docs = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CapabilityError(f"{path}: unreadable ({e}); delete it and run make capability again") from None
    if not docs:
        raise CapabilityError(f"{path}: no documents; delete it and run make capability again")
    if limit is None:
        return docs
    if name != "mmlu":
        return docs[:limit]
    seen = defaultdict(int)
    keep = []
    for d in docs:  # lm-eval's mmlu is a group of 57 subject tasks: --limit applies to each
        seen[d["subject"]] += 1
        if seen[d["subject"]] <= limit:
            keep.append(d)
    return keep


# ----------------------------------------------------------------------------------------------
# Running a task


def run(model, tok, task: Task, docs: list[dict], batch_size: int = 32, gen_batch_size: int = 16) -> dict:
    """Per-document results: each metric as a list of 0/1 scores, and what the model answered
    (the chosen index for multiple choice, the extracted answers for generation)."""
    req = [task.request(d) for d in docs]
    if task.score is not None:  # generation
        texts = generate_until(model, tok, req, task.until, MAX_GEN_TOKS, gen_batch_size)
        scored = [task.score(t, d) for t, d in zip(texts, docs)]
        return {"output": texts, "answers": [s["answers"] for s in scored],
                **{m: [s[m] for s in scored] for m in task.metrics}}
    if isinstance(req[0], tuple):  # a single continuation: is it the greedy one
        greedy_hit = [g for _, g in loglikelihoods(model, tok, req, batch_size)]
        return {"acc": [float(g) for g in greedy_hit], "answers": greedy_hit}
    pairs = [p for c in req for p in c.pairs()]
    lls = iter(loglikelihoods(model, tok, pairs, batch_size))
    out = defaultdict(list)
    for c in req:
        ll = np.array([next(lls)[0] for _ in c.choices])
        pred = int(np.argmax(ll))  # ties: the first, as numpy's argmax in lm-eval
        pred_norm = int(np.argmax(ll / np.array([float(len(x)) for x in c.choices])))
        out["answers"].append(pred)
        out["acc"].append(float(pred == c.gold))
        out["acc_norm"].append(float(pred_norm == c.gold))
    return {k: v for k, v in out.items() if k in task.metrics or k == "answers"}


def baselines(task: Task, docs: list[dict]) -> dict:
    """What guessing scores on these documents: uniform over the choices (chance), and always
    the most frequent gold index (majority)."""
    req = [task.request(d) for d in docs]
    if not isinstance(req[0], Choice):
        return {"chance": 0.0}
    golds = [c.gold for c in req]
    return {"chance": float(np.mean([1 / len(c.choices) for c in req])),
            "majority": max(golds.count(g) for g in set(golds)) / len(golds)}


# ----------------------------------------------------------------------------------------------
# Base against edited: paired differences


BOOTSTRAP = 10_000


def paired_change(base: list[float], edited: list[float], rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """Mean of edited - base over the same items, and BOOTSTRAP resampled means of it. Scores
    are 0/1, so a per-item difference is -1, 0 or +1 and resampling n items with replacement is
    one multinomial draw of how many of each: exact, and cheap for 14,042 MMLU items."""
    d = np.asarray(edited, dtype=float) - np.asarray(base, dtype=float)
    n = len(d)
    p = [np.mean(d == 1), np.mean(d == -1)]
    counts = rng.multinomial(n, [p[0], p[1], max(0.0, 1 - p[0] - p[1])], size=BOOTSTRAP)
    return float(d.mean()), (counts[:, 0] - counts[:, 1]) / n


def interval(draws: np.ndarray) -> list[float]:
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return [float(lo), float(hi)]


def verdict(ci: list[float]) -> str:
    return "no measurable change" if ci[0] <= 0 <= ci[1] else ("better" if ci[0] > 0 else "worse")


def before_after(model, tok, names: list[str], base: dict | None, edited: dict | None, limit: int | None = None,
                 batch_size: int = 32, gen_batch_size: int = 16, data_dir: Path = DATA_DIR, say=print,
                 seed: int = 0, base_cache: dict | None = None) -> dict:
    """Every task on the base weights, then on the edited ones, one model in memory (as
    evaluate.before_after: `base`/`edited` map parameter names to tensors; `base=None` means
    the current weights are the base; `edited=None`: base only). The model is left holding
    `edited` when given. `base_cache`, a dict kept by the caller, keeps the base model's results
    between calls that share the base and `limit` (several edits of one model, as in experiments/)."""
    docs = {n: load_docs(n, limit, data_dir) for n in names}
    if base is None and edited is not None:
        params = dict(model.named_parameters())
        base = {n: params[n].detach().clone() for n in edited}
    runs, seconds = {}, defaultdict(dict)
    for label, weights in (("base", base), ("edited", edited)):
        if label == "edited" and edited is None:
            break
        if weights:
            model.load_tensors(weights)
        runs[label] = {}
        for n in names:
            t0 = time.time()
            if label == "base" and base_cache is not None and (n, limit) in base_cache:
                runs[label][n] = base_cache[n, limit]
            else:
                runs[label][n] = run(model, tok, TASKS[n], docs[n], batch_size, gen_batch_size)
            if label == "base" and base_cache is not None:
                base_cache[n, limit] = runs[label][n]
            seconds[n][label] = round(time.time() - t0, 2)
            p = TASKS[n].primary
            say(f"capability {label} {n}: {p} {np.mean(runs[label][n][p]):.3f} (n={len(docs[n])}, "
                f"{seconds[n][label]:.1f}s)")
    rng = np.random.default_rng(seed)
    tasks, draws = {}, {}
    for n in names:
        t = TASKS[n]
        row = {"lm_eval_task": t.lm_eval, "lm_eval_version": t.version, "data": t.split, "n": len(docs[n]),
               **baselines(t, docs[n]), "primary": t.primary, "seconds": seconds[n], "metrics": {}}
        for m in t.metrics:
            cell = {label: float(np.mean(r[n][m])) for label, r in runs.items()}
            if "edited" in runs:
                cell["change"], d = paired_change(runs["base"][n][m], runs["edited"][n][m], rng)
                cell["ci95"] = interval(d)
                cell["verdict"] = verdict(cell["ci95"])
                if m == t.primary:
                    draws[n] = d
            row["metrics"][m] = cell
        tasks[n] = row
    report = {"tasks": tasks, "averages": {}, "settings": {
        "lm_eval": LM_EVAL, "limit": limit, "limit_means": "the first N documents of each task (MMLU: of each subject)",
        "interval": f"paired bootstrap over items, {BOOTSTRAP} resamples, seed {seed}, 95% percentile",
        "batch_size": batch_size, "gen_batch_size": gen_batch_size, "max_gen_toks": MAX_GEN_TOKS}}
    for set_name, members in SETS.items():
        members = [n for n in members if n in tasks]
        if set_name == "all" or len(members) < 2:
            continue
        avg = {label: float(np.mean([tasks[n]["metrics"][TASKS[n].primary][label] for n in members]))
               for label in runs}
        if "edited" in runs:  # tasks resampled independently; the average's change is the mean of theirs
            avg["change"] = avg["edited"] - avg["base"]
            avg["ci95"] = interval(np.mean([draws[n] for n in members], axis=0))
            avg["verdict"] = verdict(avg["ci95"])
        name = "Cap" if set_name == "paper" else set_name
        report["averages"][name] = {"tasks": members, "complete": members == SETS[set_name], **avg}
    return report


def format_table(report: dict) -> str:
    """The capability part of the report as a person reads it."""
    edited = any("edited" in m for t in report["tasks"].values() for m in t["metrics"].values())
    lim = report["settings"]["limit"]
    lines = [f"capability (lm-eval {LM_EVAL} tasks; {'all documents' if lim is None else f'--limit {lim}'})",
             f"{'task':<15}{'metric':<30}{'n':>6}{'chance':>8}{'base':>8}"
             + (f"{'edited':>8}  change [95% CI]" if edited else "")]

    def cells(c):
        if not edited:
            return f"{c['base']:>8.3f}"
        return (f"{c['base']:>8.3f}{c['edited']:>8.3f}  {c['change']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"
                f"  {c['verdict']}")

    for name, t in report["tasks"].items():
        for m, c in t["metrics"].items():
            lines.append(f"{name:<15}{m:<30}{t['n']:>6}{t['chance']:>8.3f}{cells(c)}")
    for name, a in report["averages"].items():
        partial = "" if a["complete"] else ", partial set"
        lines.append(f"{name:<15}{'mean of primary metrics':<30}{'':>6}{'':>8}{cells(a)}")
        lines.append(f"{'':<15}({', '.join(a['tasks'])}{partial})")
    return "\n".join(lines)
