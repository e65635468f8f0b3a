"""Greedy decoding: how an edited model is used, so how it is measured.

Two decoders that give the same tokens:

- `greedy_reference`: one left-padded batch, prefilled once, then `for step: argmax -> append
  -> stop mask`. Read this one to see what the evaluation does.
- `greedy`: the same outputs, faster on many prompts of mixed length (the evaluation's path).

A row stops at an EOS token or once its new text contains a stop string; its answer is the new
text before the first stop string (`cut_at_stop`). The edit evaluation stops at "." and "\\n",
as the paper's authors do; a capability task passes its own stop strings.
"""
from __future__ import annotations

import torch

EDIT_STOP = (".", "\n")  # the authors' stop strings for edit prompts (EOS always stops too)
MAX_NEW_TOKENS = 32


def cut_at_stop(text: str, stop=EDIT_STOP) -> str:
    """The text before the first stop string, without surrounding spaces.
    " Paris. It is" -> "Paris"; " 3.5 km" -> "3" (the authors' rule: "." stops even in a number)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut].strip()


def is_finished(tok, new_ids: list[int], stop) -> bool:
    """Has this row stopped: an EOS token, or a stop string anywhere in its new text."""
    if new_ids[-1] in tok.eos_ids or new_ids[-1] == tok.eos_id:
        return True
    text = tok.decode(new_ids)  # the whole continuation: a stop string may span tokens
    return any(s in text for s in stop)


def common_prefix(seqs) -> int:
    """How many leading tokens all of `seqs` share."""
    first, n = seqs[0], min(map(len, seqs))
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def left_pad(tok, prompts: list[list[int]]):
    """(B, T) ids and attention mask with every prompt ending at column T - 1."""
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), tok.pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids, mask


@torch.inference_mode()
def greedy_reference(model, tok, prompts: list[str], max_new_tokens=MAX_NEW_TOKENS, stop=EDIT_STOP):
    """Each prompt's new token ids, the stopping token included; one batch, no tricks."""
    dev = model.device  # the embedding's
    ids, mask = left_pad(tok, [tok.encode(p) for p in prompts])
    ids, mask = ids.to(dev), mask.to(dev)
    B, T = ids.shape
    cache = model.new_cache(B, T + max_new_tokens)
    # prefill: positions come from the mask, so a row's left padding changes nothing for it
    logits = model(ids, attention_mask=mask, cache=cache, logits_at="last")  # (B, V)
    out = [[] for _ in prompts]
    done = [False] * B
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)  # greedy
        for b, t in enumerate(nxt.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = is_finished(tok, out[b], stop)
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], 1)  # finished rows go on, their tokens unused
        logits = model(nxt[:, None], attention_mask=mask, cache=cache, cache_pos=T + step, logits_at="last")
    return out


# ----------------------------------------------------------------------------------------------
# The fast path. On a CPU a decoding step costs about the same for 4 rows as for 64 (reading the
# weights dominates), and in a batch most rows stop long before the longest one. So: sort the
# prompts by length (little padding), prefill `batch_size` at a time, and keep every unfinished
# row in one live set that takes its steps together and sheds rows as they stop; prefill the
# next batch into it as soon as fewer than `batch_size` rows are left. With `share_prefix`, the
# tokens every prompt begins with (a few-shot task's examples) are read once into a KV cache
# that each batch starts from.


class Rows:
    """Rows decoding together: each layer's K/V (B, n_kv, S + room, hd), left-padded to S
    columns, the attention mask (B, S + room), the token each feeds next, which prompt each is."""

    def __init__(self, cache, mask, nxt, index: list[int], S: int):
        self.cache, self.mask, self.nxt, self.index, self.S = cache, mask, nxt, index, S

    def keep(self, rows: list[int]):
        sel = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        for c in self.cache:  # each layer's K/V live on that layer's device
            c.k, c.v = c.k[sel.to(c.k.device)], c.v[sel.to(c.v.device)]
        # nxt comes from the LM head, on the last device: select there (a CUDA index must be local)
        self.mask, self.nxt, self.index = self.mask[sel], self.nxt[sel.to(self.nxt.device)], [self.index[j] for j in rows]


def merge(parts: list[Rows], room: int) -> Rows:
    """One set from several, each left-padded to the longest S, with `room` free columns to
    decode into. Padded keys are masked and positions count real tokens only (they come from
    the mask), so a row computes the same whatever padding it sits behind."""
    S = max(r.S for r in parts)

    def pad(t, r, dim):  # r's S used columns of t -> S + room columns, real ones flush right
        t = t.narrow(dim, 0, r.S)
        before, after = list(t.shape), list(t.shape)
        before[dim], after[dim] = S - r.S, room
        return torch.cat([t.new_zeros(before), t, t.new_zeros(after)], dim)

    for layer, c in enumerate(parts[0].cache):  # reuse the first part's KVCache modules
        c.k = torch.cat([pad(r.cache[layer].k, r, 2) for r in parts])
        c.v = torch.cat([pad(r.cache[layer].v, r, 2) for r in parts])
    mask = torch.cat([pad(r.mask, r, 1) for r in parts])
    mask[:, S:] = 1  # the columns decoding fills
    return Rows(parts[0].cache, mask, torch.cat([r.nxt for r in parts]), [i for r in parts for i in r.index], S)


@torch.inference_mode()
def greedy(model, tok, prompts: list[str], max_new_tokens=MAX_NEW_TOKENS, stop=EDIT_STOP, batch_size=64,
           share_prefix: bool = False):
    """The same token lists as `greedy_reference`, in the order of `prompts`."""
    dev = model.device  # the embedding's
    encoded = [tok.encode(p) for p in prompts]
    # the shared beginning, in tokens (so no assumption about how text splits), read once; every
    # prompt keeps at least one token of its own, whose logits start its decoding
    P = min(common_prefix(encoded), min(map(len, encoded)) - 1) if share_prefix and encoded else 0
    if P > 0:
        prefix = model.new_cache(1, P)
        model(torch.tensor([encoded[0][:P]], device=dev), cache=prefix, logits_at=torch.zeros(1, P, dtype=torch.bool))
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[list[int]] = [[] for _ in prompts]
    live = None

    def take(rows: Rows, logits):
        """Append each row's argmax; drop the rows that stop."""
        rows.nxt = logits.argmax(-1)
        going = []
        for j, t in enumerate(rows.nxt.tolist()):
            new = out[rows.index[j]]
            new.append(t)
            if len(new) < max_new_tokens and not is_finished(tok, new, stop):
                going.append(j)
        if len(going) < len(rows.index):
            rows.keep(going)

    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad(tok, [encoded[i][P:] for i in chunk])
        ids, mask = ids.to(dev), mask.to(dev)
        cache = model.new_cache(len(chunk), P + ids.shape[1])
        if P:  # each row: the shared prefix, then its own tokens left-padded; positions follow the mask
            for c, p in zip(cache, prefix):
                c.k[:, :, :P], c.v[:, :, :P] = p.k, p.v
            mask = torch.cat([mask.new_ones(len(chunk), P), mask], 1)
        rows = Rows(cache, mask, None, chunk, mask.shape[1])
        take(rows, model(ids, attention_mask=mask, cache=cache, cache_pos=P, logits_at="last"))  # prefill
        parts = [r for r in (live, rows) if r is not None and r.index]
        live = merge(parts, max_new_tokens) if parts else None
        last = start + batch_size >= len(order)
        # step the live rows until there is room for the next batch (after the last, until all stop)
        while live is not None and live.index and (last or len(live.index) >= batch_size):
            logits = model(live.nxt[:, None], attention_mask=live.mask[:, :live.S + 1], cache=live.cache,
                           cache_pos=live.S, logits_at="last")
            live.S += 1
            take(live, logits)
    return out
