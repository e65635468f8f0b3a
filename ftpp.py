"""FT++ regularisers on top of LocFT-BF (seed paper 003, eq. 4-7), as options of edit.py.

    L = L_edit(alpha) + lambda1 * L_general + lambda2 * L_local

- L_edit with label smoothing toward the old answer (--smooth-alpha A): per edit,
  (1 - A) * CE(new answer) + A * CE(old answer). Edits whose old answer is unknown are trained
  on the new answer alone (and counted in the log).
- L_general (--general-kl L1): KL(p_edited || p_base) per token on general-text sentences, one
  sentence per training sequence, drawn to match that sequence's token length.
- L_local (--local-kl L2): KL(p_edited || p_base) at the position that predicts the prompt's
  last token (the relation's last token r_l).

The base distributions are computed once, before training, without a second copy of the
model: nothing from the final norm to the LM head is ever trained, so caching the base model's
final normed hidden states (D numbers per position, not V) and multiplying them by `lm_head`
at each step gives the base logits exactly. With A = L1 = L2 = 0, edit.py does not call into
this file at all, so the loss is bit-identical to plain LocFT-BF.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import data


@dataclass
class FTPPConfig:
    smooth_alpha: float = 0.0  # A: weight of the old answer in the editing loss
    general_kl: float = 0.0  # lambda1
    general_text: str | None = None  # one sentence per line; default data/general_text.txt
    local_kl: float = 0.0  # lambda2

    @property
    def active(self) -> bool:
        return bool(self.smooth_alpha or self.general_kl or self.local_kl)


DEFAULT_GENERAL_TEXT = Path(__file__).resolve().parent / "data" / "general_text.txt"


def read_sentences(path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--general-text {path}: file does not exist")
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
    lines = [l for l in lines if l and not l.startswith("#")]
    if not lines:
        raise ValueError(f"--general-text {path}: no sentences (empty lines and '#' lines are skipped)")
    return lines


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


def kl_edited_base(edited_logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p_edited || p_base); inputs (N, V)."""
    logp_e = F.log_softmax(edited_logits.float(), -1)
    logp_b = F.log_softmax(base_logits.float(), -1)
    return (logp_e.exp() * (logp_e - logp_b)).sum(-1).mean()


def per_sample_ce(logits: torch.Tensor, batch: data.Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE over each sample's target tokens (B,), and each sample's token count (B,)."""
    return batch.per_sample_mean(F.cross_entropy(logits.float(), batch.labels, reduction="none"))


class FTPP:
    """The cached inputs of the three regularisers, and the regularised loss of one step.

    `prefix_cache(encoded) -> PrefixCache` is edit.py's frozen-prefix cache builder, passed in
    so this file stays independent of the training script; `cache` is the training sequences'
    own prefix cache when it already exists.
    """

    def __init__(self, model, tok, pairs: list[tuple[str, str]], old_answers: list[str | None],
                 encoded: list[tuple[list[int], int]], layer: int, cfg: FTPPConfig, prefix_cache,
                 cache=None, seed: int = 0):
        self.cfg, self.layer = cfg, layer
        dev = model.lm_head.weight.device
        if not 0 <= cfg.smooth_alpha <= 1:
            raise ValueError(f"--smooth-alpha must be in [0, 1], got {cfg.smooth_alpha}")
        if cfg.general_kl < 0 or cfg.local_kl < 0:
            raise ValueError("--general-kl and --local-kl must be non-negative")
        self.stats = {"smooth_alpha": cfg.smooth_alpha, "general_kl": cfg.general_kl, "local_kl": cfg.local_kl}

        if cfg.smooth_alpha:
            self.has_old = torch.tensor([o is not None for o in old_answers], device=dev)
            # an edit without an old answer gets a stand-in sequence (its own); its weight is 0
            old_enc = [data.encode_edit(tok, p, o) if o is not None else e
                       for (p, _), o, e in zip(pairs, old_answers, encoded)]
            self.old_cache = prefix_cache(old_enc)
            self.stats["edits_without_old_answer"] = int((~self.has_old).sum())

        if cfg.general_kl:
            path = cfg.general_text or DEFAULT_GENERAL_TEXT
            seqs = length_matched_sentences(tok, read_sentences(path), [len(ids) for ids, _ in encoded], seed)
            # n_prompt = 1: every next-token prediction in the sentence is a KL position
            self.general_cache = prefix_cache([(ids, 1) for ids in seqs])
            self.general_base = self._base_hidden(model, self.general_cache, range(len(seqs)))
            self.stats["general_text"] = str(path)

        if cfg.local_kl:
            # position n_prompt - 2 predicts the prompt's last token; prompts of one token have none
            self.local_pos = torch.tensor([n - 2 for _, n in encoded], device=dev)
            self.has_local = self.local_pos >= 0
            main = cache if cache is not None else prefix_cache(encoded)
            self.local_base = self._base_hidden(model, main, range(len(encoded)), at=self.local_pos.clamp(min=0))

    @torch.no_grad()
    def _base_hidden(self, model, cache, idx, at=None, batch_size: int = 64):
        """The base model's final normed hidden states: at every predict position of each
        sequence (a list of (n_i, D) tensors), or at one position per sequence (`at`, -> (N, D))."""
        dev = model.lm_head.weight.device
        idx, out = list(idx), []
        for s in range(0, len(idx), batch_size):
            rows = idx[s:s + batch_size]
            h, b = cache.batch(rows, dev, packed=False)
            h = model.model.norm(model.forward_from(h, self.layer, stop_layer=model.args.n_layers))
            if at is None:
                out += [h[i][b.predict_mask[i]] for i in range(len(rows))]
            else:
                out.append(h[torch.arange(len(rows), device=dev), at[rows]])
        return torch.cat(out) if at is not None else out

    def loss(self, model, idx: list[int], h: torch.Tensor, batch: data.Batch, loss_avg: str = "sample"):
        """The FT++ objective for one mini-batch (rows `idx` of the training set)."""
        cfg, L = self.cfg, self.layer
        dev = h.device
        rows = torch.as_tensor(idx, device=dev)
        pm = batch.predict_mask
        local = torch.zeros_like(pm)
        if cfg.local_kl:
            has = self.has_local[rows]
            local[has.nonzero()[:, 0], self.local_pos[rows][has]] = True
        sel = pm | local
        logits = model.forward_from(h, L, logits_at=sel)  # one pass: target and relation positions
        ce_new, n_new = per_sample_ce(logits[pm[sel]], batch)

        if cfg.smooth_alpha:
            h_old, b_old = self.old_cache.batch(idx, dev, packed=False)
            ce_old, _ = per_sample_ce(model.forward_from(h_old, L, logits_at=b_old.predict_mask), b_old)
            a = cfg.smooth_alpha
            per_sample = torch.where(self.has_old[rows], (1 - a) * ce_new + a * ce_old, ce_new)
        else:
            per_sample = ce_new
        # sample: the paper's per-sample mean; token: weight each sample by its target length
        loss = per_sample.mean() if loss_avg == "sample" else (per_sample * n_new).sum() / n_new.sum()
        parts = {"edit": loss.detach()}

        if cfg.general_kl:
            h_g, b_g = self.general_cache.batch(idx, dev, packed=False)
            edited = model.forward_from(h_g, L, logits_at=b_g.predict_mask)
            base = model.lm_head(torch.cat([self.general_base[i] for i in idx]).to(edited.dtype))
            parts["general_kl"] = kl_edited_base(edited, base)
            loss = loss + cfg.general_kl * parts["general_kl"]
        if cfg.local_kl and local.any():
            base = model.lm_head(self.local_base[rows][self.has_local[rows]].to(logits.dtype))
            parts["local_kl"] = kl_edited_base(logits[local[sel]], base)
            loss = loss + cfg.local_kl * parts["local_kl"]
        return loss, parts
