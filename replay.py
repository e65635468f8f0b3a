"""Scoring an edited model from where the edit begins.

An edit that changes only layers L and above leaves every hidden state entering layer L exactly as
the base model computes it. So a before/after measurement runs the base model once, keeping, call
by call, the hidden states entering layer L, and runs the edited model from layer L only, fed the
kept states: bit-identical inputs at L, hence the same scores, and the edited pass costs only the
layers from the edit up (LocFT-BF's default, layer 22 of SmolLM2's 30: about a quarter of them).
This holds for calls that do not depend on the model's own outputs (log-likelihoods, held-out
text); generation feeds its outputs back and always runs the whole model.
"""
from __future__ import annotations

import re

import torch


def first_layer(names, n_layers: int) -> int:
    """The lowest layer any of the tensors `names` belongs to: a layer's own index, the embedding
    0, anything above the layers (the final norm, the LM head) n_layers."""
    out = n_layers
    for name in names:
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        out = min(out, int(m.group(1)) if m else 0 if "embed" in name else n_layers)
    return out


class Replay:
    """Stands in for `model` when it is called: `record()`, the whole model runs and the hidden
    states entering `layer` of each call are kept (while they fit in `budget` bytes); `replay()`,
    each kept call starts at `layer` from them, after a check that it reads the same tokens, and
    calls past the kept ones run the whole model. Every other attribute is the model's."""

    def __init__(self, model, layer: int, budget: int = 2 << 30):
        self.model, self.layer, self.budget = model, layer, budget
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.used, self.full, self.replaying, self.calls = 0, False, False, 0

    def __getattr__(self, name):  # device, new_cache, args, ...: the model's
        return getattr(self.model, name)

    def record(self) -> "Replay":
        self.replaying = False
        return self

    def replay(self) -> "Replay":
        self.replaying, self.calls = True, 0
        return self

    def __call__(self, tokens: torch.Tensor, **kw) -> torch.Tensor:
        model, L = self.model, self.layer
        if self.replaying:
            i, self.calls = self.calls, self.calls + 1
            if i >= len(self.kept):
                return model(tokens, **kw)
            ids, h = self.kept[i]
            if not torch.equal(ids, tokens.cpu()):
                raise RuntimeError(f"replay: call {i} reads other tokens than the recorded call {i}")
            return model.forward_from(h.to(model.device_of(L)), L, **kw)
        below = {k: v for k, v in kw.items() if k != "logits_at"}
        h = model.hidden_states(tokens, L, **below)  # fills `cache` (if given) for the layers below L
        size = h.numel() * h.element_size()
        self.full = self.full or self.used + size > self.budget  # once over, keep no more: calls stay in step
        if not self.full:
            self.kept.append((tokens.cpu(), h.cpu()))
            self.used += size
        return model.forward_from(h, L, **kw)
