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

from data import EditFileError, collate, encode_edit

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


class FrozenPrefix:
    """Sequences cut at one token each (the subject's last): nothing below `layer` changes, and a
    vector added to `layer`'s output at the cut reaches only the tokens from the cut on. So the
    output of `layer` at every token, and the keys and values of the tokens before the cut at
    every layer above, are computed once; `logits` runs only the tokens from the cut on, with
    those keys and values as a KV cache (exact: the same attention over the same numbers)."""

    @torch.no_grad()
    def __init__(self, model, seqs: list[list[int]], cut: list[int], layer: int, batch_size: int = 32):
        self.model, self.seqs, self.cut, self.layer = model, seqs, cut, layer
        n_layers = model.args.n_layers
        self.out = [None] * len(seqs)  # (len, D): `layer`'s output at every token
        self.kv = [None] * len(seqs)  # per layer above: (keys, values) (n_kv, cut, hd) of the tokens before the cut
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            b = collate([(seqs[i], len(seqs[i])) for i in rows], pad_id=0)  # right padding: no mask needed
            h = model.hidden_states(b.ids, layer=layer + 1)
            P = max(cut[i] for i in rows)
            H, mask = h.new_zeros(len(rows), P, h.shape[-1]), torch.zeros(len(rows), P, dtype=torch.long)
            for j, i in enumerate(rows):
                self.out[i] = h[j, :len(seqs[i])]
                H[j, P - cut[i]:], mask[j, P - cut[i]:] = h[j, :cut[i]], 1  # left-padded: every cut at column P
            cache = model.new_cache(len(rows), max(P, 1))
            if P and layer + 1 < n_layers:
                model.forward_from(H, layer + 1, attention_mask=mask, cache=cache, stop_layer=n_layers)
            for j, i in enumerate(rows):
                self.kv[i] = [(cache[l].k[j, :, P - cut[i]:P].clone(), cache[l].v[j, :, P - cut[i]:P].clone())
                              for l in range(layer + 1, n_layers)]

    def logits(self, idx: list[int], add: torch.Tensor, want: list[list[int]], slots: int = 256) -> torch.Tensor:
        """Sequences `idx` with add[j] added to `layer`'s output at sequence j's cut: the logits at
        positions want[j] (counted from the cut), sequence after sequence: (sum of len(want[j]), V).
        Run in groups of similar length (about `slots` padded positions each): little padding."""
        tail = lambda j: len(self.seqs[idx[j]]) - self.cut[idx[j]]  # noqa: E731
        groups, out = [[]], [None] * len(idx)
        for j in sorted(range(len(idx)), key=tail):
            if groups[-1] and (len(groups[-1]) + 1) * tail(j) > slots:
                groups.append([])
            groups[-1].append(j)
        for g in groups:
            pieces = self._logits([idx[j] for j in g], add[g], [want[j] for j in g]).split([len(want[j]) for j in g])
            for j, piece in zip(g, pieces):
                out[j] = piece
        return torch.cat(out)

    def _logits(self, idx: list[int], add: torch.Tensor, want: list[list[int]]) -> torch.Tensor:
        model, layer = self.model, self.layer
        B, P = len(idx), max(self.cut[i] for i in idx)
        S = max(len(self.seqs[i]) - self.cut[i] for i in idx)
        H = torch.zeros(B, S, model.args.dim, dtype=self.out[idx[0]].dtype)
        mask = torch.zeros(B, P + S, dtype=torch.long)
        at = torch.zeros(B, S, dtype=torch.bool)
        cache = model.new_cache(B, P + S)
        for j, i in enumerate(idx):
            p, s = self.cut[i], len(self.seqs[i]) - self.cut[i]
            H[j, :s], mask[j, P - p:P + s] = self.out[i][p:], 1
            at[j, want[j]] = True
            for l, (k, v) in zip(range(layer + 1, model.args.n_layers), self.kv[i]):
                cache[l].k[j, :, P - p:P], cache[l].v[j, :, P - p:P] = k, v
        H = H.float().index_put((torch.arange(B), torch.zeros(B, dtype=torch.long)), add, accumulate=True)
        return model.forward_from(H, layer + 1, attention_mask=mask, cache=cache, cache_pos=P, logits_at=at)


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
    what it would alone; only the tokens from the subject's last one on are recomputed at each
    step (FrozenPrefix). Returns v* = h + delta (n, D) and a log line per edit."""
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
    frozen = FrozenPrefix(model, [ids for ids, _ in encoded], lookup, layer)
    n, D = len(reqs), model.args.dim
    lengths = torch.tensor([len(r.answer) for r in reqs], dtype=torch.float)
    # per sequence: the positions (counted from the subject's last token) whose logits the loss
    # reads, and the tokens they predict; the KL prompt reads the subject's own position
    want, labels = [], []
    for k, ((ids, n_prompt), p) in enumerate(zip(encoded, lookup)):
        if k % per == per - 1:
            want.append([0])
            labels.append([-1])
        else:
            want.append(list(range(n_prompt - 1 - p, len(ids) - 1 - p)))
            labels.append(ids[n_prompt:])
    h_init = torch.stack([frozen.out[i * per][lookup[i * per]] for i in range(n)]).float()  # the bare prompt's
    init_norm = h_init.norm(dim=1)

    def run(chunk: list[int], d: torch.Tensor):
        """`chunk`'s sequences with d (len(chunk), D) added to `layer`'s output at the subject:
        the answer's log-probability summed per sequence (len(chunk), templates) and the KL
        prompts' next-token log-distributions (len(chunk), V)."""
        idx = [i * per + j for i in chunk for j in range(per)]
        logp = F.log_softmax(frozen.logits(idx, d.repeat_interleave(per, 0), [want[k] for k in idx]).float(), -1)
        y = torch.tensor([t for k in idx for t in labels[k]])  # in the logits' order; -1 marks a KL row
        seq = torch.tensor([j for j, k in enumerate(idx) for _ in labels[k]])
        is_tok = y >= 0
        token_lp = logp[is_tok].gather(1, y[is_tok, None])[:, 0]
        seq_lp = torch.zeros(len(idx)).index_add(0, seq[is_tok], token_lp)
        return seq_lp.view(len(chunk), per)[:, :-1], logp[~is_tok]

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

    with torch.no_grad():  # the KL term's reference: the distributions before any change
        kl_init = torch.cat([run(c, torch.zeros(len(c), D))[1] for c in chunks(list(range(n)))])
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
            seq_lp, kl_lp = run(chunk, d)
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
