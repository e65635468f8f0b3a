"""Retain: unrelated prompts keep the base model's answers while the edits are taught.

    L = L_edit + W * mean over the batch's pool prompts of KL(p_base || p_edited) at their first k answer tokens

Editing one tensor with cross-entropy on the new answers alone lets the change spread to
whatever shares the edited relation: after 100 CounterFact edits most same-relation neighbours
answer with one of the new objects (bleed.py). Nothing in the edit loss says they should not.
The retain term says it, with the base model's own behaviour as the label:

- a **pool** of prompts that no evaluation looks at: by default the edit file's records that are
  not being edited (their prompts and their locality prompts), or another edit file's
  (--retain-from), or the user's own prompts, one per line (--retain-file). A prompt that is
  an evaluated one (an edit's prompt, rephrase or locality prompt) is refused in a user's file
  and dropped from records; from records, a prompt naming an edited subject is dropped too (it
  may state the edited fact, which the edit must change). With --retain-related the records that
  share an edit's relation come first, one per edit in turn: the neighbours the edit may bleed to;
- each prompt's **base continuation**: the base model's greedy answer, decoded by generate.py
  exactly as the evaluation decodes it, once, before training; its first k tokens are kept;
- the **loss**: KL(p_base || p_edited) at the positions that predict those k tokens, so the
  term is 0 at the start and stays 0 only while the edited model's distribution there is the
  base's. The base distributions cost no second model: nothing from the final norm to the LM
  head trains, so the base's final normed hidden states times `lm_head` give its logits exactly
  (as in ftpp.py).

Joint and breadth-first: pool prompt j travels with training sequence j mod n (n sequences), so
every epoch visits the whole pool once, in the same shuffled mini-batches as the edits, and its
layers below L run once (a prefix cache of its own).
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from data import PrefixCache, load_edits
from distributed import world_and_rank
from generate import EDIT_STOP, greedy


class PoolError(ValueError):
    """A retain pool that cannot be used; one line naming the file and the prompt."""


def key(prompt: str) -> str:
    """Prompts compare without case and with whitespace squeezed: "Mount Erebus,  in" is "mount erebus, in"."""
    return " ".join(prompt.split()).casefold()


def evaluated(edits) -> dict[str, str]:
    """Every prompt the evaluation asks, by key, with what it is (for the refusal's message)."""
    seen = {}
    for i, e in enumerate(edits):
        seen.setdefault(key(e.prompt), f"edit {i}'s prompt")
        for r in e.rephrases:
            seen.setdefault(key(r), f"edit {i}'s rephrase")
        for q, _ in e.locality:
            seen.setdefault(key(q), f"edit {i}'s locality prompt")
    return seen


def read_prompts(path) -> list[str]:
    """A user's pool: one prompt per line; empty lines and lines starting with '#' are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PoolError(f"--retain-file {path}: cannot read ({e})") from None
    return [s.strip() for s in lines if s.strip() and not s.startswith("#")]


def pool(edits, hp, say=print) -> list[str]:
    """The pool's prompts for these edits: `hp.retain_file`'s (refused if one is evaluated), or
    prompts of `hp.retain_from`'s records, evaluated ones and those naming an edited subject
    dropped; at most `hp.retain_pool` (default: one per edit), drawn with `hp.seed` (with
    `hp.retain_related`, those of an edit's relation first)."""
    asked = evaluated(edits)
    size = hp.retain_pool or len(edits)
    if hp.retain_file:
        prompts = read_prompts(hp.retain_file)
        for p in prompts:
            if key(p) in asked:
                raise PoolError(f"--retain-file {hp.retain_file}: {p!r} is evaluated ({asked[key(p)]}); "
                                "the pool must hold prompts the evaluation never asks")
        if not prompts:
            raise PoolError(f"--retain-file {hp.retain_file}: no prompts (empty lines and '#' lines are skipped)")
        return random.Random(hp.seed).sample(prompts, min(size, len(prompts)))
    if not hp.retain_from:
        raise PoolError("--retain needs a pool: --retain-from FILE (records) or --retain-file FILE (prompts)")
    subjects = sorted({e.subject.strip() for e in edits if len(e.subject.strip()) >= 3}, key=len, reverse=True)
    # an edited subject as a whole word or phrase ("Asia" is not in "Asian"), any case
    names = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, subjects)) + r")(?!\w)", re.I) if subjects else None
    candidates, dropped = {}, {"evaluated": 0, "edited subject": 0}  # prompt -> its record's relation
    for r in load_edits(hp.retain_from):
        for p in [r.prompt, *(q for q, _ in r.locality)]:
            if key(p) in asked:
                dropped["evaluated"] += 1
            elif names and names.search(p):
                dropped["edited subject"] += 1
            else:
                candidates.setdefault(p, relation(r))  # each prompt once, first-seen order
    if not candidates:
        raise PoolError(f"--retain-from {hp.retain_from}: no prompt left once the edited records' are dropped "
                        "(every record is being edited?); give another file with --retain-from or --retain-file")
    rng = random.Random(hp.seed)
    chosen = rng.sample(list(candidates), min(size, len(candidates)))
    wanted = [relation(e) for e in edits]
    if hp.retain_related:  # first, in turn for each edit, a prompt of a record with the edit's relation
        by_relation = {}
        for p in rng.sample(list(candidates), len(candidates)):
            by_relation.setdefault(candidates[p], []).append(p)
        related = []
        while len(related) < size and any(by_relation.get(w) for w in wanted):
            related += [by_relation[w].pop() for w in wanted if by_relation.get(w)]
        chosen = list(dict.fromkeys(related[:size] + chosen))[:size]
    say(f"retain pool: {len(chosen)} prompts from {hp.retain_from} ({len(candidates)} available; dropped "
        f"{dropped['evaluated']} evaluated, {dropped['edited subject']} naming an edited subject; "
        f"{sum(candidates[p] in set(wanted) for p in chosen)} of an edited relation)")
    return chosen


def relation(record) -> str:
    """A record's relation, as its prompt with the subject taken out: "Reedy Glacier is in" -> "{} is in"."""
    return key(record.prompt.replace(record.subject, "{}")) if record.subject else key(record.prompt)


def kl_base_edited(base_logits: torch.Tensor, edited_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_edited) per position; inputs (N, V), output (N,)."""
    logp_b = F.log_softmax(base_logits.float(), -1)
    logp_e = F.log_softmax(edited_logits.float(), -1)
    return (logp_b.exp() * (logp_b - logp_e)).sum(-1)


class Retain:
    """The pool's base continuations, its prefix cache at layer `hp.layer` and the base model's
    normed hidden states where they are predicted; built before training, while the model holds
    its base weights. `n` is the number of training sequences the pool is spread over."""

    def __init__(self, model, tok, prompts: list[str], n: int, hp, cache_device=None):
        self.hp, self.n = hp, n
        self.parts: list[float] = []
        self.continuations = greedy(model, tok, prompts, hp.retain_tokens, EDIT_STOP)  # the evaluation's decoder
        encoded = [(tok.encode(p) + c, len(tok.encode(p))) for p, c in zip(prompts, self.continuations)]
        self.cache = PrefixCache(model, encoded, tok.pad_id, hp.layer, cache_device)
        self.base = self.base_hidden(model)
        self.stats = {"pool": len(prompts), "weight": hp.retain_weight, "tokens": hp.retain_tokens,
                      "source": hp.retain_file or hp.retain_from,
                      "positions": sum(len(c) for c in self.continuations)}

    @torch.no_grad()
    def base_hidden(self, model, batch_size: int = 64) -> list[torch.Tensor]:
        """Per pool prompt, the base model's final normed hidden states (k_j, D) at the positions
        that predict its continuation."""
        out = []
        for s in range(0, len(self.cache.encoded), batch_size):
            rows = list(range(s, min(len(self.cache.encoded), s + batch_size)))
            h, b = self.cache.batch(rows, packed=False)
            h = model.model.norm(model.forward_from(h, self.hp.layer, stop_layer=model.args.n_layers))
            out += [h[i][b.predict_mask[i]] for i in range(len(rows))]
        return out

    def rows(self, idx: list[int]) -> list[int]:
        """The pool prompts that travel with training sequences `idx`."""
        return [j for i in idx for j in range(i, len(self.base), self.n)]

    def loss(self, model, idx: list[int]) -> torch.Tensor:
        """W times the mean, over the pool prompts of mini-batch `idx`, of each one's mean KL
        over its continuation's positions. Under torchrun each process takes its share, weighted
        so that the shares add up to the whole."""
        rows = self.rows(idx)
        world, rank = world_and_rank()
        share = rows[rank::world]
        if not share:
            return torch.zeros((), device=self.cache.model_device)
        h, batch = self.cache.batch(share)
        frozen = model.model.embed_tokens.weight.dtype  # bf16 on a GPU: autocast as batch_loss does
        with torch.autocast(h.device.type, dtype=frozen, enabled=frozen != torch.float32):
            edited = model.forward_from(h, self.hp.layer, positions=batch.positions, segments=batch.segments,
                                        logits_at=batch.predict_mask)  # (N, V) at the continuation's positions
            base = model.lm_head(torch.cat([self.base[j] for j in share]).to(edited.dtype))
        kl = batch.per_sample_mean(kl_base_edited(base, edited))[0]  # per pool prompt
        self.parts.append(kl.detach().mean().item())
        return self.hp.retain_weight * kl.sum() / len(rows)

    def epoch_parts(self) -> dict[str, float]:
        """The mean retain KL since the last call (one epoch), for the training log."""
        means = {"retain_kl": sum(self.parts) / len(self.parts)} if self.parts else {}
        self.parts = []
        return means
