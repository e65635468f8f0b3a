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

What several requests share is read once, with the same numbers up to fp rounding: the
choices of a question continue one context (`score_shared`: the context's KV cache, then each
choice's own tokens), and few-shot prompts begin with the same examples (`greedy` with
`share_prefix`). A held-out text (TEXTS) is a third kind of task: no answers, just how far the
edited model's next-token distribution moved on it (`drift`: KL(base || edited), perplexity).

The sets: `paper` (the paper's), `small`, `harm` (sized to see a loss of 1-2 points on the
default models, see docs/capability.md), `all`. Data: `data/capability/<task>.jsonl`, made by
`make capability` (data/capability/convert.py).
"""
from __future__ import annotations

import hashlib
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
import torch.nn.functional as F

from data import collate
from generate import common_prefix, greedy, left_pad
from replay import Replay, first_layer

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


def read_scores(logits: torch.Tensor, rows: list[tuple[int, list]], out) -> None:
    """Set `out[key]` = (log P(cont | ctx), every cont token the argmax) from `logits` (N, V),
    which hold each row's positions from `first` to its end, row after row; a row is (first, its
    requests as (key, position of the request's first predicted token, cont)). Every request's
    tokens are gathered at once: one transfer to the host per batch."""
    k, target, keys, start = [], [], [], 0
    for first, users in rows:
        for i, pos, cont in users:
            k += range(start + pos - first, start + pos - first + len(cont))
            target += cont
            keys.append((i, len(cont)))
        start += max(pos - first + len(cont) for _, pos, cont in users)
    k, target = (torch.tensor(x).to(logits.device, non_blocking=True) for x in (k, target))
    picked = logits[k].float()
    logp, hit = torch.stack([picked.gather(1, target[:, None])[:, 0] - torch.logsumexp(picked, -1),
                             (picked.argmax(-1) == target).float()]).cpu()
    n = 0
    for i, m in keys:
        out[i] = (logp[n:n + m].sum().item(), bool(hit[n:n + m].all()))
        n += m


@torch.inference_mode()
def score_tokens(model, tok, requests: list[tuple[list[int], list[int]]], batch_size: int = 32):
    """(log P(cont | ctx), whether every cont token is the argmax) for each (ctx ids, cont ids).

    The model reads ctx + cont[:-1], one row per request, left-padded batches of rows sorted by
    length. Requests whose rows are the same token sequence share one forward: the choices of a
    multiple-choice question that are one token each (MMLU's " A".." D", SST-2's " negative" /
    " positive") are all read off the context's last position, as lm-eval does.
    """
    rows: dict[tuple, int] = {}
    want = []  # per request: (row, position of its first predicted token, cont)
    for ctx, cont in requests:
        seq = tuple(ctx + cont[:-1])
        want.append((rows.setdefault(seq, len(rows)), len(seq) - len(cont), cont))
    seqs = list(rows)
    users = defaultdict(list)
    for i, (r, pos, cont) in enumerate(want):
        if cont:
            users[r].append((i, pos, cont))
    out = [(0.0, True)] * len(requests)  # an empty continuation: log 1, trivially greedy
    dev = model.device  # the embedding's: inputs go there
    order = sorted(users, key=lambda r: (len(seqs[r]), seqs[r]))  # little padding, deterministic
    for s in range(0, len(order), batch_size):
        batch = order[s:s + batch_size]
        ids, mask = left_pad(tok, [list(seqs[r]) for r in batch])
        T = ids.shape[1]
        first = [min(pos for _, pos, _ in users[r]) for r in batch]
        # only the positions that predict a cont token, as flat (B*T) indices
        at = [b * T + t for b, r in enumerate(batch) for t in range(T - len(seqs[r]) + first[b], T)]
        logits = model(ids.to(dev, non_blocking=True), attention_mask=mask.to(dev, non_blocking=True),
                       logits_at=torch.tensor(at))  # (N, V)
        read_scores(logits, [(f, users[r]) for f, r in zip(first, batch)], out)
    return out


@torch.inference_mode()
def score_shared(model, tok, groups: list[list[tuple[list[int], list[int]]]], batch_size: int = 32):
    """`score_tokens` for groups of requests that begin alike (the choices of one question): the
    tokens a group's rows share are read once into a KV cache, and each row's own tokens are read
    from it; the same numbers as `score_tokens`, in fp rounding. A group whose rows are all one
    sequence (MMLU: one forward per question) goes to `score_tokens` as it is.

    Returns each group's list of (log-likelihood, is_greedy). Groups are batched by the length of
    their shared part, then of their own parts, so little of either is padding."""
    out = [[None] * len(g) for g in groups]
    plain, shared = [], []
    for gi, g in enumerate(groups):
        seqs = [tuple(ctx + cont[:-1]) for ctx, cont in g]
        # the shared part ends before the first position whose logits are read, so every
        # position that predicts a continuation token is in a row's own part
        P = min(common_prefix(seqs), min(len(ctx) for ctx, _ in g) - 1)
        if len(set(seqs)) == 1 or P < 1 or not all(cont for _, cont in g):
            plain.append(gi)
        else:
            shared.append((P, max(len(q) for q in seqs) - P, gi, seqs))
    flat = [r for gi in plain for r in groups[gi]]
    scores = iter(score_tokens(model, tok, flat, batch_size))
    for gi in plain:
        out[gi] = [next(scores) for _ in groups[gi]]
    dev = model.device
    shared.sort(key=lambda x: (x[0], x[1], x[2]))
    batch, n_rows = [], 0
    for item in shared + [None]:  # batches of at most `batch_size` rows of own tokens
        if item is not None and (not batch or n_rows + len(set(item[3])) <= batch_size):
            batch.append(item)
            n_rows += len(set(item[3]))
            continue
        if batch:
            _score_batch(model, tok, groups, batch, out, dev)
        batch, n_rows = ([item], len(set(item[3]))) if item is not None else ([], 0)
    return out


def _score_batch(model, tok, groups, batch, out, dev):
    """One batch of `score_shared`: prefill each group's shared part (left-padded), copy its cache
    to each of the group's distinct rows, then read the rows' own tokens (right-padded) after it."""
    ids, mask = left_pad(tok, [list(seqs[0][:P]) for P, _, _, seqs in batch])
    ids, mask = ids.to(dev), mask.to(dev)
    G, Lp = ids.shape
    cache = model.new_cache(G, Lp)
    model(ids, attention_mask=mask, cache=cache, logits_at=torch.zeros_like(ids, dtype=torch.bool))
    owner, own, rows = [], [], []  # per distinct row: its group's index in the batch, own tokens, scores to read
    for b, (P, _, gi, seqs) in enumerate(batch):
        distinct: dict[tuple, list] = {}
        for j, ((ctx, cont), seq) in enumerate(zip(groups[gi], seqs)):
            distinct.setdefault(seq, []).append(((gi, j), len(ctx) - 1 - P, cont))
        for seq, users in distinct.items():
            owner.append(b)
            own.append(seq[P:])
            rows.append((min(pos for _, pos, _ in users), users))
    Ls = max(map(len, own))
    sids = torch.full((len(own), Ls), tok.pad_id, dtype=torch.long)
    smask = torch.zeros(len(own), Ls, dtype=torch.long)
    at = torch.zeros(len(own), Ls, dtype=torch.bool)
    for r, (seq, (first, _)) in enumerate(zip(own, rows)):
        sids[r, :len(seq)] = torch.tensor(seq)
        smask[r, :len(seq)] = 1
        at[r, first:len(seq)] = True  # only the positions that predict a cont token
    rows_cache = model.new_cache(len(own), Lp + Ls)
    idx = torch.tensor(owner)
    for big, small in zip(rows_cache, cache):  # each layer's K/V on that layer's device
        i = idx.to(small.k.device)
        big.k[:, :, :Lp], big.v[:, :, :Lp] = small.k[i], small.v[i]
    full_mask = torch.cat([mask[idx.to(mask.device)], smask.to(dev)], 1)  # positions follow it
    logits = model(sids.to(dev), attention_mask=full_mask, cache=rows_cache, cache_pos=Lp, logits_at=at.to(dev))
    got = {}
    read_scores(logits, rows, got)
    for (gi, j), score in got.items():
        out[gi][j] = score


def loglikelihoods(model, tok, pairs: list[tuple[str, str]], batch_size: int = 32):
    """lm-eval's `loglikelihood` request: (log P(continuation | context), is_greedy) per pair."""
    return score_tokens(model, tok, [encode_pair(tok, c, x) for c, x in pairs], batch_size)


def cut_at(text: str, until) -> str:
    """lm-eval's cut: the text before the first stop string, not stripped."""
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


def generate_until(model, tok, contexts: list[str], until, max_gen_toks: int = MAX_GEN_TOKS, batch_size: int = 16,
                   share_prefix: bool = False):
    """lm-eval's `generate_until` request, greedy: each context's continuation before its stop.
    `share_prefix`: the tokens all contexts begin with (GSM8K's eight examples) are read once."""
    new = greedy(model, tok, contexts, max_gen_toks, tuple(until), batch_size, share_prefix)
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


def sciq(doc) -> Choice:
    return choice(f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:",
                  [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]], 3)


def openbookqa(doc) -> Choice:
    labels = doc["choices"]["label"]
    return choice(doc["question_stem"], doc["choices"]["text"], labels.index(doc["answerKey"].lstrip()))


def social_iqa(doc) -> Choice:
    return choice(f"Q: {doc['context']} {doc['question']}\nA:", [doc["answerA"], doc["answerB"], doc["answerC"]],
                  int(doc["label"]) - 1)


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
    Task("sciq", "sciq", "1.0", sciq, ("acc", "acc_norm"), "acc_norm", split="sciq validation (lm-eval: test)"),
    Task("openbookqa", "openbookqa", "1.0", openbookqa, ("acc", "acc_norm"), "acc_norm", split="openbookqa main test"),
    Task("social_iqa", "social_iqa", "0.0", social_iqa, ("acc",), "acc", split="social_i_qa validation"),
]}
# ----------------------------------------------------------------------------------------------
# Held-out text: how far the edited model's next-token distribution moved, on text that neither
# the edit, nor a regulariser, nor a covariance statistic has read


@dataclass(frozen=True)
class Text:
    name: str
    source: str  # the task whose data file holds the passages
    field: str  # the document field that is the passage
    last: int  # how many passages, counted from the end of the file (the start feeds the task)
    about: str


TEXTS = {t.name: t for t in [
    Text("lambada_text", "lambada", "text", 300,
         "the last 300 LAMBADA passages (lambada_openai test, book text), each read whole"),
]}

# A set is a list of tasks; "task:N" is the task's first N documents (as --limit, for that task).
SETS = {
    "paper": ["mmlu", "nq", "sst2", "gsm8k"],  # the paper's Capability (less WMT16, not available offline)
    "small": ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada"],
    # harm: tasks both default models score clearly above chance on, each the first N of its
    # documents, N about 1 / sqrt(tokens per item) (the most items for a fixed cost with equal
    # weights): the paired 95% interval of their mean is within +-0.015 while at most 23% of each
    # task's items flip (flips_for; docs/capability.md). Then the drift on held-out text: KL and
    # perplexity on the 300 LAMBADA passages the lambada documents stop short of. No BoolQ: its
    # passages are the rival editors' covariance-statistics corpus.
    "harm": ["arc_easy:1500", "piqa:1300", "lambada:1200", "lambada_text"],
}
SETS["all"] = SETS["paper"] + SETS["small"] + ["sciq", "openbookqa", "social_iqa"]


def split_entry(entry: str) -> tuple[str, int | None]:
    """"lambada:1000" -> ("lambada", 1000): a task and how many of its documents; "lambada" -> all."""
    name, _, n = entry.partition(":")
    if name not in TASKS and name not in TEXTS:
        raise CapabilityError(f"--capability: unknown task {name!r}; known tasks: {', '.join([*TASKS, *TEXTS])}; "
                              f"sets: {', '.join(SETS)}")
    if not n:
        return name, None
    if not n.isdigit() or int(n) < 1:
        raise CapabilityError(f"--capability: {entry!r}: after the colon give how many documents (at least 1)")
    return name, int(n)


def resolve(spec: str) -> list[str]:
    """"paper", "small", "harm", "all" or task names ("task:N": its first N documents),
    comma-separated, in order, each task once (its first mention counts)."""
    entries = []
    for part in (p.strip() for p in spec.split(",")):
        entries += SETS[part] if part in SETS else [part]
    seen = {}
    for e in entries:
        seen.setdefault(split_entry(e)[0], e)
    return list(seen.values())


def check(spec: str, limit: int | None, data_dir: Path = DATA_DIR) -> list[str]:
    """The task names of a --capability value, once --limit and every data file are known good."""
    names = resolve(spec)
    if limit is not None and limit < 1:
        raise CapabilityError(f"--limit must be at least 1, got {limit}")
    for n in names:
        name = split_entry(n)[0]
        if not (Path(data_dir) / f"{TEXTS[name].source if name in TEXTS else name}.jsonl").is_file():
            load_docs(n, limit, data_dir)  # raises the missing-file message
    return names


def load_docs(name: str, limit: int | None = None, data_dir: Path = DATA_DIR) -> list[dict]:
    """The task's documents; with `limit`, the first `limit` (MMLU: of each subject), as lm-eval's
    --limit. `name` may be "task:N" (the first N, or `limit` if fewer); a held-out text (TEXTS)
    gives its passages as {"text": ...}, the first `limit` of them with `limit`."""
    if limit is not None and limit < 1:
        raise CapabilityError(f"--limit must be at least 1, got {limit}")
    name, n = split_entry(name)
    limit = n if limit is None else min(limit, n or limit)
    text = TEXTS.get(name)
    path = Path(data_dir) / f"{text.source if text else name}.jsonl"
    if not path.is_file():
        raise CapabilityError(f"{path}: missing; make the capability data with: make capability "
                              f"(or python data/capability/convert.py {text.source if text else name})")
    try:
        with open(path, encoding="utf-8") as f:
            docs = [json.loads(line) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CapabilityError(f"{path}: unreadable ({e}); delete it and run make capability again") from None
    if not docs:
        raise CapabilityError(f"{path}: no documents; delete it and run make capability again")
    if text:
        docs = [{"text": d[text.field]} for d in docs[-text.last:]]
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
        texts = generate_until(model, tok, req, task.until, MAX_GEN_TOKS, gen_batch_size, share_prefix=True)
        scored = [task.score(t, d) for t, d in zip(texts, docs)]
        return {"output": texts, "answers": [s["answers"] for s in scored],
                **{m: [s[m] for s in scored] for m in task.metrics}}
    if isinstance(req[0], tuple):  # a single continuation: is it the greedy one
        scores = loglikelihoods(model, tok, req, batch_size)
        return {"acc": [float(g) for _, g in scores], "answers": [g for _, g in scores],
                "loglikelihoods": [ll for ll, _ in scores]}
    # each question's choices begin alike: read the shared tokens once (score_shared)
    groups = [[encode_pair(tok, *p) for p in c.pairs()] for c in req]
    out = defaultdict(list)
    for c, scores in zip(req, score_shared(model, tok, groups, batch_size)):
        ll = np.array([x for x, _ in scores])
        out["loglikelihoods"].append(ll.tolist())
        pred = int(np.argmax(ll))  # ties: the first, as numpy's argmax in lm-eval
        pred_norm = int(np.argmax(ll / np.array([float(len(x)) for x in c.choices])))
        out["answers"].append(pred)
        out["acc"].append(float(pred == c.gold))
        out["acc_norm"].append(float(pred_norm == c.gold))
    return {k: v for k, v in out.items() if k in task.metrics or k in ("answers", "loglikelihoods")}


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


@torch.inference_mode()
def drift(model, tok, windows: list[list[int]], base: dict | None, edited: dict | None,
          tokens_per_batch: int = 512, layer: int = 0) -> dict[str, np.ndarray]:
    """Per window of token ids, read as its own sequence (every token after the first predicted):
    how many tokens were predicted, their summed negative log-likelihood under `base` (and
    `edited`), and the summed KL(base || edited) of the next-token distributions. Only the
    tensors in `base` / `edited` are swapped, batch by batch, so one model and one batch of
    logits are in memory; the model is left holding `edited` (else `base`). Identical weights
    give a KL of exactly 0: both passes then compute the same numbers. When the two differ only
    from `layer` up, the hidden states entering it are computed once per batch for both."""
    dev = model.device
    n = len(windows)
    out = {"tokens": np.zeros(n), "nll_base": np.zeros(n)}
    if edited is not None:
        out.update(nll_edited=np.zeros(n), kl=np.zeros(n))
    order = sorted(range(n), key=lambda i: (len(windows[i]), i))
    start = 0
    while start < n:  # batches of about `tokens_per_batch` positions: the logits are (positions, vocab)
        rows = max(1, tokens_per_batch // len(windows[order[start]]))
        idx = order[start:start + rows]
        while len(idx) > 1 and len(idx) * len(windows[idx[-1]]) > tokens_per_batch:
            idx = idx[:-1]
        start += len(idx)
        b = collate([(windows[i], 1) for i in idx], tok.pad_id).to(dev)  # n_prompt 1: predict every next token
        row = torch.repeat_interleave(torch.arange(len(idx)), b.target_mask.sum(1).cpu())  # each position's window
        labels = b.labels

        def per_window(x):  # (N,) per predicted position -> (rows,) sums, in float64
            return torch.zeros(len(idx), dtype=torch.float64).index_add_(0, row, x.double().cpu()).numpy()

        logp = {}
        h = model.hidden_states(b.ids, layer, attention_mask=b.attention_mask)  # either weight set's
        for label, weights in (("base", base), ("edited", edited)):
            if label == "edited" and edited is None:
                break
            if weights:
                model.load_tensors(weights)
            logits = model.forward_from(h, layer, attention_mask=b.attention_mask, logits_at=b.predict_mask)
            logp[label] = F.log_softmax(logits.float(), -1)  # (N, V)
            nll = -logp[label].gather(1, labels[:, None].to(logits.device))[:, 0]
            out[f"nll_{label}"][idx] = per_window(nll)
        if edited is not None:
            kl = (logp["base"].exp() * (logp["base"] - logp["edited"])).sum(-1)
            out["kl"][idx] = per_window(kl)
        out["tokens"][idx] = b.target_mask.sum(1).cpu().numpy()
    return out


def text_windows(tok, texts: list[str], window: int = 256) -> list[list[int]]:
    """Each text's tokens in non-overlapping windows of at most `window`; a window of one token
    predicts nothing and is dropped."""
    out = []
    for text in texts:
        ids = tok.encode(text)
        out += [w for w in (ids[i:i + window] for i in range(0, len(ids), window)) if len(w) > 1]
    return out


def drift_row(d: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
    """Perplexity of each weight set and KL(base || edited) per token, with paired bootstrap
    intervals: the windows are resampled (BOOTSTRAP times), each draw's figures are ratios of
    the resampled sums, so long and short windows weigh by their tokens as in the totals."""
    T = d["tokens"].sum()
    ppl = {"base": float(np.exp(d["nll_base"].sum() / T))}
    metrics = {"perplexity": ppl}
    if "kl" in d:
        n = len(d["tokens"])
        counts = rng.multinomial(n, np.full(n, 1 / n), size=BOOTSTRAP)  # (draws, windows)
        t = counts @ d["tokens"]
        ppl_b, ppl_e = np.exp(counts @ d["nll_base"] / t), np.exp(counts @ d["nll_edited"] / t)
        ppl.update(edited=float(np.exp(d["nll_edited"].sum() / T)))
        ppl["change"] = ppl["edited"] - ppl["base"]
        ppl["ci95"] = interval(ppl_e - ppl_b)
        ppl["verdict"] = verdict([-ppl["ci95"][1], -ppl["ci95"][0]])  # a higher perplexity is worse
        kl = float(d["kl"].sum() / T)
        metrics["kl_per_token"] = {"base": 0.0, "edited": kl, "change": kl, "ci95": interval(counts @ d["kl"] / t)}
    return {"tokens": int(T), "metrics": metrics}


# ----------------------------------------------------------------------------------------------
# How sure: the interval of a set's mean from the observed item variance

Z95 = 1.959964


def half_width(diffs: list[np.ndarray]) -> float:
    """The normal-approximation 95% half-width of the mean over K tasks of each task's mean
    paired difference: 1.96 * sqrt(sum_k s_k^2 / n_k) / K, with s_k^2 the observed variance of
    task k's per-item differences (edited - base: -1, 0 or +1). It assumes the items are
    independent draws and the tasks independent of each other, nothing else. Since
    s_k^2 = f_k - (mean_k)^2 <= f_k, the share of task k's items that flip, it is small when
    few items flip: that is the assumption the preset is sized on (flips_for)."""
    K = len(diffs)
    return float(Z95 * np.sqrt(sum(np.var(d) / len(d) for d in diffs)) / K)


def flips_for(sizes: list[int], target: float = 0.015) -> float:
    """The share of items that may flip in every task (at most) with the half-width of the
    set's mean still within `target`: from half_width with s_k^2 <= f,
    f = (target / 1.96)^2 * K^2 / sum_k 1 / n_k."""
    return float((target / Z95) ** 2 * len(sizes) ** 2 / sum(1 / n for n in sizes))


def digest(x) -> str:
    """A short name for what a task's base results depend on (its documents, the batch sizes)."""
    return hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]


def before_after(model, tok, names: list[str], base: dict | None, edited: dict | None, limit: int | None = None,
                 batch_size: int = 32, gen_batch_size: int = 16, data_dir: Path = DATA_DIR, say=print,
                 seed: int = 0, base_cache: dict | None = None, replay: bool = True) -> dict:
    """Every task on the base weights, then on the edited ones, one model in memory (as
    evaluate.before_after: `base`/`edited` map parameter names to tensors; `base=None` means
    the current weights are the base; `edited=None`: base only); then each held-out text (TEXTS)
    with both weight sets batch by batch (`drift`). The model is left holding `edited` when
    given. `base_cache`, a dict kept by the caller, keeps the base model's task results between
    calls that score the same documents (several edits of one model, as in experiments/), and the
    hidden states the edited passes start from; a `basecache.BaseCache` keeps them on disk too.
    `replay=False` runs every pass through the whole model (the same scores, slower)."""
    docs = {}
    for entry in names:  # "task:N" entries: the report is keyed by the task
        docs[split_entry(entry)[0]] = load_docs(entry, limit, data_dir)
    scored, texts = [n for n in docs if n in TASKS], [n for n in docs if n in TEXTS]
    if base is None and edited is not None:
        params = dict(model.named_parameters())
        base = {n: params[n].detach().clone() for n in edited}
    # the edit begins at layer L: the edited pass of a log-likelihood task starts there from the
    # hidden states its base pass kept (replay.py); the same scores, fewer layers run
    L = first_layer(edited, model.args.n_layers) if edited is not None and replay else 0
    kept = {} if base_cache is None else base_cache
    runs, seconds = {}, defaultdict(dict)
    for label, weights in (("base", base), ("edited", edited)):
        if label == "edited" and edited is None:
            break
        if weights:
            model.load_tensors(weights)
        runs[label] = {}
        for n in scored:  # wall seconds, and CPU seconds (the cost on a machine shared with other jobs)
            t0, c0, key = time.time(), time.process_time(), (n, digest([docs[n], batch_size, gen_batch_size]))
            fast = L > 0 and TASKS[n].score is None  # generation feeds its own outputs back: never replayed
            if label == "base" and base_cache is not None and key in base_cache and (not fast or (*key, L) in kept):
                runs[label][n] = base_cache[key]
            elif label == "base" and fast:
                recorder = Replay(model, L).record()
                runs[label][n] = run(recorder, tok, TASKS[n], docs[n], batch_size, gen_batch_size)
                kept[(*key, L)] = recorder
            else:
                runs[label][n] = run(kept[(*key, L)].replay() if fast else model, tok, TASKS[n], docs[n],
                                     batch_size, gen_batch_size)
            if label == "base" and base_cache is not None:
                base_cache[key] = runs[label][n]
            seconds[n][label] = round(time.time() - t0, 2)
            seconds[n][f"{label}_cpu"] = round(time.process_time() - c0, 2)
            p = TASKS[n].primary
            say(f"capability {label} {n}: {p} {np.mean(runs[label][n][p]):.3f} (n={len(docs[n])}, "
                f"{seconds[n][label]:.1f}s)")
    rng = np.random.default_rng(seed)
    tasks, draws, diffs = {}, {}, {}
    for n in scored:
        t = TASKS[n]
        row = {"lm_eval_task": t.lm_eval, "lm_eval_version": t.version, "data": t.split, "n": len(docs[n]),
               **baselines(t, docs[n]), "primary": t.primary, "seconds": seconds[n], "metrics": {}}
        for m in t.metrics:
            cell = {label: float(np.mean(r[n][m])) for label, r in runs.items()}
            if "edited" in runs:
                b, e = np.asarray(runs["base"][n][m], float), np.asarray(runs["edited"][n][m], float)
                cell["change"], d = paired_change(b, e, rng)
                cell["ci95"] = interval(d)
                cell["verdict"] = verdict(cell["ci95"])
                cell["flipped"] = float(np.mean(b != e))  # the share of items whose score changed
                if m == t.primary:
                    draws[n], diffs[n] = d, e - b
            row["metrics"][m] = cell
        tasks[n] = row
    for n in texts:
        t0, c0 = time.time(), time.process_time()
        windows = text_windows(tok, [d["text"] for d in docs[n]])
        tasks[n] = {"kind": "text", "data": TEXTS[n].about, "n": len(windows), "primary": "kl_per_token",
                    **drift_row(drift(model, tok, windows, base, edited, layer=L), rng)}
        both = "base and edited" if edited is not None else "base"
        tasks[n]["seconds"] = {both: round(time.time() - t0, 2), f"{both}_cpu": round(time.process_time() - c0, 2)}
        m = tasks[n]["metrics"]
        say(f"capability {n}: perplexity {m['perplexity']['base']:.3f}"
            + (f" -> {m['perplexity']['edited']:.3f}, KL(base || edited) {m['kl_per_token']['edited']:.5f} per token"
               if edited is not None else "") + f" ({tasks[n]['tokens']} tokens, {time.time() - t0:.1f}s)")
    report = {"tasks": tasks, "averages": {}, "settings": {
        "lm_eval": LM_EVAL, "limit": limit, "limit_means": "the first N documents of each task (MMLU: of each subject)",
        "interval": f"paired bootstrap over items, {BOOTSTRAP} resamples, seed {seed}, 95% percentile",
        "batch_size": batch_size, "gen_batch_size": gen_batch_size, "max_gen_toks": MAX_GEN_TOKS}}
    for set_name, members in SETS.items():
        members = [split_entry(e)[0] for e in members]
        complete = all(n in tasks for n in members)
        members = [n for n in members if n in scored]
        if set_name == "all" or len(members) < 2:
            continue
        avg = {label: float(np.mean([tasks[n]["metrics"][TASKS[n].primary][label] for n in members]))
               for label in runs}
        if "edited" in runs:  # tasks resampled independently; the average's change is the mean of theirs
            avg["change"] = avg["edited"] - avg["base"]
            avg["ci95"] = interval(np.mean([draws[n] for n in members], axis=0))
            avg["verdict"] = verdict(avg["ci95"])
            avg["half_width"] = half_width([diffs[n] for n in members])  # the same, from the item variance
            avg["flipped"] = float(np.mean([tasks[n]["metrics"][TASKS[n].primary]["flipped"] for n in members]))
        avg["flips_for_0.015"] = flips_for([tasks[n]["n"] for n in members])
        name = "Cap" if set_name == "paper" else set_name
        report["averages"][name] = {"tasks": members, "complete": complete, **avg}
    return report


def format_table(report: dict) -> str:
    """The capability part of the report as a person reads it."""
    edited = any("edited" in m for t in report["tasks"].values() for m in t["metrics"].values())
    lim = report["settings"]["limit"]
    lines = [f"capability (lm-eval {LM_EVAL} tasks; {'all documents' if lim is None else f'--limit {lim}'})",
             f"{'task':<15}{'metric':<30}{'n':>7}{'chance':>8}{'base':>9}"
             + (f"{'edited':>9}  change [95% CI]" if edited else "")]

    def cells(c, f=".3f"):
        if not edited:
            return f"{c['base']:>9{f}}"
        return (f"{c['base']:>9{f}}{c['edited']:>9{f}}  {c['change']:+{f}} [{c['ci95'][0]:+{f}}, {c['ci95'][1]:+{f}}]"
                + (f"  {c['verdict']}" if "verdict" in c else ""))

    for name, t in report["tasks"].items():
        if t.get("kind") == "text":  # n: tokens; the KL of the base against itself is 0
            for m, c in t["metrics"].items():
                label = "KL(base || edited) per token" if m == "kl_per_token" else m
                f = ".4f" if m == "kl_per_token" else ".3f"
                lines.append(f"{name:<15}{label:<30}{t['tokens']:>7}{'-':>8}{cells(c, f)}")
            continue
        for m, c in t["metrics"].items():
            lines.append(f"{name:<15}{m:<30}{t['n']:>7}{t['chance']:>8.3f}{cells(c)}")
    for name, a in report["averages"].items():
        partial = "" if a["complete"] else ", partial set"
        lines.append(f"{name:<15}{'mean of primary metrics':<30}{'':>7}{'':>8}{cells(a)}")
        how = (f"; {a['flipped']:.1%} of items flipped, +-{a['half_width']:.3f} from their variance"
               if "half_width" in a else "")
        lines.append(f"{'':<15}({', '.join(a['tasks'])}{partial}{how})")
    return "\n".join(lines)
