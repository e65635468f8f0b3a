"""Which edits a run has learnt, read off teacher forcing: an edit is learnt when, given its
prompt and the gold answer so far, the model's argmax is the next answer token at every answer
position and EOS after the last one. Greedy decoding then reproduces prompt + answer + EOS token
for token, so a learnt edit's greedy answer is its target (the converse fails only where an
unlearnt answer still reads the same after normalisation).

`per_sequence` reads it off logits a training step computed anyway (free); `report` makes one
forward pass from the prefix cache at the end of training, without generating.
"""
from __future__ import annotations

import torch

from data import Batch, PrefixCache

EXAMPLES = 3  # not-learnt edits printed; train_log.json lists all of them


def per_sequence(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(n_samples,) bool: every target token of the sample is the argmax of its logits.
    `logits` are (N, V) at `batch.predict_at`, as the loss reads them."""
    hit = (logits.argmax(-1) == batch.labels.to(logits.device)).float()
    return batch.per_sample_mean(hit)[0] == 1


@torch.no_grad()
def predictions(model, cache: PrefixCache, idx: list[int], layer: int, batch_size: int = 64):
    """For each sequence `idx[j]`: (learnt, the argmax token ids at its answer positions)."""
    out = []
    frozen = model.model.embed_tokens.weight.dtype  # bf16 on a GPU: as batch_loss runs it
    for s in range(0, len(idx), batch_size):
        rows = idx[s:s + batch_size]
        h, b = cache.batch(rows)
        with torch.autocast(h.device.type, dtype=frozen, enabled=frozen != torch.float32):
            logits = model.forward_from(h, layer, positions=b.positions, segments=b.segments,
                                        logits_at=b.predict_at)
        ok = per_sequence(logits, b).tolist()
        pred = logits.argmax(-1).split([len(cache.encoded[i][0]) - cache.encoded[i][1] for i in rows])
        out += [(o, p.tolist()) for o, p in zip(ok, pred)]
    return out


def report(model, tok, cache: PrefixCache, edits, per: int, layer: int, say, batch_size: int = 64) -> dict:
    """The learnt check of every edit on its own prompt (sequence i * per; with prefix
    augmentation the prefixed copies follow it), said in one line with the first few edits that
    were not learnt; all of them are in the returned dict (for train_log.json)."""
    preds = predictions(model, cache, [i * per for i in range(len(edits))], layer, batch_size)
    missed = [{"edit": i, "record": e.record, "prompt": e.prompt, "target": e.target,
               "predicted": tok.decode(p, skip_special_tokens=False)}
              for i, (e, (ok, p)) in enumerate(zip(edits, preds)) if not ok]
    n = len(edits)
    say(f"learnt {n - len(missed)} of {n} edits (teacher-forced: every answer token and EOS is the argmax)")
    for m in missed[:EXAMPLES]:
        say(f"  not learnt: {m['prompt']!r} -> {m['target']!r}; the model predicts {m['predicted']!r}")
    if len(missed) > EXAMPLES:
        say(f"  ... and {len(missed) - EXAMPLES} more (train_log.json: learnt.not_learnt)")
    return {"learnt": n - len(missed), "edits": n, "not_learnt": missed}
