"""MEMIT (Meng et al., 2023) and RECT (Gu et al., 2024), one batch of edits at a time.

MEMIT writes each edit's key k -> value v* into the down_proj of several consecutive layers:

1. v*: the last edited layer's output at the subject that makes the model say the answer
   (locate.target_values), found once per batch on the model as it is;
2. for each edited layer l in order: the keys K (n, inter) and the residual R = (v* - what the
   last edited layer outputs now) / (layers left), so the remaining layers share the change;
   then, in float64,
       dW = R^T K (lambda C0 + K^T K)^-1,
   which fits the new pairs while C0 (the keys of ordinary text) keeps the old ones; dW is added
   before the next layer's keys are read.

RECT computes exactly MEMIT's updates and keeps, in each layer, only the entries with the
largest relative change |dW / W| (the rest are zeroed): `rect_keep` of them.
"""
from __future__ import annotations

import torch

from baselines import locate


def down_proj(model, layer: int) -> torch.nn.Parameter:
    return model.layers[layer].mlp.down_proj.weight


def memit_update(K: torch.Tensor, R: torch.Tensor, C0: torch.Tensor, lam: float) -> torch.Tensor:
    """dW (D, inter) = R^T K (lam C0 + K^T K)^-1 for keys K (n, inter) and residuals R (n, D), in float64."""
    K, R = K.double(), R.double()
    adj = torch.linalg.solve(lam * C0.double() + K.T @ K, K.T)  # (inter, n)
    return R.T @ adj.T


def rect_mask(dW: torch.Tensor, W: torch.Tensor, keep: float) -> torch.Tensor:
    """dW with only its `keep` fraction of entries of largest |dW / W| left (the rest zero). The
    count kept is numel - int(numel * (1 - keep)), as the RECT authors' code counts the zeros."""
    rel = (dW / W.to(dW.dtype)).abs().flatten()
    n_keep = rel.numel() - int(rel.numel() * (1 - keep))
    mask = torch.zeros_like(rel, dtype=torch.bool)
    mask[torch.topk(rel, n_keep).indices] = True
    return dW * mask.view_as(dW)


@torch.no_grad()
def set_weight(p: torch.nn.Parameter, value: torch.Tensor):
    p.copy_(value.to(p.dtype))


def edit_batch(model, tok, reqs, templates, hp: dict, C0: dict, say=lambda s: None) -> dict:
    """Apply MEMIT (or RECT when hp has "rect_keep") for `reqs` to `model` in place. Returns a log."""
    layers, z = hp["layers"], hp["layers"][-1]
    zs, vlog = locate.target_values(model, tok, reqs, templates, z, locate.VStar(**{k: hp[k] for k in VSTAR_KEYS}), say)
    before = {l: down_proj(model, l).detach().clone() for l in layers}
    updates, log = {}, {"v_star": vlog, "layers": []}
    for i, l in enumerate(layers):
        K = locate.keys(model, tok, reqs, templates, [l])[l]  # with the earlier layers' updates in
        R = (zs - locate.subject_outputs(model, tok, reqs, z)) / (len(layers) - i)
        dW = memit_update(K, R, C0[l], hp["mom2_update_weight"])
        set_weight(down_proj(model, l), before[l].double() + dW)
        updates[l] = dW
        log["layers"].append({"layer": l, "residual_norm": R.norm(dim=1).mean().item() * (len(layers) - i),
                              "update_norm": dW.norm().item(), "weight_norm": before[l].norm().item()})
        say(f"layer {l}: mean |v* - now| {log['layers'][-1]['residual_norm']:.3f}, |dW| {dW.norm().item():.4f}")
    if "rect_keep" in hp:  # RECT: the same updates, sparsified, onto the weights as they were
        for l in layers:
            set_weight(down_proj(model, l), before[l].double() + rect_mask(updates[l], before[l], hp["rect_keep"]))
    return log


VSTAR_KEYS = ("v_num_grad_steps", "v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor")
