"""FT-L as EasyEdit implements it ("prompt_last", the FT-L of its survey): fine-tune one
down_proj on a batch of edits with the loss at the last prompt position only.

There, every answer token is scored by the same next-token distribution, the one after the
prompt: loss = -mean over the answer's tokens of log p(token | prompt). A fresh Adam per batch of
edits; up to `num_steps` passes over the batch in mini-batches of `batch_size`; a mini-batch
whose loss is below 1e-2 takes no step, and a pass whose mean loss is below 1e-2 ends training.
With `norm_constraint` set, every weight is clamped to within that distance of its value before
the batch after each step. Layers below the edited one run once per batch (the prefix cache).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data import PrefixCache

STOP_LOSS = 1e-2


def edit_batch(model, prompts: list[list[int]], answers: list[list[int]], hp: dict, say=lambda s: None) -> dict:
    """Apply FT-L for prompts (token ids) -> answers (token ids) to `model` in place. Returns a log."""
    L = hp["layer"]
    W = model.layers[L].mlp.down_proj.weight
    before = W.detach().clone()
    cache = PrefixCache(model, [(p, len(p)) for p in prompts], 0, L)
    opt = torch.optim.Adam([W], lr=hp["lr"], weight_decay=hp.get("weight_decay", 0.0))
    log = {"epochs": []}
    W.requires_grad_(True)
    try:
        for epoch in range(hp["num_steps"]):
            total, steps = 0.0, 0
            for s in range(0, len(prompts), hp["batch_size"]):
                idx = list(range(s, min(s + hp["batch_size"], len(prompts))))
                h, b = cache.batch(idx, packed=False)  # right-padded prompts
                last = torch.zeros_like(b.attention_mask, dtype=torch.bool)
                last[torch.arange(len(idx)), b.attention_mask.sum(1) - 1] = True
                logp = F.log_softmax(model.forward_from(h, L, logits_at=last).float(), -1)  # (B, V), one row per prompt
                loss = torch.stack([-logp[j, answers[i]].mean() for j, i in enumerate(idx)]).mean()
                total += loss.item() * len(idx)
                if loss.item() >= STOP_LOSS:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                if hp.get("norm_constraint"):
                    eps = hp["norm_constraint"]
                    with torch.no_grad():
                        W.copy_(torch.clamp(W, before - eps, before + eps))
            log["epochs"].append({"epoch": epoch + 1, "mean_loss": total / len(prompts), "steps": steps})
            if total / len(prompts) < STOP_LOSS:
                break
    finally:
        W.requires_grad_(False)
        W.grad = None
    say(f"FT-L: {len(log['epochs'])} passes, mean loss {log['epochs'][-1]['mean_loss']:.4f}, "
        f"|dW| {(W.detach() - before).norm().item():.4f}")
    return log
