"""Locate-then-edit machinery shared by MEMIT, AlphaEdit and RECT.

These methods write a fact into `mlp.down_proj` as a key -> value pair:

    key k   the input of down_proj at the subject's last token, averaged over a few context
            templates ("The ... . {prompt}"), at each edited layer
    value   v* = the output of the last edited layer at that token that makes the model say the
            target, found by optimising a vector added there (`target_values`)

The subject is found in the prompt by character offsets, never guessed: a record whose subject
does not occur in its prompt is refused with its record number.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import EditFileError, PrefixCache, collate, encode_edit

STARTERS = ("The", "Therefore", "Because", "I", "You")  # the official context templates' first words
STOP_LOSS = 5e-2  # v*: an edit whose loss is below this stops optimising (the official early stop)


@dataclass
class Request:
    """One edit as the locate-then-edit methods see it."""
    prompt: str
    subject: str
    start: int  # the subject's first character in the prompt
    answer: list[int]  # the target's token ids (and EOS when the run trains it)


def answers(tok, edits, eos: bool) -> list[list[int]]:
    """Every edit's target tokens exactly as LocFT-BF trains them (data.encode_edit), with or
    without the EOS: the same target from the same raw prompt for every method."""
    out = []
    for e in edits:
        ids, n_prompt = encode_edit(tok, e.prompt, e.target)
        out.append(ids[n_prompt:] if eos else ids[n_prompt:-1])
    return out


def requests(tok, edits, path, eos: bool) -> list[Request]:
    """The edits with their subjects located; a subject that is missing or not in its prompt is
    refused, naming the record."""
    out = []
    for i, (e, answer) in enumerate(zip(edits, answers(tok, edits, eos))):
        where = f"edits file {path}, record {e.record if e.record is not None else i}"
        start = e.prompt.find(e.subject) if e.subject.strip() else -1
        if start < 0:
            problem = "has no subject" if not e.subject.strip() else f"subject {e.subject!r} does not occur in the prompt {e.prompt!r}"
            raise EditFileError(f"{where}: {problem}; MEMIT, AlphaEdit and RECT edit at the subject's last token")
        r = Request(e.prompt, e.subject, start, answer)
        subject_token(tok, *fill("{}", r), where)  # refuse now a subject no token covers
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------
# Where the subject is


def token_spans(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids `tok.encode(text)` gives and each token's character span in `text` (special
    tokens such as BOS get an empty span)."""
    if tok._tok is not None:
        enc = tok._tok.encode(text)
        return enc.ids, [tuple(o) for o in enc.offsets]
    # sentencepiece: byte offsets into the UTF-8 text, turned into character offsets
    proto = tok._sp.encode(text, out_type="immutable_proto")
    char_of = [0] * (len(text.encode("utf-8")) + 1)
    b = 0
    for c, ch in enumerate(text):
        for _ in range(len(ch.encode("utf-8"))):
            char_of[b] = c
            b += 1
    char_of[b] = len(text)
    ids = [p.id for p in proto.pieces]
    spans = [(char_of[p.begin], char_of[p.end]) for p in proto.pieces]
    if tok.add_bos:
        ids, spans = [tok.bos_id] + ids, [(0, 0)] + spans
    return ids, spans


def subject_token(tok, text: str, start: int, end: int, where: str = "") -> tuple[list[int], int]:
    """`text`'s token ids and the index of the last token that overlaps characters
    [start, end) (the subject's last token, the official "subject_last")."""
    ids, spans = token_spans(tok, text)
    hits = [j for j, (a, b) in enumerate(spans) if a < end and b > start and b > a]
    if not hits:
        raise EditFileError(f"{where}: no token of {text!r} covers the subject {text[start:end]!r}")
    return ids, hits[-1]


def fill(template: str, r: Request) -> tuple[str, int, int]:
    """A context template ("{}" or "Some text. {}") around the prompt, and where the subject is."""
    prefix = template[:template.index("{}")]
    start = len(prefix) + r.start
    return prefix + r.prompt, start, start + len(r.subject)


@torch.no_grad()
def context_templates(model, tok, seed: int = 0, length: int = 10, top_k: int = 5) -> list[list[str]]:
    """The official context templates: the bare prompt, and five short texts the model itself
    writes from "The", "Therefore", ... (top-k sampling, `length` tokens in all), each followed
    by ". {}". Seeded here, so a run can be repeated; returned in the official two groups."""
    g = torch.Generator().manual_seed(seed)
    texts = []
    for word in STARTERS:
        ids = tok.encode(word)
        while len(ids) < length:
            probs = model(torch.tensor([ids]), logits_at="last")[0].float().softmax(-1)
            p, top = torch.topk(probs, top_k)
            ids.append(int(top[torch.multinomial(p / p.sum(), 1, generator=g)]))
        text = unicodedata.normalize("NFKD", tok.decode(ids)).replace("\n\n", " ")
        texts.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return [["{}"], texts]


# ----------------------------------------------------------------------------------------------
# Reading the model at given tokens


@torch.no_grad()
def hidden_at(model, seqs: list[list[int]], index: list[int], layers: list[int], site: str,
              batch_size: int = 64) -> dict[int, torch.Tensor]:
    """For sequence i, the vector at token index[i] in each of `layers`: the input of
    mlp.down_proj (site "key") or the layer's output, the residual stream after it ("out").
    Returns {layer: (len(seqs), width)} in float32."""
    out = {l: [None] * len(seqs) for l in layers}
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # little padding
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        b = collate([(seqs[i], len(seqs[i])) for i in rows], pad_id=0)  # right padding: no mask needed
        at = (torch.arange(len(rows)), torch.tensor([index[i] for i in rows]))
        grabbed, handles = {}, []
        for l in layers:
            if site == "key":
                hook = lambda mod, args, l=l: grabbed.__setitem__(l, args[0][at])  # noqa: E731
                handles.append(model.layers[l].mlp.down_proj.register_forward_pre_hook(hook))
            else:
                hook = lambda mod, args, output, l=l: grabbed.__setitem__(l, output[at])  # noqa: E731
                handles.append(model.layers[l].register_forward_hook(hook))
        try:
            model.hidden_states(b.ids, layer=max(layers) + 1)
        finally:
            for h in handles:
                h.remove()
        for l in layers:
            for j, i in enumerate(rows):
                out[l][i] = grabbed[l][j].float()
    return {l: torch.stack(v) for l, v in out.items()}


def keys(model, tok, reqs: list[Request], templates: list[list[str]], layers: list[int]) -> dict[int, torch.Tensor]:
    """Each edit's key at each layer: down_proj's input at the subject's last token, averaged
    within each template group and then over the groups, as the official code averages (so the
    bare prompt weighs as much as the five generated contexts together). {layer: (n, inter)}."""
    flat = [t for group in templates for t in group]
    seqs, index = [], []
    for r in reqs:
        for t in flat:
            ids, j = subject_token(tok, *fill(t, r))
            seqs.append(ids)
            index.append(j)
    h = hidden_at(model, seqs, index, layers, "key")
    out = {}
    for l in layers:
        per = h[l].view(len(reqs), len(flat), -1)
        bounds = torch.tensor([0] + [len(g) for g in templates]).cumsum(0).tolist()
        out[l] = torch.stack([per[:, a:b].mean(1) for a, b in zip(bounds, bounds[1:])]).mean(0)
    return out


def subject_outputs(model, tok, reqs: list[Request], layer: int) -> torch.Tensor:
    """The output of `layer` at the subject's last token of each bare prompt: (n, D)."""
    found = [subject_token(tok, *fill("{}", r)) for r in reqs]
    return hidden_at(model, [ids for ids, _ in found], [j for _, j in found], [layer], "out")[layer]


# ----------------------------------------------------------------------------------------------
# The target value v*


@dataclass
class VStar:
    """The official v* optimisation's settings (their names in the official configs)."""
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625


def target_values(model, tok, reqs: list[Request], templates: list[list[str]], layer: int, hp: VStar,
                  say=lambda s: None, max_tokens: int = 2048) -> tuple[torch.Tensor, list[dict]]:
    """v* for every edit: the output of `layer` at the subject's last token that makes the model
    predict the answer after every context template. Per edit, a vector delta is added there (in
    every template and in the KL prompt "{subject} is a") and optimised with Adam on

        mean over templates of the answer's mean NLL
        + kl_factor * KL(now || before) of the next-token distribution at the subject in the KL prompt
        + v_weight_decay * |delta| / |h|^2,

    h being the bare prompt's output there; after each step |delta| is clamped to
    clamp_norm_factor * |h|, and an edit stops once its loss is below 5e-2. Edits never interact,
    so they are optimised together (in chunks of about `max_tokens` tokens) and each gets exactly
    what it would alone. Returns v* = h + delta (n, D) and a log line per edit."""
    flat = [t for group in templates for t in group]
    per = len(flat) + 1  # an edit's sequences: one per template, then the KL prompt
    encoded, lookup = [], []
    for r in reqs:
        for t in flat:  # context + prompt + answer; the loss reads the positions that predict the answer
            ids, j = subject_token(tok, *fill(t, r))
            encoded.append((ids + r.answer, len(ids)))
            lookup.append(j)
        kl_text = r.subject + " is a"
        ids, j = subject_token(tok, kl_text, 0, len(r.subject))
        encoded.append((ids, len(ids)))  # no targets
        lookup.append(j)
    lookup = torch.tensor(lookup)
    cache = PrefixCache(model, encoded, 0, layer)  # every sequence's input to `layer`, computed once
    n, D = len(reqs), cache.h.shape[-1]
    lengths = torch.tensor([len(r.answer) for r in reqs], dtype=torch.float)

    def run(chunk: list[int], d: torch.Tensor):
        """Logits for `chunk`'s sequences with d (len(chunk), D) added to `layer`'s output at the
        subject: log-probs of the answer tokens summed per sequence, the KL prompts'
        log-distributions, and `layer`'s output at each subject before the change."""
        idx = [i * per + j for i in chunk for j in range(per)]
        h, b = cache.batch(idx)  # packed, no padding
        with torch.no_grad():  # `layer` itself does not depend on d: run it outside the graph
            h = model.forward_from(h, layer, positions=b.positions, segments=b.segments, stop_layer=layer + 1).float()
        starts = ((b.positions == 0) & (b.segments >= 0)).nonzero()  # each sequence's first token, in order
        rows, cols = starts[:, 0], starts[:, 1] + lookup[idx]
        base = h[rows, cols]
        h = h.index_put((rows, cols), d.repeat_interleave(per, 0), accumulate=True)
        is_kl_seq = torch.arange(len(idx)) % per == per - 1
        kl_mask = torch.zeros_like(b.target_mask)
        kl_mask[rows[is_kl_seq], cols[is_kl_seq]] = True
        want = b.predict_mask | kl_mask
        logp = F.log_softmax(model.forward_from(h, layer + 1, positions=b.positions, segments=b.segments,
                                                logits_at=want).float(), -1)  # row-major over `want`
        is_kl = kl_mask[want]
        token_lp = logp[~is_kl].gather(1, b.labels[:, None])[:, 0]
        seq_lp = torch.zeros(len(idx)).index_add(0, b.segments[b.predict_mask], token_lp)
        return seq_lp.view(len(chunk), per)[:, :-1], logp[is_kl], base[::per]

    def chunks(active: list[int]):
        size = lambda i: sum(len(encoded[i * per + j][0]) for j in range(per))  # noqa: E731
        out, used = [[]], 0
        for i in active:
            if out[-1] and used + size(i) > max_tokens:
                out.append([])
                used = 0
            out[-1].append(i)
            used += size(i)
        return out

    with torch.no_grad():  # the KL term's reference (the distributions before any change) and h
        first = [run(c, torch.zeros(len(c), D))[1:] for c in chunks(list(range(n)))]
    kl_init = torch.cat([kl for kl, _ in first])
    h_init = torch.cat([h for _, h in first])  # the bare prompt's vector at the subject
    init_norm = h_init.norm(dim=1)
    delta, m, v = torch.zeros(n, D), torch.zeros(n, D), torch.zeros(n, D)
    steps, done = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
    last = [dict() for _ in range(n)]
    for it in range(hp.v_num_grad_steps):
        active = (~done).nonzero()[:, 0].tolist()
        if not active:
            break
        for chunk in chunks(active):
            c = torch.tensor(chunk)
            d = delta[c].clone().requires_grad_()
            seq_lp, kl_lp, _ = run(chunk, d)
            nll = -(seq_lp / lengths[c, None]).mean(1)
            kl = (kl_lp.exp() * (kl_lp - kl_init[c])).sum(1)  # KL(now || before), as the official kl_div call computes
            wd = hp.v_weight_decay * d.norm(dim=1) / init_norm[c] ** 2
            loss = nll + hp.kl_factor * kl + wd
            for j, i in enumerate(chunk):
                last[i] = {"loss": loss[j].item(), "nll": nll[j].item(), "kl": kl[j].item(), "steps": int(steps[i])}
            learnt = loss.detach() < STOP_LOSS
            go = ~learnt if it < hp.v_num_grad_steps - 1 else torch.zeros_like(learnt)
            done[c[~go]] = True
            if not go.any():
                continue
            (loss * go).sum().backward()
            adam_step(delta, m, v, steps, c[go], d.grad[go], hp.v_lr)
            # project back into the ball |delta| <= clamp_norm_factor * |h|
            rows = c[go]
            cap = hp.clamp_norm_factor * init_norm[rows]
            norm = delta[rows].norm(dim=1)
            delta[rows] *= torch.where(norm > cap, cap / norm, torch.ones_like(norm))[:, None]
        say(f"v*: step {it + 1}/{hp.v_num_grad_steps}, {int((~done).sum())} of {n} edits still optimising, "
            f"mean loss {sum(x['loss'] for x in last) / n:.3f}")
    log = [{**x, "delta_norm": delta[i].norm().item(), "init_norm": init_norm[i].item()} for i, x in enumerate(last)]
    return h_init + delta, log


def adam_step(p, m, v, steps, rows, grad, lr, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.Adam's update applied to some rows of p only: every edit has its own
    optimiser state, as in the official one-edit-at-a-time loop."""
    b1, b2 = betas
    steps[rows] += 1
    t = steps[rows].float()[:, None]
    m[rows] = b1 * m[rows] + (1 - b1) * grad
    v[rows] = b2 * v[rows] + (1 - b2) * grad * grad
    denom = (v[rows].sqrt() / (1 - b2 ** t).sqrt()) + eps
    p[rows] -= lr / (1 - b1 ** t) * m[rows] / denom
