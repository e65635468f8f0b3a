"""FT++: three regularisers on top of LocFT-BF ("Fine-Tuning Done Right... FT++", eq. 4-7).

    L = L_edit(A) + L1 * L_general + L2 * L_local

- L_edit with label smoothing toward the old answer (--smooth-alpha A): per edit,
  (1 - A) * CE(new answer) + A * CE(old answer). Edits whose old answer is unknown are trained
  on the new answer alone (and counted in the log).
- L_general (--general-kl L1): KL(p_edited || p_base) per token on general-text sentences, one
  sentence per training sequence, drawn to match that sequence's token length.
- L_local (--local-kl L2): KL(p_edited || p_base) of the distribution that predicts r_l, the
  relation's last token. The relation is the prompt without its subject, so for "Which river
  system contains Charity Creek?" r_l is "contains", and for "Reedy Glacier is in" it is "in".
  A prompt whose subject is unknown or not found falls back to its own last token (counted in
  the log and printed).

The base distributions are computed once, before training, without a second copy of the
model: nothing from the final norm to the LM head trains, so the base model's final normed
hidden states (D numbers per position, not V) times `lm_head` give its logits exactly.
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from data import PrefixCache, encode_edit
from learnt import per_sequence


def active(hp) -> bool:
    return bool(hp.smooth_alpha or hp.general_kl or hp.local_kl)


def read_sentences(path) -> list[str]:
    """One sentence per line; empty lines and lines starting with '#' are skipped."""
    lines = [s.strip() for s in Path(path).read_text(encoding="utf-8").splitlines()]
    return [s for s in lines if s and not s.startswith("#")]


def length_matched_sentences(tok, sentences: list[str], lengths: list[int], seed: int) -> list[list[int]]:
    """One general-text token sequence per training sequence, of (about) the same length:
    a random sentence at least that long, cut to the length; else the longest one there is."""
    rng = random.Random(seed)
    encoded = sorted((tok.encode(s) for s in sentences), key=len)
    out = []
    for n in lengths:
        long_enough = [ids for ids in encoded if len(ids) >= n]
        ids = rng.choice(long_enough) if long_enough else encoded[-1]
        out.append(ids[:max(n, 2)])
    return out


def relation_last_token(tok, prompt: str, subject: str) -> int | None:
    """The index of r_l in `tok.encode(prompt)`: the last word of the prompt after the subject,
    or, when only punctuation follows the subject, the last word before it. None when the
    subject is not in the prompt or the tokens do not line up at that word's end."""
    at = prompt.find(subject) if subject else -1
    if at < 0 and subject:
        at = prompt.lower().find(subject.lower())
    if at < 0:
        return None
    after = prompt[at + len(subject):]
    words = list(re.finditer(r"\w+", after))
    if words:
        end = at + len(subject) + words[-1].end()
    else:
        words = list(re.finditer(r"\w+", prompt[:at]))
        if not words:
            return None
        end = words[-1].end()
    head, ids = tok.encode(prompt[:end]), tok.encode(prompt)
    return len(head) - 1 if len(head) >= 2 and ids[:len(head)] == head else None


def kl_edited_base(edited_logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_edited || p_base); inputs (N, V)."""
    logp_e = F.log_softmax(edited_logits.float(), -1)
    logp_b = F.log_softmax(base_logits.float(), -1)
    return (logp_e.exp() * (logp_e - logp_b)).sum(-1).mean()


class FTPP:
    """The cached inputs of the three regularisers, and the FT++ objective of one mini-batch.

    `pairs` are the training (prompt, target) pairs with their `subjects` and `old_answers`
    (one per pair), `encoded` their token sequences and `cache` their prefix cache at layer
    `hp.layer`. Built before training, while the model holds its base weights.
    """

    def __init__(self, model, tok, pairs, subjects, old_answers, encoded, cache: PrefixCache, hp, say=print):
        self.hp, dev = hp, model.lm_head.weight.device
        self.parts: dict[str, list[float]] = {}  # this epoch's loss terms, for the training log
        self.stats = {"smooth_alpha": hp.smooth_alpha, "general_kl": hp.general_kl, "local_kl": hp.local_kl}
        if hp.smooth_alpha:
            self.has_old = torch.tensor([o is not None for o in old_answers], device=dev)
            # an edit without an old answer gets a stand-in sequence (its own); its weight is 0
            old = [encode_edit(tok, p, o) if o is not None else e for (p, _), o, e in zip(pairs, old_answers, encoded)]
            self.old_cache = PrefixCache(model, old, tok.pad_id, hp.layer, cache.h.device)
            self.stats["edits_without_old_answer"] = int((~self.has_old).sum())
        if hp.general_kl:
            seqs = length_matched_sentences(tok, read_sentences(hp.general_text), [len(ids) for ids, _ in encoded], hp.seed)
            # n_prompt = 1: every next-token prediction in the sentence is a KL position
            self.general_cache = PrefixCache(model, [(ids, 1) for ids in seqs], tok.pad_id, hp.layer, cache.h.device)
            self.general_base = self.base_hidden(model, self.general_cache)
            self.stats["general_text"] = str(hp.general_text)
        if hp.local_kl:
            r_l = [relation_last_token(tok, p, s) for (p, _), s in zip(pairs, subjects)]
            fallback = sum(r is None for r in r_l)
            # the position whose logits predict r_l; the prompt's last token where r_l is unknown
            pos = [(r if r is not None else n - 1) - 1 for r, (_, n) in zip(r_l, encoded)]
            self.local_pos = torch.tensor(pos, device=dev)
            self.has_local = self.local_pos >= 0  # a one-token prompt has no position predicting it
            self.local_base = self.base_hidden(model, cache, at=self.local_pos.clamp(min=0))
            self.stats["local_kl_fallback_to_last_token"] = fallback
            if fallback:
                say(f"FT++ local KL: no relation token found for {fallback} of {len(pairs)} prompts "
                    f"(subject missing or not in the prompt); their last prompt token is used instead")

    @torch.no_grad()
    def base_hidden(self, model, cache: PrefixCache, at=None, batch_size: int = 64):
        """The base model's final normed hidden states: at every predict position of each
        sequence (a list of (n_i, D) tensors), or at one position per sequence (`at` -> (N, D))."""
        out, n = [], len(cache.encoded)
        for s in range(0, n, batch_size):
            rows = list(range(s, min(n, s + batch_size)))
            h, b = cache.batch(rows, packed=False)
            h = model.model.norm(model.forward_from(h, self.hp.layer, stop_layer=model.args.n_layers))
            if at is None:
                out += [h[i][b.predict_mask[i]] for i in range(len(rows))]
            else:
                out.append(h[torch.arange(len(rows), device=h.device), at[rows]])
        return torch.cat(out) if at is not None else out

    def epoch_parts(self) -> dict[str, float]:
        """The mean of each loss term since the last call (one epoch), for the training log."""
        means = {k: sum(v) / len(v) for k, v in self.parts.items()}
        self.parts = {}
        return means

    def loss(self, model, idx: list[int], h: torch.Tensor, batch, loss_avg: str = "sample", learnt=None) -> torch.Tensor:
        """The FT++ objective for one right-padded mini-batch (rows `idx` of the training set);
        given a list `learnt`, the number of its sequences already learnt is appended."""
        hp, L = self.hp, self.hp.layer
        rows = torch.as_tensor(idx, device=h.device)
        pm = batch.predict_mask
        local = torch.zeros_like(pm)
        if hp.local_kl:
            has = self.has_local[rows]
            local[has.nonzero()[:, 0], self.local_pos[rows][has]] = True
        sel = pm | local
        logits = model.forward_from(h, L, logits_at=sel)  # one pass: target and relation positions
        ce_new, n_new = batch.per_sample_mean(F.cross_entropy(logits[pm[sel]].float(), batch.labels, reduction="none"))
        if learnt is not None:
            learnt.append(per_sequence(logits[pm[sel]].detach(), batch).sum())
        per_sample = ce_new
        if hp.smooth_alpha:
            h_old, b_old = self.old_cache.batch(idx, packed=False)
            old_logits = model.forward_from(h_old, L, logits_at=b_old.predict_mask)
            ce_old, _ = b_old.per_sample_mean(F.cross_entropy(old_logits.float(), b_old.labels, reduction="none"))
            a = hp.smooth_alpha
            per_sample = torch.where(self.has_old[rows], (1 - a) * ce_new + a * ce_old, ce_new)
        # sample: the paper's per-sample mean; token: weight each sample by its target length
        loss = per_sample.mean() if loss_avg == "sample" else (per_sample * n_new).sum() / n_new.sum()
        parts = {"edit": loss.detach()}
        if hp.general_kl:
            h_g, b_g = self.general_cache.batch(idx, packed=False)
            edited = model.forward_from(h_g, L, logits_at=b_g.predict_mask)
            base = model.lm_head(torch.cat([self.general_base[i] for i in idx]).to(edited.dtype))
            parts["general_kl"] = kl_edited_base(edited, base)
            loss = loss + hp.general_kl * parts["general_kl"]
        if hp.local_kl and local.any():
            base = model.lm_head(self.local_base[rows][self.has_local[rows]].to(logits.dtype))
            parts["local_kl"] = kl_edited_base(logits[local[sel]], base)
            loss = loss + hp.local_kl * parts["local_kl"]
        for k, v in parts.items():
            self.parts.setdefault(k, []).append(v.item())
        return loss
