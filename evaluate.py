"""Measuring an edit the way it is used: greedy decoding, the authors' stop rule, exact match.

The "Wild" protocol the paper follows: each prompt is fed raw (no chat template), the model
decodes greedily for at most 32 new tokens and stops at ".", "\\n" or EOS; the answer is the new
text up to (not including) the first "." or "\\n", compared with the target by exact match after
SQuAD normalisation. A number such as "3.5" is therefore cut to "3", exactly as the authors'
stop strings do; we keep their rule so our numbers compare with theirs.

    reliability      the edit prompt now yields the new target
    generalization   its paraphrases do too
    locality         unrelated prompts yield the same output as before the edit (and, as a
                     second figure, their given true answer)

Papers also report the older teacher-forced figures, so we print them too, labelled as such:
the share of answer tokens (EOS not counted) that are the argmax given the gold prefix; for
locality, the share of the base model's own greedy tokens (those it produced, stop token or
EOS included) that the edited model still predicts given the same prefix.

    python evaluate.py --ckpt weights/smollm2-135m --delta out/demo/delta.safetensors --edits data/demo_edits.json
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

import torch
import torch.nn.functional as F

from data import Edit, EditFileError, collate, encode_edit, load_edits

STOP_STRINGS = (".", "\n")  # the authors' stop strings; EOS (any of tok.eos_ids) stops too
MAX_NEW_TOKENS = 32


# ----------------------------------------------------------------------------------------------
# Answers: the stop rule and SQuAD normalisation


def cut_at_stop(text: str) -> str:
    """The answer in a continuation: the text before the first stop string, without the
    surrounding spaces. " Paris. It is" -> "Paris"; " 3.5 km" -> "3" (the authors' rule)."""
    cut = min((i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0), default=len(text))
    return text[:cut].strip()


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)  # ASCII only, as in the SQuAD script: "“Paris”" keeps its quotes


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lower-case, drop ASCII punctuation, drop the words a/an/the,
    squeeze whitespace. Accents and non-ASCII punctuation are kept, as in the original."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, target: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(target)


# ----------------------------------------------------------------------------------------------
# Batched greedy decoding with a static KV cache


class _StopTokens:
    """Which token ids end a row: any EOS id, or a token whose text contains a stop string.

    Checking each new token's own text is exact for byte-level BPE and sentencepiece: "." and
    "\\n" are single bytes, so the decoded continuation contains one exactly when one of its
    tokens does. The answer itself is then cut from the decoded continuation (cut_at_stop).
    """

    def __init__(self, tok):
        self.tok = tok
        self.eos = set(tok.eos_ids) | {tok.eos_id}
        self._memo: dict[int, bool] = {}

    def __call__(self, t: int) -> bool:
        if t in self.eos:
            return True
        if t not in self._memo:
            text = self.tok.decode([t])
            self._memo[t] = any(s in text for s in STOP_STRINGS)
        return self._memo[t]


class _Rows:
    """Rows decoding together: their KV cache (left-padded to a common length S), attention
    mask, the token each feeds next, and which prompt each row is."""

    def __init__(self, cache, mask, nxt, index, S):
        self.cache, self.mask, self.nxt, self.index, self.S = cache, mask, nxt, index, S

    def keep(self, rows: list[int]) -> None:
        """Drop finished rows: later steps cost only what the live rows need."""
        sel = torch.tensor(rows, dtype=torch.long, device=self.nxt.device)
        for c in self.cache:
            c.k, c.v = c.k.index_select(0, sel), c.v.index_select(0, sel)
        self.mask, self.nxt = self.mask.index_select(0, sel), self.nxt.index_select(0, sel)
        self.index = [self.index[j] for j in rows]


def _merge(a: _Rows | None, b: _Rows, room: int) -> _Rows:
    """One set of rows from two, both left-padded to the longer S, with `room` free columns.

    Left padding is invisible to the model: padded keys are masked out and each row's positions
    count only its real tokens (positions come from the mask), so a row's outputs do not depend
    on how much padding it sits behind.
    """
    parts = [r for r in (a, b) if r is not None and r.index]
    S = max(r.S for r in parts)
    B = sum(len(r.index) for r in parts)
    k0 = parts[0].cache[0].k
    mask = torch.ones(B, S + room, dtype=torch.long, device=k0.device)
    cache = []
    for layer in range(len(parts[0].cache)):
        _, nkv, _, hd = parts[0].cache[layer].k.shape
        c = parts[0].cache[layer]
        k = torch.zeros(B, nkv, S + room, hd, dtype=k0.dtype, device=k0.device)
        v = torch.zeros_like(k)
        row = 0
        for r in parts:
            n, off = len(r.index), S - r.S
            k[row: row + n, :, off:S] = r.cache[layer].k[:, :, : r.S]
            v[row: row + n, :, off:S] = r.cache[layer].v[:, :, : r.S]
            row += n
        c.k, c.v = k, v  # reuse the first part's KVCache modules with the new buffers
        cache.append(c)
    row = 0
    for r in parts:
        n, off = len(r.index), S - r.S
        mask[row: row + n, :off] = 0
        mask[row: row + n, off:S] = r.mask[:, : r.S]
        row += n
    return _Rows(cache, mask, torch.cat([r.nxt for r in parts]), [i for r in parts for i in r.index], S)


@torch.inference_mode()
def generate_ids(model, tok, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
                 batch_size: int = 64) -> list[list[int]]:
    """The new token ids of each prompt's greedy continuation (stop token included).

    Prompts are sorted by length and prefilled `batch_size` at a time (little padding). Rows that
    have not stopped join one decoding set, which takes one step for all its rows at a time and
    sheds rows as they stop; a new batch is prefilled whenever fewer than `batch_size` rows are
    left. Decoding a step costs about the same for 4 rows as for 64 on a CPU (reading the
    weights dominates), so sharing steps across batches, rather than finishing each batch's
    longest row alone, is where the time goes. Results come back in the order of `prompts`.
    """
    dev = next(model.parameters()).device
    encoded = [tok.encode(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    is_stop = _StopTokens(tok)
    out: list[list[int]] = [[] for _ in prompts]
    live: _Rows | None = None

    def take(rows: _Rows, logits) -> None:
        """Append each row's argmax token; keep the rows that go on."""
        rows.nxt = logits.argmax(-1)  # (b,)
        going = []
        for j, t in enumerate(rows.nxt.tolist()):
            i = rows.index[j]
            out[i].append(t)
            if not is_stop(t) and len(out[i]) < max_new_tokens:
                going.append(j)
        if len(going) < len(rows.index):
            rows.keep(going)

    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        T = max(len(encoded[i]) for i in chunk)
        ids = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        mask = torch.ones(len(chunk), T, dtype=torch.long)
        for b, i in enumerate(chunk):  # left padding: every prompt ends at column T - 1
            ids[b, T - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[b, : T - len(encoded[i])] = 0
        ids, mask = ids.to(dev), mask.to(dev)
        cache = model.new_cache(len(chunk), T)
        logits = model(ids, attention_mask=mask, cache=cache, logits_at="last")  # prefill: (B, V)
        rows = _Rows(cache, mask, None, list(chunk), T)
        take(rows, logits)
        if rows.index:
            live = _merge(live, rows, room=max_new_tokens)
        last = start + batch_size >= len(order)
        # decode until there is room for the next batch (or, after the last one, until all stop)
        while live is not None and live.index and (last or len(live.index) >= batch_size):
            logits = model(live.nxt[:, None], attention_mask=live.mask[:, : live.S + 1], cache=live.cache,
                           cache_pos=live.S, logits_at="last")
            live.S += 1
            take(live, logits)
    return out


def answer_text(tok, new_ids: list[int]) -> str:
    return cut_at_stop(tok.decode(new_ids))


def generate(model, tok, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 64) -> list[str]:
    """Each prompt's greedy answer: the continuation cut at the first "." or "\\n" (or EOS)."""
    return [answer_text(tok, ids) for ids in generate_ids(model, tok, prompts, max_new_tokens, batch_size)]


# ----------------------------------------------------------------------------------------------
# Teacher-forced token accuracy


@torch.inference_mode()
def token_accuracy(model, encoded: list[tuple[list[int], int]], pad_id: int, batch_size: int = 64) -> list[float | None]:
    """For each (ids, n_prompt): the share of tokens after the prompt that are the model's
    argmax given the gold prefix. None for a sequence with no token after the prompt."""
    dev = model.lm_head.weight.device
    acc: list[float | None] = [None] * len(encoded)
    order = sorted((i for i, (ids, n) in enumerate(encoded) if len(ids) > n), key=lambda i: len(encoded[i][0]))
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        batch = collate([encoded[i] for i in rows], pad_id).to(dev)
        logits = model(batch.ids, attention_mask=batch.attention_mask, logits_at=batch.predict_mask)  # (N, V)
        hits = (logits.argmax(-1) == batch.labels).float()
        for i, h in zip(rows, hits.split(batch.target_mask.sum(1).tolist())):
            acc[i] = h.mean().item()
    return acc


def encode_answer(tok, prompt: str, answer: str) -> tuple[list[int], int]:
    """prompt + " " + answer without the EOS: teacher-forced accuracy counts answer tokens only."""
    ids, n = encode_edit(tok, prompt, answer)
    return ids[:-1], n


# ----------------------------------------------------------------------------------------------
# One model, both weight sets


def _run(model, tok, edits: list[Edit], batch_size: int, max_new_tokens: int, base: dict | None = None) -> dict:
    """Everything one weight set says about the edits. `base` is the base model's run, whose
    locality outputs and tokens this one is compared with (None: this run is the base)."""
    reph = [(i, r) for i, e in enumerate(edits) for r in e.rephrases]
    loc = [(i, p, a) for i, e in enumerate(edits) for p, a in e.locality]
    prompts = [e.prompt for e in edits] + [r for _, r in reph] + [p for _, p, _ in loc]
    new_ids = generate_ids(model, tok, prompts, max_new_tokens, batch_size)
    texts = [answer_text(tok, x) for x in new_ids]
    n_e, n_r = len(edits), len(reph)
    rel_out, gen_out, loc_out = texts[:n_e], texts[n_e: n_e + n_r], texts[n_e + n_r:]
    loc_ids = new_ids[n_e + n_r:]
    base_loc_ids = loc_ids if base is None else base["loc_ids"]
    base_loc_out = loc_out if base is None else base["loc_out"]
    acc = token_accuracy(
        model,
        [encode_answer(tok, e.prompt, e.target) for e in edits]
        + [encode_answer(tok, r, edits[i].target) for i, r in reph]
        + [(tok.encode(p) + ids, len(tok.encode(p))) for (_, p, _), ids in zip(loc, base_loc_ids)],
        tok.pad_id, batch_size)
    return {
        "rel_out": rel_out, "gen_out": gen_out, "loc_out": loc_out, "loc_ids": loc_ids,
        "rel_em": [exact_match(o, e.target) for o, e in zip(rel_out, edits)],
        "gen_em": [exact_match(o, edits[i].target) for o, (i, _) in zip(gen_out, reph)],
        "loc_same": [o == b for o, b in zip(loc_out, base_loc_out)],
        "loc_em": [exact_match(o, a) for o, (_, _, a) in zip(loc_out, loc) if a.strip()],
        "rel_tf": acc[:n_e], "gen_tf": acc[n_e: n_e + n_r], "loc_tf": acc[n_e + n_r:],
    }


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


METRICS = [
    # (label in the report, key in a run)
    ("reliability (greedy EM)", "rel_em"),
    ("generalization (greedy EM)", "gen_em"),
    ("locality (output unchanged)", "loc_same"),
    ("locality (EM vs given answer)", "loc_em"),
    ("reliability (teacher-forced token acc)", "rel_tf"),
    ("generalization (teacher-forced token acc)", "gen_tf"),
    ("locality (teacher-forced, base tokens kept)", "loc_tf"),
]


@torch.inference_mode()
def text_metrics(model, tok, text: str, base: dict | None, edited: dict | None, window: int = 256,
                 batch_size: int = 8) -> dict:
    """Perplexity of each weight set on `text` and the mean per-token KL(base || edited), over
    non-overlapping windows of `window` tokens. Only the tensors in `base`/`edited` are swapped
    per batch of windows, so one model and one batch of logits are in memory at a time."""
    dev = model.lm_head.weight.device
    ids = tok.encode(text)
    windows = [ids[i: i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise ValueError("--text: the text is shorter than two tokens")
    nll = {"base": 0.0, "edited": 0.0}
    kl, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ws = windows[start: start + batch_size]
        x = torch.full((len(ws), max(map(len, ws))), tok.pad_id, dtype=torch.long)
        m = torch.zeros_like(x)
        for b, w in enumerate(ws):
            x[b, : len(w)], m[b, : len(w)] = torch.tensor(w), 1
        x, m = x.to(dev), m.to(dev)
        predict = m.bool().clone()
        predict[:, -1] = False
        predict[:, :-1] &= m[:, 1:].bool()  # positions whose next token is real
        labels = x[:, 1:][predict[:, :-1]]
        logp = {}
        for name, weights in (("base", base), ("edited", edited)):
            if name == "edited" and edited is None:
                break
            if weights:
                model.load_tensors(weights)
            logp[name] = F.log_softmax(model(x, attention_mask=m, logits_at=predict).float(), -1)  # (N, V)
            nll[name] += -logp[name].gather(1, labels[:, None]).sum().item()
        if "edited" in logp:
            kl += (logp["base"].exp() * (logp["base"] - logp["edited"])).sum().item()
        count += labels.numel()
    out = {"tokens": count, "windows": len(windows), "window": window,
           "perplexity": {"base": math.exp(nll["base"] / count)}}
    if edited is not None:
        out["perplexity"]["edited"] = math.exp(nll["edited"] / count)
        out["kl_base_edited_per_token"] = kl / count
    return out


def before_after(model, tok, edits: list[Edit], base: dict[str, torch.Tensor] | None,
                 edited: dict[str, torch.Tensor] | None, text: str | None = None, batch_size: int = 64,
                 max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """Evaluate the base and the edited weights in one run with one model in memory.

    `base` / `edited` map parameter names to tensors (usually only the edited ones); each is
    copied into the model before its evaluation, and the model is left holding `edited`.
    `base=None`: the model's current weights are the base. `edited=None`: base only.
    """
    t0 = time.time()
    if base is None and edited is not None:  # keep the current values to swap back for --text
        params = dict(model.named_parameters(remove_duplicate=False))
        base = {n: params[n].detach().clone() for n in edited}
    if base:
        model.load_tensors(base)
    runs = {"base": _run(model, tok, edits, batch_size, max_new_tokens)}
    if edited is not None:
        model.load_tensors(edited)
        runs["edited"] = _run(model, tok, edits, batch_size, max_new_tokens, base=runs["base"])
    text_report = text_metrics(model, tok, text, base, edited) if text is not None else None
    if edited is not None:
        model.load_tensors(edited)

    metrics = {}
    for label, key in METRICS:
        row = {name: _mean(run[key]) for name, run in runs.items()}
        row["n"] = sum(x is not None for x in runs["base"][key])
        metrics[label] = row
    per_edit, r_i, l_i = [], 0, 0
    param0 = next(model.parameters())
    b, e = runs["base"], runs.get("edited")
    for i, ed in enumerate(edits):
        item = {"prompt": ed.prompt, "target": ed.target, "old_answer": ed.old_answer, "base": b["rel_out"][i]}
        if e:
            item["edited"] = e["rel_out"][i]
        item["rephrases"] = []
        for r in ed.rephrases:
            item["rephrases"].append({"prompt": r, "base": b["gen_out"][r_i], **({"edited": e["gen_out"][r_i]} if e else {})})
            r_i += 1
        item["locality"] = []
        for p, a in ed.locality:
            item["locality"].append({"prompt": p, "answer": a, "base": b["loc_out"][l_i],
                                     **({"edited": e["loc_out"][l_i]} if e else {})})
            l_i += 1
        per_edit.append(item)
    return {
        "metrics": metrics,
        "text": text_report,
        "settings": {"edits": len(edits), "decoding": "greedy", "max_new_tokens": max_new_tokens,
                     "stop": "EOS or first '.' / '\\n' in the new text (answer cut before it)",
                     "normalisation": "SQuAD (lower-case, ASCII punctuation, a/an/the, whitespace)",
                     "teacher_forced": "answer tokens only, EOS excluded; locality: base model's greedy tokens",
                     "batch_size": batch_size, "dtype": str(param0.dtype).replace("torch.", ""),
                     "device": str(param0.device), "seconds": round(time.time() - t0, 2)},
        "edits": per_edit,
    }


# ----------------------------------------------------------------------------------------------
# Report


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_report(report: dict, file=None, examples: int = 5) -> None:
    has_edited = any("edited" in row for row in report["metrics"].values())
    w = max(len(k) for k in report["metrics"]) + 2
    head = f"{'metric':<{w}}{'base':>8}" + (f"{'edited':>9}" if has_edited else "") + f"{'n':>7}"
    lines = [head]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Greedy before/after evaluation of an edit (reliability, "
                                             "generalization, locality).")
    ap.add_argument("--ckpt", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--delta", help="delta.safetensors written by edit.py; without it only the base is evaluated")
    ap.add_argument("--edits", required=True, help="edit file (.json or .jsonl, any known layout)")
    ap.add_argument("--n", type=int, help="evaluate n edits (the first n, or a random n with --seed)")
    ap.add_argument("--seed", type=int, help="with --n: pick a reproducible random subset")
    ap.add_argument("--out", help="write the full report (metrics, per-edit outputs) as JSON here")
    ap.add_argument("--text", help="a text file: perplexity of base and edited model and KL(base || edited)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = ap.parse_args(argv)

    from model import CheckpointError, load

    try:
        if args.batch_size <= 0 or args.max_new_tokens <= 0:
            raise ValueError("--batch-size and --max-new-tokens must be positive")
        edits = load_edits(args.edits, n=args.n, seed=args.seed)
        text = None
        if args.text:
            try:
                text = Path(args.text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"--text {args.text}: cannot read ({e})") from None
        if args.delta and not Path(args.delta).is_file():
            raise ValueError(f"--delta {args.delta}: no such file")
        model, tok = load(args.ckpt, device=args.device, dtype=args.dtype)
        base = edited = None
        revert = None
        if args.delta:
            from edit import apply_delta, revert_delta  # lazily: edit.py imports this module for --eval
            try:
                originals = apply_delta(model, args.delta)
            except ValueError:
                raise
            except Exception as e:  # e.g. safetensors' own error for a file that is not one
                raise ValueError(f"delta {args.delta}: cannot read it ({e})") from None
            params = dict(model.named_parameters(remove_duplicate=False))
            base, edited = originals, {n: params[n].detach().clone() for n in originals}
            revert = lambda: revert_delta(model, originals)  # noqa: E731
        report = before_after(model, tok, edits, base, edited, text=text, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens)
        if revert is not None:
            revert()
    except (EditFileError, CheckpointError, ValueError, OSError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    report["settings"].update(ckpt=str(args.ckpt), delta=args.delta, edits_file=str(args.edits), n=args.n,
                              seed=args.seed)
    print_report(report)
    if args.out:
        write_report(report, args.out)
        print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
